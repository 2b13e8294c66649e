"""The ``/runner/<prefix>/...`` route: extension UI assets, streamed same-origin.

Use ``handle_asset`` from the middleware only. The path was already made
canonical; this forwards GET/HEAD with allow-listed headers and the query as is,
and streams the reply back chunk by chunk (memory stays flat for a 256 MB asset).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from runner_mw.backends.base import AssetResponse, script_path
from runner_mw.clientsock import bound_sends
from runner_mw.errors import UpstreamError
from runner_mw.headers import ASSET_REQUEST_ALLOW, SERVICE_TOKEN, request_headers, response_headers
from runner_mw.responses import error, status_line

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse

    from runner_mw.snapshot import Snapshot

log = logging.getLogger("runner_mw")


#: A service token shorter than this is not looked for in header values: "self" would take
#: the CSP with it, "1" an ETag. (A real token is a long random string.)
MIN_SCANNED = 16

#: Every asset response is sandboxed by itself, not only inside the host's
#: ``<iframe sandbox="allow-scripts">``: a link that opens an extension's page directly would
#: otherwise run it on the host app's origin (its cookies, a credentialed ``/v1/execute``).
#: A second CSP header (browsers enforce each one, so the runner's own policy holds too); no
#: ``allow-same-origin`` and no top navigation: an opaque origin, as in the iframe.
#: Not on a 304 that carries no policy of its own: a cache that applies a 304 replaces every
#: stored header of the same name (RFC 9111 4.3.4), so the sandbox alone would replace the
#: stored pair and drop the runner's policy (its ``script-src``) for good.
SANDBOX = ("Content-Security-Policy",
           "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads")

#: The status logged and counted when the client left before the body was whole (nginx's
#: code for it): not the runner's fault, so not a 502 that would set off its alerts.
CLIENT_CLOSED = 499


class StreamedBody:
    """The WSGI iterable of a proxied asset. Once it is done it releases the upstream
    connection, then calls ``done`` with ``status`` (all sent), 502 (the runner broke off) or
    ``CLIENT_CLOSED``: when the last piece has been handed out, else at ``close()``, else
    when it is collected. PEP 3333 says the server always calls ``close()``, but werkzeug's
    server skips it when the client resets the connection while it reads away what is left
    of the request: each such client would keep a pool connection for good, and after
    ``pool_size`` of them every request would be a 503."""

    def __init__(self, upstream: AssetResponse, done: Callable[[int], None], status: int,
                 first: bytes = b"", restore: Callable[[], None] | None = None) -> None:
        self._upstream = upstream
        self._done = done
        self._restore = restore  # undoes bound_sends on the client's socket
        self._status = status
        self._first = first
        self._complete = False
        self._broken = False
        self._finished = False

    def __iter__(self) -> Iterator[bytes]:
        if self._first:
            yield self._first
        try:
            for chunk in self._upstream.chunks:
                if chunk:
                    yield chunk
        except Exception as exc:  # an UpstreamError from ours; anything from a plugin's stream
            # The runner broke off mid-body. Raising makes the server abort the connection:
            # the client sees a broken transfer, never a short body that looks whole. As a
            # connection reset: gunicorn and werkzeug drop those quietly, where anything else
            # is an ERROR with a traceback (one per runner restart mid-stream), said here once.
            if isinstance(exc, UpstreamError):
                log.warning("upstream asset body broken off")
            else:
                log.exception("backend stream failed mid-body (a plugin's bug?)")
            self._broken = True
            raise ConnectionResetError(errno.ECONNRESET, "the runner broke off the body") from exc
        self._complete = True
        self._finish()  # all handed out: the connection goes back now, whatever the server does

    def close(self) -> None:
        self._finish()

    def __del__(self) -> None:
        # The last resort, for a server that never calls close() (see the class).
        with contextlib.suppress(Exception):
            self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        # A server may stop asking once Content-Length bytes are out (PEP 3333 allows it):
        # the body was whole even though the iterator was not run to its end.
        complete = self._complete or (not self._broken and self._upstream.complete())
        try:
            if self._restore is not None:
                self._restore()
            self._upstream.close()
        finally:
            self._done(self._status if complete else 502 if self._broken else CLIENT_CLOSED)


def handle_asset(
    environ: dict[str, Any], start_response: StartResponse, snap: Snapshot, rid: str,
    tail: str, done: Callable[[int], None],
) -> Any:
    """Forward one asset request (``tail`` is the encoded path below ``/runner/``).

    ``done(status)`` is called once the response is finished (or failed).
    """
    method = environ.get("REQUEST_METHOD", "GET")
    headers = request_headers(environ, ASSET_REQUEST_ALLOW)
    headers["x-request-id"] = rid
    active = snap.config.active
    if active.service_token:
        headers[SERVICE_TOKEN] = active.service_token
    try:
        upstream = snap.backend.fetch_asset(method, tail, environ.get("QUERY_STRING", ""), headers)
    except UpstreamError as exc:
        done(exc.status)
        extra = [("Retry-After", "1")] if exc.status == 503 else []
        return error(start_response, exc.status, exc.code, rid, headers=extra)
    try:
        try:
            # Read the first chunk before answering: while nothing is sent, a runner that
            # fails now still gets the client a JSON 502/504 (not the server's own 500 page).
            first = next(upstream.chunks, b"")
        except UpstreamError as exc:
            upstream.close()
            done(exc.status)
            return error(start_response, exc.status, exc.code, rid)
        out, location = response_headers(upstream.headers)
        token = active.service_token or ""
        if len(token) >= MIN_SCANNED and any(token in value for _, value in out):
            # Echoed under another name (a debugging ingress listing the request's headers).
            out = [(n, v) for n, v in out if token not in v]
        if not (200 <= upstream.status < 300 or upstream.status == 304):
            # The runner marks every reply immutable; an error page must not be cached.
            out = [(n, v) for n, v in out if n.lower() != "cache-control"]
            out.append(("Cache-Control", "no-store"))
        if location:
            prefixes, origins = snap.config.asset_prefixes, _origins(active)
            relocated = (_relocate(n, v, environ, prefixes, origins) for n, v in out)
            out = [header for header in relocated if header is not None]
        if upstream.status != 304 or any(n.lower() == "content-security-policy" for n, _ in out):
            out.append(SANDBOX)
        out.append(("X-Request-Id", rid))
        whole = upstream.complete()  # (a backend's own code: inside this guard)
        start_response(status_line(upstream.status), out)
    except BaseException:
        # Whatever fails before the body is handed over gives the connection back (closed):
        # a pool slot kept by a failed request would end, after pool_size of them, in 503s.
        upstream.close()
        done(upstream.status)
        raise
    status = upstream.status
    if whole:
        # All of it came with the first read (a small asset): the connection goes back to
        # the pool now, not after the client has read the body. (The access log then says
        # 200 even if the client leaves before the body is written.)
        try:
            upstream.close()
        except Exception:  # a plugin's close(): the answer is already under way, keep it
            log.exception("runner_mw: closing the runner's reply failed")
        finally:
            done(status)
        return [first] if first else []
    # Streamed: the body may outgrow the socket buffers, and a client that stops reading it
    # must not keep this thread and the runner connection for good (read_ms, as upstream).
    return StreamedBody(upstream, done, status, first, bound_sends(environ, active.timeouts.read_ms / 1000))


def _origins(active: Any) -> tuple[str, ...]:
    """The runner's own origins, as a Location may name them: its URL, and with a ``host``
    (Knative's ingress routes on it) that host over http and https, with or without the
    default port."""
    if not active.host:
        return (active.url,)
    host = active.host
    return (active.url, f"http://{host}", f"https://{host}", f"http://{host}:80", f"https://{host}:443")


def _relocate(name: str, value: str, environ: dict[str, Any], prefixes: tuple[str, ...],
              origins: tuple[str, ...]) -> tuple[str, str] | None:
    """A redirect to one of the runner's assets (``/ext-ui/...``, relative or on one of its
    own origins) becomes ``/runner/ext-ui/...`` here. One to any other place on the runner,
    or to a path from the root (which the browser would resolve on the host app's origin),
    or a relative one that climbs with dot segments, is dropped (None): the runner's address
    stays internal, and the runner cannot send a browser to the host app's pages. A relative
    path (it stays below the asset's folder) and another origin's URL pass as sent.
    A ``Refresh`` that only reloads the page after a delay passes; one naming a target is
    dropped (None): the runner's address or the host's pages, like a Location."""
    low = name.lower()
    if low == "refresh":
        if _DELAY.fullmatch(value):
            return name, value
        log.info("runner_mw: a runner Refresh naming a target was dropped")
        return None
    if low != "location":
        return name, value
    path, on_runner = value, False
    for origin in origins:
        if value[:len(origin) + 1].lower() == origin.lower() + "/":
            path, on_runner = value[len(origin):], True
            break
    if _asset_path(path, prefixes):
        return name, script_path(environ.get("SCRIPT_NAME", "")) + "/runner" + path
    if not on_runner:
        if path.startswith("//") or _SCHEME.match(path):
            return name, value  # another origin: the runner's to choose
        if not path.startswith(("/", "\\")) and _plain(path):
            return name, value  # below the redirecting asset's folder, under /runner/
    log.info("runner_mw: a runner redirect outside the assets was dropped (its Location is not passed)")
    return None


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_DELAY = re.compile(r"\s*[0-9.]+\s*")


def _asset_path(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``path`` is a plain path (``_plain``) under an asset prefix: starts
    ``/<prefix>``, so that the rewritten URL cannot leave ``/runner/``."""
    return path.startswith("/") and path[1:].startswith(prefixes) and _plain(path)


def _plain(path: str) -> bool:
    """No control character, backslash or dot segment, literal or percent-encoded (browsers
    resolve ``%2e``): a reference that cannot climb out of the folder it is resolved in."""
    if not path.isprintable():
        return False  # (browsers delete tabs from URLs: ".\t." would become "..")
    target = path.split("?", 1)[0].split("#", 1)[0]
    for segment in target.split("/"):
        plain = unquote(segment)
        if plain in (".", "..") or "\\" in plain:
            return False
    return True
