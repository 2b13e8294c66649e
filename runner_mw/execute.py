"""The ``/v1/execute`` route: checks, envelope, transport headers, reply mapping.

Use ``handle_execute`` from the middleware only; every refusal is a JSON error
(see ``runner_mw.responses``) decided before anything is sent to the runner.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from runner_mw import access as acc
from runner_mw.envelope import envelope_problem, prepare, unicode_problem
from runner_mw.errors import UpstreamError
from runner_mw.headers import EXECUTE_REQUEST_ALLOW, SERVICE_TOKEN, request_headers
from runner_mw.responses import error, status_line

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse

    from runner_mw.snapshot import Snapshot

ExecuteHook = Callable[[Mapping[str, Any], dict[str, Any]], dict[str, Any]]
log = logging.getLogger("runner_mw")
CHUNK = 64 * 1024
# One encoder for every call: json.dumps() with options builds a new one each time.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


class _NonFinite(ValueError):
    """NaN, Infinity, or a number too large for a float. Not JSON (RFC 8259), though
    ``json.loads`` takes them; the runner refuses them, and orjson would write ``null``."""


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NonFinite(text)
    return value


def _no_constant(name: str) -> Any:
    raise _NonFinite(name)


_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)


# orjson reads an integer beyond 64 bits as a float (another value); every such number has
# 19 digits or more in a row. The digits made nines, one search: about 1 us for 1 KB.
_NINES = bytes.maketrans(b"0123456789", b"9999999999")
_LONG_NUMBER = b"9" * 19


def strict_json(data: bytes) -> Any:
    """``json.loads(data)``, but NaN and infinite numbers raise ``ValueError``.

    orjson reads it when it can (a 1 KB envelope in a third of the time); what orjson
    refuses (lone surrogates, UTF-16, a BOM, NaN, nesting past its limit, bad JSON) and every
    body with a 19-digit run goes to the standard library, which decides: the same value
    either way, and the same error."""
    if _LONG_NUMBER not in data.translate(_NINES):
        try:
            return orjson.loads(data)
        except (ValueError, RecursionError):  # orjson.JSONDecodeError is a ValueError
            pass
    # An object whose second byte is not NUL is UTF-8 by json.detect_encoding's own rules
    # (no BOM starts with "{", and only NULs tell UTF-16 or -32): that check, 1 us, skipped.
    utf8 = data[:1] == b"{" and data[1:2] != b"\x00"
    return _DECODER.decode(data.decode("utf-8" if utf8 else json.detect_encoding(data), "surrogatepass"))


def compact_json(doc: Any) -> bytes:
    """``doc`` as compact JSON: by orjson (about 20x faster than the standard library on
    a 1 KB envelope), or by the standard library for what orjson refuses but ``json.loads``
    lets in (integers beyond 64 bits, lone surrogates), which then goes out unchanged."""
    try:
        return orjson.dumps(doc)
    except TypeError:  # orjson.JSONEncodeError is one
        return _COMPACT.encode(doc).encode()


#: A body that parsed but nests too deeply to be written again (orjson stops at 255 levels,
#: the standard library at the interpreter's recursion limit).
TOO_DEEP = "the body nests too deeply"


#: orjson's own limit: a body nested deeper cannot take the fast path (the runner's parser
#: stops at 128 levels anyway).
MAX_DEPTH = 255


def _too_deep(doc: Any) -> bool:
    """Whether ``doc`` nests ``MAX_DEPTH`` levels or more (orjson refuses 255). Asked only
    once orjson has refused the body, for whatever reason it named first (an integer beyond
    64 bits before the deep part hid the nesting): such a body would go through the standard
    library's fallbacks, each walking it again (3 400 arrays 300 deep: 1.4 s of CPU a
    request). Level by level, containers only, no recursion: 2 MiB of ``[]`` in tens of ms."""
    level = [doc] if isinstance(doc, _CONTAINERS) else []
    depth = 0
    while level:
        depth += 1
        if depth >= MAX_DEPTH:
            return True
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, _CONTAINERS)]
    return False


# What json.loads makes, and a hook's subclasses of them (whose cycle must end here, not in
# a later walk that would never end).
_CONTAINERS = (dict, list)


class _Refused(Exception):
    def __init__(self, status: int, code: str, detail: str | None = None) -> None:
        self.status, self.code, self.detail = status, code, detail


def handle_execute(
    environ: dict[str, Any], start_response: StartResponse, snap: Snapshot, rid: str,
    authorize: acc.Authorize | None, execute_hook: ExecuteHook | None,
) -> tuple[int, list[bytes]]:
    """Answer one ``/v1/execute`` request; returns (status, body) for the access log."""
    config = snap.config
    if environ.get("REQUEST_METHOD") != "POST":
        return 405, error(start_response, 405, "method_not_allowed", rid, headers=[("Allow", "POST")])
    verdict = acc.check_access(environ, config.access, authorize)
    if verdict == acc.UNAUTHORIZED:
        return 401, error(start_response, 401, "unauthorized", rid,
                          headers=[("WWW-Authenticate", 'Bearer realm="runner_mw"')])
    if verdict == acc.FORBIDDEN:
        return 403, error(start_response, 403, "forbidden", rid)
    try:
        body, headers = _build_request(environ, snap, rid, execute_hook)
        reply = snap.backend.execute(body, headers)
        status, payload = _map_reply(reply.status, reply.body, config.expose_runner_errors)
    except _Refused as exc:
        return exc.status, error(start_response, exc.status, exc.code, rid, detail=exc.detail)
    except UpstreamError as exc:
        extra = [("Retry-After", "1")] if exc.status == 503 else []
        return exc.status, error(start_response, exc.status, exc.code, rid, headers=extra)
    start_response(status_line(status), [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(payload))),
        ("Cache-Control", "no-store"),  # the runner says "immutable" on everything
        ("X-Request-Id", rid),
    ])
    return status, [payload]


def _build_request(environ: dict[str, Any], snap: Snapshot, rid: str,
                   execute_hook: ExecuteHook | None) -> tuple[bytes, dict[str, str]]:
    config = snap.config
    ctype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise _Refused(415, "unsupported_media_type", "Content-Type must be application/json")
    raw = read_body(environ, config.max_body_bytes)
    try:
        envelope = strict_json(raw)
    except UnicodeDecodeError:
        raise _Refused(400, "invalid_request", "body is not UTF-8") from None
    except _NonFinite:
        raise _Refused(400, "invalid_request", "numbers must be finite (no NaN or Infinity)") from None
    except (ValueError, RecursionError):
        raise _Refused(400, "invalid_request", "body is not valid JSON") from None
    sent: dict[str, Any] | None = None  # the client's envelope, where a hook runs
    if execute_hook is not None and isinstance(envelope, dict):
        # Refused before the host's code sees it (it is refused after anyway): orjson reads
        # 1 024 levels, and a hook that dumps or walks the envelope would meet Python's
        # recursion limit, a 500. Fewer brackets than MAX_DEPTH cannot nest that deep.
        if raw.count(b"[") + raw.count(b"{") >= MAX_DEPTH and _too_deep(envelope):
            raise _Refused(400, "invalid_request", TOO_DEEP)
        sent = _as_checked(envelope)
        try:
            envelope = execute_hook(environ, envelope)
        except PermissionError:
            raise _Refused(403, "forbidden") from None
        if not isinstance(envelope, dict):
            # The host's bug (a hook that edits in place and forgets to return), not the
            # client's: a logged 500, as when the hook raises.
            raise TypeError(f"execute_hook returned {type(envelope).__name__}, not the envelope")
    problem = envelope_problem(envelope)
    if problem:
        if sent is not None and not _sent(sent, envelope, problem.path):
            # The host's bug (a user id written as a number), not the client's: a logged
            # 500, as when the hook raises, never a 400 that sends the developer after the client.
            raise ValueError(f"{HOOK_BROKE}: {problem}")
        raise _Refused(400, "invalid_request", problem)
    headers = request_headers(environ, EXECUTE_REQUEST_ALLOW, allow_prefix="x-alga-")
    ctx = envelope["context"]
    for name, key in (("x-alga-tenant", "tenant_id"), ("x-alga-extension", "extension_id")):
        given = headers.get(name)
        if given is not None and given != ctx[key]:
            raise _Refused(400, "invalid_request", f"{name} does not match context.{key}")
        headers[name] = ctx[key]
    idem = headers.get("x-idempotency-key")
    if idem is not None:
        if idem.strip():
            try:
                headers["x-idempotency-key"] = bound_idempotency_key(envelope, idem)
            except RecursionError:  # the standard library's dump, a frame deeper than the parse
                raise _Refused(400, "invalid_request", TOO_DEEP) from None
        else:  # an empty key is no key (the runner ignores one), never one shared by every caller
            del headers["x-idempotency-key"]
    headers["x-request-id"] = rid
    headers["content-type"] = "application/json"
    headers["accept-encoding"] = "identity"
    active = config.active
    if active.service_token:
        headers[SERVICE_TOKEN] = active.service_token
    envelope = prepare(envelope, rid, active.timeouts.read_ms)
    try:
        return orjson.dumps(envelope), headers
    except TypeError:  # orjson.JSONEncodeError is one: beyond 64 bits, a lone surrogate, nesting
        if _too_deep(envelope):
            if sent is not None:  # the client's body nested less than MAX_DEPTH: checked before the hook
                raise ValueError(f"{HOOK_BROKE}: {TOO_DEEP}") from None
            raise _Refused(400, "invalid_request", TOO_DEEP) from None
        text = unicode_problem(envelope)
        if text:  # (the client's, as far as is known: see _sent)
            raise _Refused(400, "invalid_request", text) from None
        try:
            return _COMPACT.encode(envelope).encode(), headers  # compact_json's own fallback
        except RecursionError:
            raise _Refused(400, "invalid_request", TOO_DEEP) from None


_ABSENT = object()
HOOK_BROKE = "execute_hook returned an envelope the runner would refuse"


def _at(doc: Any, path: tuple[str | int, ...]) -> Any:
    """The value at ``path`` in ``doc`` (``_ABSENT`` where there is none)."""
    for key in path:
        if isinstance(doc, dict) and key in doc:  # noqa: SIM114 - joined, mypy sees no int index
            doc = doc[key]
        elif isinstance(doc, list) and isinstance(key, int) and key < len(doc):
            doc = doc[key]
        else:
            return _ABSENT
    return doc


def _same(sent: Any, got: Any) -> bool:
    """Equal, and of one kind: 1, 1.0 and true are three values here."""
    if isinstance(sent, (dict, list)) or isinstance(got, (dict, list)):
        return isinstance(sent, dict) == isinstance(got, dict) and sent == got
    return type(sent) is type(got) and sent == got


# The parts envelope_problem reads, and the maps within them whose entries it checks.
_CHECKED_PARTS = (("context", ("config",)), ("http", ("query", "headers")), ("limits", ()),
                  ("providers", ()), ("secret_envelope", ()), ("user", ("additional_fields",)))


def _as_checked(envelope: dict[str, Any]) -> dict[str, Any]:
    """The client's envelope as ``envelope_problem`` looks at it (a part, its fields, their
    maps' entries), copied before the hook may edit it in place: those parts and maps only,
    one pointer copy each (what else the client sent is never asked about, so it cannot
    make the copy cost more). About 3 us for a 1 KB envelope, and no second parse."""
    copy: dict[str, Any] = {}
    for name, maps in _CHECKED_PARTS:
        part = envelope.get(name, _ABSENT)
        if isinstance(part, dict):
            part = part.copy()
            for key in maps:
                value = part.get(key)
                if isinstance(value, (dict, list)):
                    part[key] = value.copy()
        elif isinstance(part, list):
            part = part.copy()
        if part is not _ABSENT:
            copy[name] = part
    return copy


def _sent(sent: dict[str, Any], envelope: dict[str, Any], path: tuple[str | int, ...]) -> bool:
    """Whether the client sent the value at fault, so that the refusal is its 400: the same
    value at ``path``; for a map's entry (``http.headers``, ``context.config``), the same
    value under the same key but for case (a hook may lower-case header names); for a
    provider, the same string anywhere in the client's list (a hook may put its own first).
    A field missing in both is the client's in a part the client sent (a client's own
    omission is never an error line in the host's log) and in a part nobody sent; in a part
    the hook wrote where the client sent none, the host's (``user`` from a session row
    without ``user_type``).

    Values are compared, not who wrote them: a hook that writes the very value the client
    sent there (both a numeric ``user_id`` 42) leaves the client's 400. (With the README's
    bridge the browser posts back the tenant, extension and hash the page was rendered
    with: a bad one the host stored is every client's 400, and only that.) Text that is not
    valid Unicode is never asked about: it is found only when orjson refuses to write the
    envelope, and is the client's 400 as before."""
    value, client = _at(envelope, path), _at(sent, path)
    if client is _ABSENT and value is _ABSENT:
        # Missing on both sides. A part nobody wrote is the client's to send. A part's field
        # (envelope_problem names no missing entry) is the client's where it sent the part,
        # whatever the hook did with it (a client's own omission must never be an error line
        # in the host's log); in a part the client never sent, the hook's.
        return len(path) == 1 or (len(path) == 2 and isinstance(path[0], str) and path[0] in sent)
    if _same(client, value):
        return True
    if len(path) == 3:
        entries = _at(sent, path[:-1])
        if isinstance(entries, dict) and isinstance(path[-1], str):
            name = path[-1].lower()
            return any(isinstance(key, str) and key.lower() == name and _same(entry, value)
                       for key, entry in entries.items())
    elif len(path) == 2 and path[0] == "providers":
        providers = _at(sent, ("providers",))
        return isinstance(providers, list) and any(_same(entry, value) for entry in providers)
    return False


