"""The gateway's log lines: redaction of secrets, and a JSON-lines format.

Use ``setup_logging(config)`` (the middleware calls it): it adds a redacting
filter to runner_mw's loggers, and a stderr handler (text or JSON lines, per
``logging.format``) only when the host has configured no logging at all, so a
host app's own logging setup is never overridden. Every secret the gateway
knows (tokens, service tokens of the last ``KEEP_CONFIGS`` configs and of every
snapshot still serving), and anything shaped like a bearer token, cookie or
service-token header (``name: value`` lines, ``{'name': 'value'}`` reprs,
``HTTP_COOKIE``-style environ keys), is replaced by ``***`` in every record:
message, arguments, exception text and stack. ``bind_request(environ)`` adds the
credentials of the request being handled on this thread (its Authorization, its
first ``MAX_COOKIES`` cookies and the whole Cookie header, a client's service
token), so that an exception quoting one of them (a host hook's, say) is redacted too.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import contextvars
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner_mw.config import Config

LOGGERS = ("runner_mw", "runner_mw.access", "runner_mw.reload")
# Header names whose values are credentials, as written in headers (``-``) or environ keys (``_``).
_NAMES = (r"(?:http_)?(?:cookie|set[-_]cookie2?|authorization|proxy[-_]authorization"
          r"|x[-_]runner[-_]service[-_]token)")
_SHAPES = re.compile(
    # 'cookie': 'a=b' / "HTTP_AUTHORIZATION": "Bearer x" (a repr or JSON of headers or an environ)
    r"(?i)(['\"]" + _NAMES + r"['\"]\s*:\s*)(['\"])(?:\\.|(?!\2).)*\2"
    # cookie: a=b / authorization=Bearer x (header lines, key=value logs): to the end of the line
    r"|((?<![\w-])" + _NAMES + r"\s*[:=]\s*)[^\r\n]+"
    # Bearer credentials anywhere; Basic ones when they look like base64
    r"|((?<![\w-])(?:bearer\s+|basic\s+(?=[A-Za-z0-9+/]{8,}=*))(?=[^\s,;\"']))[^\s,;\"']+"
)

# Every _SHAPES match contains one of these (lower-cased).
_SHAPE_WORDS = ("bearer", "basic", "cookie", "authorization", "service")


def _hide(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        quote = match.group(2)
        return f"{match.group(1)}{quote}***{quote}"
    return (match.group(3) or match.group(4)) + "***"


# The credential headers of the request this thread (or task) handles now, as sent; see
# bind_request. Turned into the values to redact only when a line is redacted (rarely).
_request_credentials: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "runner_mw_request_credentials", default=(None, None, None, None))


def _secrets_of(authorization: Any, proxy_authorization: Any, service_token: Any,
                cookie: Any) -> tuple[str, ...]:
    """The credential values a request carries: Authorization (whole and without its
    scheme), each cookie value, a client-sent service token. Values under 4 characters
    are left out (redacting them would garble every line)."""
    found: list[str] = []
    for value in (authorization, proxy_authorization, service_token):
        if isinstance(value, str) and value.strip():
            found.append(value.strip())
            found.append(value.strip().partition(" ")[2].strip())
    if isinstance(cookie, str):
        found.append(cookie.strip())
        # A browser keeps at most 180 cookies a site: the rest of a longer header is a
        # client's own padding, not worth a search per log line each.
        for part in cookie.split(";", MAX_COOKIES)[:MAX_COOKIES]:
            found.append(part.partition("=")[2].strip().strip('"'))
    return tuple(sorted({s for s in found if len(s) >= 4}, key=len, reverse=True))


MAX_COOKIES = 256
# The last request's credentials and their values, worked out once however many lines and
# checks need them (a 740 KB Cookie header split again for each: 80 ms a request).
_request_secrets: contextvars.ContextVar[tuple[tuple[Any, ...], tuple[str, ...]] | None] = \
    contextvars.ContextVar("runner_mw_request_secrets", default=None)


def _secrets_of_request() -> tuple[str, ...]:
    raw = _request_credentials.get()
    memo = _request_secrets.get()
    if memo is None or memo[0] is not raw:
        memo = (raw, _secrets_of(*raw))
        _request_secrets.set(memo)
    return memo[1]


#: How many configs' secrets ``Redactor.remember`` keeps (the current one included).
KEEP_CONFIGS = 4


def _usable(secrets: set[str]) -> frozenset[str]:
    return frozenset(s for s in secrets if s and len(s) >= 4)  # shorter would garble every line


#: The shortest piece of a secret that ``Redactor.names_a_secret`` looks for.
PIECE = 16


def _shares_piece(text: str, secrets: str) -> bool:
    """Whether ``text`` (one line) and ``secrets`` have ``PIECE`` characters in a row in common.
    Worst case len(text) searches of ``secrets``: keep it short (not a client's header)."""
    # A common piece of 16 holds one of the text's 8-character pieces that start at a
    # multiple of 8: len(text) / 8 searches, not one per position, find the candidates.
    half = PIECE // 2
    for start in range(0, len(text) - half + 1, half):
        if text[start:start + half] in secrets:
            return any(text[i:i + PIECE] in secrets for i in range(len(text) - PIECE + 1))
    return False


def _mask(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every occurrence of every secret replaced by ``***``; where two overlap
    (neither inside the other) the union of them goes, so no part of either is left."""
    if not any(secret in text for secret in secrets):
        return text
    spans = []
    for secret in secrets:
        at = text.find(secret)
        while at >= 0:
            spans.append((at, at + len(secret)))
            at = text.find(secret, at + 1)
    spans.sort()
    pieces, pos, start, end = [], 0, *spans[0]
    for s, e in spans[1:]:
        if s <= end:
            end = max(end, e)
            continue
        pieces += [text[pos:start], "***"]
        pos, start, end = end, s, e
    pieces += [text[pos:start], "***", text[end:]]
    return "".join(pieces)


def bind_request(environ: Mapping[str, Any]) -> None:
    """Redact this request's credentials in what is logged on this thread until the next
    request (call it first thing for every request the gateway handles)."""
    get = environ.get
    _request_credentials.set((get("HTTP_AUTHORIZATION"), get("HTTP_PROXY_AUTHORIZATION"),
                              get("HTTP_X_RUNNER_SERVICE_TOKEN"), get("HTTP_COOKIE")))


class Redactor(logging.Filter):
    """Replaces known secrets and secret-shaped text in a record's final message."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: tuple[str, ...] = ()
        self._joined = ""
        self._history: collections.deque[frozenset[str]] = collections.deque(maxlen=KEEP_CONFIGS)
        self._held: dict[object, frozenset[str]] = {}
        self._released: collections.deque[object] = collections.deque()  # see release()
        self._lock = threading.Lock()

    def remember(self, secrets: set[str]) -> None:
        """Redact these (a config's) from now on, with those of the last ``KEEP_CONFIGS``
        configs and those held: a line about the previous config may still come, but a
        secret rotated hourly must not make every line and request id cost more for the
        worker's life."""
        with self._lock:
            self._drop_released()
            fresh = _usable(secrets)
            if not self._history or self._history[-1] != fresh:
                self._history.append(fresh)
            self._rebuild()

    def hold(self, owner: object, secrets: set[str]) -> None:
        """Redact these until ``release(owner)``, however many configs come since: a config
        still in use (a snapshot serving requests, another middleware's current one)."""
        with self._lock:
            self._drop_released()
            self._held[owner] = _usable(secrets)
            self._rebuild()

    def release(self, owner: object) -> None:
        """Stop holding ``owner``'s secrets. Safe in a finalizer: the garbage collector may run
        one on a thread that holds the lock (inside ``hold``'s own allocations: a worker froze
        for good), so the release is queued, and applied now only if the lock is free; else by
        whoever holds it next."""
        self._released.append(owner)
        if self._lock.acquire(blocking=False):
            try:
                if self._drop_released():
                    self._rebuild()
            finally:
                self._lock.release()

    def _drop_released(self) -> bool:
        dropped = False
        with contextlib.suppress(IndexError):
            while True:
                dropped = self._held.pop(self._released.popleft(), None) is not None or dropped
        return dropped

    def _rebuild(self) -> None:
        known = set().union(*self._history, *self._held.values())
        self._secrets = tuple(sorted(known, key=len, reverse=True))  # longest first
        self._joined = "\n".join(self._secrets)  # a line break: no piece spans two

    def redact(self, text: str) -> str:
        text = _mask(text, (*_secrets_of_request(), *self._secrets))
        # The case-insensitive regex costs ~10-20 us per line here: run it only when one of
        # the words every match contains is there. ASCII text: lower() + "in" finds what (?i)
        # finds; other text always gets the regex (re folds e.g. the Kelvin sign to "k").
        if text.isascii() and not any(word in text.lower() for word in _SHAPE_WORDS):
            return text
        return _SHAPES.sub(_hide, text)

    def names_a_secret(self, text: str) -> bool:
        """Whether ``text`` (one line) holds a credential of this request or is a piece of
        one, or has a piece of ``PIECE`` characters in common with a known secret, counting
        only secrets of ``PIECE`` characters or more (a client's request id must not carry
        the service token, whole or most of it; a UUID that is also a tracking cookie may pass)."""
        if len(text) < PIECE:
            return False
        for secret in _secrets_of_request():
            # The client's own (its headers are as long as it likes): held, or a piece of one.
            if len(secret) >= PIECE and (secret in text or text in secret):
                return True
        # The config's (short, and not the client's to choose): any common piece of PIECE.
        return _shares_piece(text, self._joined)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_runner_mw_redacted", False):
            return True  # a logger's filter and a handler's: once is enough
        try:
            message = record.getMessage()
        except Exception:  # a broken format: keep what can be shown, redacted
            message = f"{record.msg!s} {record.args!r}"
        clean = self.redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            # Exception text may quote a value; keep the type and the redacted text only.
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        setattr(record, "_runner_mw_redacted", True)  # noqa: B010 - not a LogRecord attribute
        return True


def log_checked(logger: logging.Logger, message: str) -> None:
    """Log an INFO ``message`` built only from values known to hold no secret.

    Use it on the hot path only (the access log): it skips the redaction pass, and when
    the line would reach runner_mw's own stderr handler and nothing else (the host set up
    no logging), it queues the very line that handler would write, without building a
    record, for a writer thread that writes what is queued every ``WRITE_S`` in one call
    (a write per request took the GIL away from the worker's other threads each time).
    Any other record through that handler, a flush, and the process's exit write the
    queue first, so lines stay in order. Otherwise the record goes through the logging
    module as usual: the host's handlers, filters and formatters apply.
    """
    handler = _handler
    if handler is not None and _only_ours(logger, handler):
        _queued.append(_direct_line(logger.name, message, time.time(),
                                    json_format=handler.formatter is _JSON) + handler.terminator)
        if not _writer_started:
            _start_writer()
        return
    record = logger.makeRecord(logger.name, logging.INFO, "", 0, message, (), None)
    setattr(record, "_runner_mw_redacted", True)  # noqa: B010 - not a LogRecord attribute
    logger.handle(record)


#: The longest an access line waits before it is written. An exit through Python
#: (sys.exit, the SIGTERM handlers gunicorn and the devrunner install) loses nothing; a
#: process killed by a signal it does not handle (SIGKILL; SIGTERM in a server that sets no
#: handler) loses at most this much of its access log.
WRITE_S = 0.1
_queued: collections.deque[str] = collections.deque()  # lines, appended and taken whole (GIL)
_writer_started = False  # in this process (a fork leaves the thread behind: see _forked)
_writer_lock = threading.Lock()


def _start_writer() -> None:
    global _writer_started
    # Claimed under the lock, started outside it: under gevent or eventlet, start() yields to
    # the other green threads, and one of them logging would block the whole worker on a lock
    # made before the monkey-patching (a real one), held by a green thread that cannot run.
    with _writer_lock:
        if _writer_started:
            return
        _writer_started = True
    try:
        threading.Thread(target=_write_every, name="runner_mw-access-log", daemon=True).start()
    except RuntimeError:  # no thread now (at exit, a thread limit): write at once
        with _writer_lock:
            _writer_started = False
        write_queued()


def _write_every() -> None:
    while True:
        time.sleep(WRITE_S)
        write_queued()


def write_queued() -> None:
    """Write the queued access lines through runner_mw's handler, in one call."""
    handler = _handler
    if handler is None or not _queued:
        return
    # Taken under the handler's lock: a record emitted meanwhile (which writes the queue
    # first) cannot find it emptied by us and get written before lines logged earlier.
    with handler.lock or contextlib.nullcontext():
        lines = []
        with contextlib.suppress(IndexError):
            while True:  # popleft, not a swap of the deque: an append can never fall between
                lines.append(_queued.popleft())
        if not lines:
            return
        try:
            handler.stream.write("".join(lines))
            handler.stream.flush()
        except Exception:  # a closed or broken stream: reported as the logging module would
            handler.handleError(logging.makeLogRecord({"msg": f"{len(lines)} access line(s) lost"}))


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """runner_mw's stderr handler: queued access lines go out before any other record.

    A fallback: made when the host had no logging, it stands aside once the host sets
    some up later (``logging.basicConfig()`` after the middleware was made, as waitress's
    ``serve()`` does), since the record then reaches the host's own handlers too.
    """

    def emit(self, record: logging.LogRecord) -> None:
        write_queued()
        if _TOP.propagate and _host_writes(record):
            return  # the host's handlers write it: once, in the host's format
        super().emit(record)

    def flush(self) -> None:
        write_queued()
        super().flush()


def _host_writes(record: logging.LogRecord) -> bool:
    """Whether one of the root logger's handlers will write ``record``: its level and its
    filters let it through (a NullHandler writes nothing). A host whose handlers take only
    warnings, or only its own loggers, still gets runner_mw's INFO lines from our handler.
    (The host handler's filters see the record once more when it handles it.)"""
    return any(record.levelno >= h.level and not isinstance(h, logging.NullHandler) and h.filter(record)
               for h in logging.root.handlers)


def _forked() -> None:
    # The parent's lines are the parent's; its writer thread did not come along, and the
    # lock may have been held by a thread that no longer exists here.
    global _writer_lock, _writer_started
    _queued.clear()
    _writer_lock = threading.Lock()
    _writer_started = False


atexit.register(write_queued)  # before logging's own shutdown hook: atexit runs the last first
os.register_at_fork(after_in_child=_forked)


def _only_ours(logger: logging.Logger, handler: logging.StreamHandler[Any]) -> bool:
    """Would an INFO record of ``logger`` reach ``handler`` alone, as it is set up by us?"""
    top = logger.parent
    return (not logger.handlers and logger.propagate and not logger.disabled
            and logger.filters == [REDACTOR] and top is not None and top.name == "runner_mw"
            and top.handlers == [handler] and (not top.propagate or not logging.root.handlers)
            and handler.filters == [REDACTOR] and handler.level <= logging.INFO
            and handler.formatter in (_TEXT, _JSON))


_stamp_cache: tuple[int, bool, str] = (-1, False, "")


def _direct_line(name: str, message: str, now: float, *, json_format: bool) -> str:
    """What ``_TEXT`` or ``_JSON`` would make of an INFO record of ``name`` created ``now``."""
    global _stamp_cache
    second = int(now)
    cached_second, cached_json, stamp = _stamp_cache
    if cached_second != second or cached_json != json_format:
        # strftime once a second, not once a line.
        stamp = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) if json_format
                 else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
        _stamp_cache = (second, json_format, stamp)
    msecs = int((now - second) * 1000)
    if json_format:
        return json.dumps({"time": f"{stamp}.{msecs:03d}Z", "level": "info", "logger": name,
                           "message": message}, separators=(",", ":"))
    return f"{stamp},{msecs:03d} INFO {name} {message}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text:
            doc["exception"] = record.exc_text
        elif record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, separators=(",", ":"))


