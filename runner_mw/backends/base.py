"""The ``RunnerBackend`` interface: what the middleware needs from a runner.

Subclass it (or ``runner_mw.backends.http.HTTPBackend`` for anything that speaks
the runner's HTTP contract) to add a backend kind; register the class under the
``runner_mw.backends`` entry-point group. The middleware chooses a backend from
config, never with an ``if`` on the kind.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, unquote_to_bytes, urlencode, urlsplit

from runner_mw.paths import MAX_PATH, MAX_QUERY, has_bad_char

#: The longest request target ``ui_url`` builds: gunicorn's default ``limit_request_line`` is
#: 4 094 for the whole line ("GET ", the target, " HTTP/1.1"), and longer is a 414 there.
MAX_TARGET = 4000

if TYPE_CHECKING:
    from runner_mw.config import BackendSettings

# Either case, spelled out: re.IGNORECASE is 3x slower here (checked on every execute) and
# also lets non-ASCII letters through that fold to ASCII ("\u017fha256:" for "sha256:").
CONTENT_HASH = re.compile(r"[sS][hH][aA]256:[0-9a-fA-F]{64}")


def script_path(script_name: str) -> str:
    """``SCRIPT_NAME`` as the start of a URL path, with no trailing slash, UTF-8 and reserved
    characters percent-encoded (a mount at ``/café`` or ``/a#b`` must give a URL that leads
    back to it). Takes the environ's form (PEP 3333: the bytes as latin-1 text) and text a
    framework decoded already; latin-1 bytes that are not UTF-8 are taken as the latter.
    Leading slashes are one: ``//host`` would make the URL another origin's (gunicorn takes
    ``SCRIPT_NAME`` from a header of a peer in ``forwarded_allow_ips``); a backslash, which
    browsers read as a slash, is percent-encoded like any reserved character. Escapes already
    there (``%20``) are kept: gunicorn passes a mount as it matched it in the raw target,
    still encoded; a ``%`` that starts no escape is written ``%25``."""
    text = script_name.strip("/")
    text = "/" + text if text else ""
    try:
        raw = text.encode("latin-1")  # the server's bytes, as PEP 3333 hands them over
        raw.decode("utf-8")
    except UnicodeError:  # text a framework decoded already (Flask's script_root: "/café")
        raw = text.encode("utf-8")
    parts = _ESCAPE.split(raw)  # text, escape, text, ...: the escapes at the odd places
    return "".join(part.decode("ascii") if i % 2 else quote(part, safe="/!$&'()*+,;=:@-._~")
                   for i, part in enumerate(parts))


_ESCAPE = re.compile(rb"(%[0-9A-Fa-f]{2})")


@dataclass
class ExecuteReply:
    """The runner's transport reply to ``/v1/execute`` (already read, size-capped)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class AssetResponse:
    """A streaming asset reply. Iterate ``chunks`` then always ``close()`` it.

    A body cut short raises from the iterator, so the client sees a broken transfer.
    ``complete()`` says whether ``chunks`` has handed out the whole body already (a
    small asset, all in the first piece): the middleware then answers with what it
    has and closes at once. A backend that cannot tell leaves it answering False.
    """

    status: int
    headers: list[tuple[str, str]]
    chunks: Iterator[bytes]
    close: Any = field(default=lambda: None)
    complete: Callable[[], bool] = field(default=lambda: False)


class RunnerBackend(abc.ABC):
    """A place extension requests run. One instance per config snapshot.

    The constructor must do no I/O (pools open lazily, in the process that uses
    them, so nothing crosses a fork). ``close()`` is called once the snapshot is
    replaced and its in-flight requests have finished.
    """

    #: The kind name this class registers under (``docker``, ``knative``, ...).
    kind: ClassVar[str]

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings

    @classmethod
    @abc.abstractmethod
    def settings_schema(cls) -> dict[str, Any]:
        """JSON Schema (draft 2020-12) of one ``backends`` entry of this kind, ``kind`` included."""

    @abc.abstractmethod
    def execute(self, body: bytes, headers: dict[str, str]) -> ExecuteReply:
        """POST one execute envelope. Raises ``runner_mw.errors.UpstreamError`` subclasses."""

    @abc.abstractmethod
    def fetch_asset(self, method: str, path: str, query: str, headers: dict[str, str]) -> AssetResponse:
        """GET/HEAD ``{base}/{path}?{query}`` (``path`` already canonical and encoded)."""

    @abc.abstractmethod
    def health(self) -> dict[str, Any]:
        """Ask the runner's ``/healthz`` (short timeout); ``{"ok": bool, ...}``, never raises."""

    def metadata(self) -> dict[str, Any]:
        """What this backend is, safe to show in status (no secrets)."""
        s = self.settings
        return {"name": s.name, "kind": self.kind, "url": s.url, "public_base": s.public_base}

    def ui_url(
        self,
        extension_id: str,
        content_hash: str,
        path: str = "/",
        tenant: str | None = None,
        *,
        script_name: str = "",
    ) -> str:
        """The iframe URL of an extension's UI, in the reference gateway's shape.

        A relative ``public_base`` (``/runner``) is prefixed with ``script_name``
        (the host app's mount point). Raises ``ValueError`` for a bad hash, for an extension
        id the gateway's route would refuse in a path (``/``, ``%``, ``;``, ``\\``, a control
        character, ``.`` or ``..``), or for a URL longer than the route takes
        (``paths.MAX_PATH``, ``MAX_QUERY``) or than gunicorn reads by default (``MAX_TARGET``).
        """
        if not CONTENT_HASH.fullmatch(content_hash or ""):
            raise ValueError("content_hash must be 'sha256:' followed by 64 hex digits")
        if not extension_id:
            raise ValueError("extension_id must not be empty")
        if (extension_id in (".", "..") or "/" in extension_id or "%" in extension_id
                or has_bad_char(extension_id)):
            # Encoded, they are escapes the route refuses (%2F, %25, %3B, %5C, %00-%1F); a dot
            # segment the browser itself resolves away.
            raise ValueError("extension_id has a character the gateway refuses in a path "
                             "(/ % ; \\ or a control character), or is . or ..")
        base = self.settings.public_base.rstrip("/")
        if base.startswith("/"):
            base = script_path(script_name) + base
        params = {"path": path or "/"}
        if tenant:
            params["tenant"] = tenant
        params["extensionId"] = extension_id
        query = urlencode(params, quote_via=quote, safe="/")
        tail = f"/ext-ui/{quote(extension_id, safe='')}/{quote(content_hash, safe='')}/index.html"
        # As the gateway's route measures it: the decoded PATH_INFO, /runner/... (its bytes).
        routed = len("/runner") + len(unquote_to_bytes(tail))
        if len(query) > MAX_QUERY or routed > MAX_PATH:
            raise ValueError(f"the iframe URL would be longer than the gateway takes "
                             f"(path {routed} of {MAX_PATH}, query {len(query)} of {MAX_QUERY})")
        url = f"{base}{tail}?{query}"
        # What the browser's request line holds: the base's path as it sends it (percent-encoded).
        target = len(url) - len(base) + len(quote(urlsplit(base).path, safe="/%:@!$&'()*+,;=~"))
        if target > MAX_TARGET:
            raise ValueError(f"the iframe URL would be longer than a server reads by default "
                             f"(request target {target} of {MAX_TARGET} characters)")
        return url

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release pooled connections. Called once, after the last in-flight request."""