def bound_idempotency_key(envelope: dict[str, Any], key: str) -> str:
    """The idempotency key the runner sees: the caller's, bound to the whole call as checked
    and bound by ``execute_hook`` (tenant, extension, install, user, the request itself), but
    for ``context.request_id``. The runner's replay cache is global: a key that another
    tenant, another user of the same tenant, or the same caller for another call happens to
    use must never replay a result that is not theirs. A retry (the same call) replays."""
    ctx = envelope["context"]
    call = {**envelope, "context": {k: v for k, v in ctx.items() if k != "request_id"}}
    try:
        canonical = orjson.dumps(call, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # what orjson refuses (integers beyond 64 bits, lone surrogates, nesting)
        if _too_deep(call):
            raise RecursionError from None
        canonical = json.dumps(call, sort_keys=True, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return hashlib.sha256(key.encode("utf-8", "surrogatepass") + b"\0" + canonical).hexdigest()


def read_body(environ: Mapping[str, Any], limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` before or while reading."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            size = int(length)
        except ValueError:
            raise _Refused(400, "invalid_request", "bad Content-Length") from None
        if size < 0:
            raise _Refused(400, "invalid_request", "bad Content-Length")
        if size > limit:
            raise _Refused(413, "payload_too_large")
        parts, got = [], 0
        while got < size:
            chunk = _read(stream, min(CHUNK, size - got))
            if not chunk:
                raise _Refused(400, "invalid_request", "body shorter than Content-Length")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if not (chunked or environ.get("wsgi.input_terminated")):
        return b""
    parts, got = [], 0
    while True:
        # Never more than one byte past the limit per read: a server's reader blocks until it
        # has what was asked for, and a body over the limit must be refused once it is.
        chunk = _read(stream, min(CHUNK, limit - got + 1))
        if not chunk:
            return b"".join(parts)
        got += len(chunk)
        if got > limit:
            raise _Refused(413, "payload_too_large")
        parts.append(chunk)


def _read(stream: Any, size: int) -> bytes:
    """``stream.read(size)``; a body the server cannot read (a bad chunk size, a client that
    left mid-body: gunicorn raises IOError or ValueError, werkzeug its own) is the client's 400."""
    try:
        data: bytes = stream.read(size)
    except MemoryError:
        raise
    except Exception as exc:
        log.info("request body unreadable: %s", type(exc).__name__)
        raise _Refused(400, "invalid_request", "request body malformed or incomplete") from None
    return data


# How "e", "r" and "o" can be written as JSON escapes: the only ways, in UTF-8, to spell
# "error" other than plainly (the reply's other escapes leave it byte for byte). All start
# with "\\u00": a reply without one is cleared by a single search.
_ERROR_LETTER_ESCAPES = (b"\\u0065", b"\\u0072", b"\\u006f", b"\\u006F")


def _map_reply(status: int, body: bytes, expose_errors: bool) -> tuple[int, bytes]:
    """The runner's transport reply -> what the client gets (see the error table)."""
    if status == 413:
        raise _Refused(413, "payload_too_large")
    if status != 200:
        # The runner answers every parsed envelope with transport 200 (the outcome is in-band).
        raise _Refused(502, "bad_gateway")
    try:
        reply = strict_json(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError and _NonFinite are ValueErrors
        raise _Refused(502, "bad_gateway") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("status"), int):
        raise _Refused(502, "bad_gateway")
    if expose_errors:
        return 200, body
    err = reply.get("error")
    code = _error_code(err)
    # The runner's bytes go out as they came unless they may hold error text: an error that
    # is more than a code, or an "error" key written twice (JSON keeps the last, the bytes
    # keep both), spelled with escapes of its letters, or in an encoding other than UTF-8
    # (where these byte tests see nothing). Else the reply is written anew from what was parsed.
    if (code == err and body[:1] == b"{" and body[1:2] != b"\x00" and body.count(b'"error"') <= 1
            and (b"\\u00" not in body or not any(escape in body for escape in _ERROR_LETTER_ESCAPES))):
        return 200, body
    if "error" in reply:
        reply["error"] = code
    try:
        return 200, compact_json(reply)
    except RecursionError:  # nested past what either encoder writes (orjson reads 1 024 levels)
        raise _Refused(502, "bad_gateway") from None


# What an error code looks like ("execute_failed", "missing_routing_headers"); anything else
# the runner says in "error" is text that may name paths and internals.
_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def _error_code(err: Any) -> str | None:
    """What callers see of the runner's ``error``: nothing; a string as it is, or its code
    when a colon follows one ("execute_failed: <details>"); ``runner_error`` for anything
    that is not a string (the contract says str or null). A string with no code before a
    colon is the extension's own error, which the runner passes through: its UI's to show."""
    if err is None:
        return None
    if isinstance(err, str):
        head = err.split(":", 1)[0].strip() if ":" in err else err
        return head if head == err or _CODE.fullmatch(head) else "runner_error"
    return "runner_error"