REDACTOR = Redactor()
_TOP = logging.getLogger("runner_mw")
_handler: logging.StreamHandler[Any] | None = None
_TEXT = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
_JSON = JsonFormatter()


def secrets_of(config: Config) -> set[str]:
    found = set(config.access.tokens)
    found |= {b.service_token for b in config.backends.values() if b.service_token}
    return found


def redacted(text: str, *configs: Config | None) -> str:
    """``text`` with the secrets of these configs, and secret-shaped text, masked. For text
    that may quote a secret the process does not redact yet (a plugin's exception about a
    config being loaded): reload errors shown in logs and status."""
    redactor = Redactor()
    redactor.remember(set().union(*(secrets_of(c) for c in configs if c is not None)))
    return redactor.redact(text)


def setup_logging(config: Config) -> None:
    """Redact this config's secrets; give runner_mw a handler if the host has none."""
    global _handler
    REDACTOR.remember(secrets_of(config))
    # Our named loggers, and any other runner_mw.* logger made so far: a logger's filters do
    # not apply to records propagated from its children.
    names = set(LOGGERS) | {n for n in list(logging.Logger.manager.loggerDict)
                            if n.startswith("runner_mw.")}
    for name in names:
        logger = logging.getLogger(name)
        if REDACTOR not in logger.filters:
            logger.addFilter(REDACTOR)
    root = logging.getLogger()
    top = logging.getLogger("runner_mw")
    if _handler is None and not root.handlers and not top.handlers:
        _handler = _Handler()
        _handler.addFilter(REDACTOR)  # also covers runner_mw.* loggers made later
        top.addHandler(_handler)
        if top.level == logging.NOTSET:
            top.setLevel(logging.INFO)
    if _handler is not None:
        _handler.setFormatter(_JSON if config.log_format == "json" else _TEXT)
