"""``HTTPBackend``: talks to a runner over HTTP with one bounded keep-alive pool.

Use it as the base of any backend kind that speaks the runner's HTTP contract
(docker and knative both do). It uses urllib3 (requests' own transport) directly:
requests' per-call overhead is measurable on the hot path, and urllib3 gives the
same pooling with no cookie jar, no environment proxies, no ``.netrc`` and no
redirect following. Every urllib3/socket exception is mapped to a
``runner_mw.errors.UpstreamError`` here and nowhere else.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import urllib3
import urllib3.connection
from urllib3.exceptions import (
    ConnectTimeoutError,
    EmptyPoolError,
    HTTPError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from runner_mw.backends.base import AssetResponse, ExecuteReply, RunnerBackend
from runner_mw.backends.deadline import WATCHDOG
from runner_mw.errors import (
    BadGateway,
    Overloaded,
    RunnerTimeout,
    RunnerUnreachable,
    UpstreamError,
)

CHUNK = 64 * 1024
_STRAY_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
HEALTH_TIMEOUT = urllib3.Timeout(connect=1.0, read=2.0)
# Raised before a single byte of the request left: safe to retry for any method.
_NOT_SENT = (NewConnectionError, NameResolutionError, ConnectTimeoutError)


# The deadline of the execute call running on this thread (None: no hard deadline).
_call = threading.local()


class _DeadlineMixin:
    """Arms the watchdog once the request is sent: from then on, waiting for and reading
    the reply cannot outlive the read deadline, however slowly the runner drips. (The
    connect, and retries of connects, are bounded by connect_ms and the retry budget.)"""

    sock: Any

    def getresponse(self) -> Any:
        read_s = getattr(_call, "read_s", None)
        if read_s is not None and self.sock is not None:
            _call.deadline = time.monotonic() + read_s
            _call.token = WATCHDOG.watch(_call.deadline, self.sock)
        return super().getresponse()  # type: ignore[misc]


def _disarm() -> bool:
    """Disarm this thread's deadline; True when it had fired (the reply was too slow)."""
    token = getattr(_call, "token", None)
    fired = WATCHDOG.cancel(token) if token is not None else False
    _call.token = None
    _call.fired = getattr(_call, "fired", False) or fired
    return fired


class _HTTPConnection(_DeadlineMixin, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineMixin, urllib3.connection.HTTPSConnection):
    pass


@contextmanager
def mapped_errors() -> Iterator[None]:
    """Translate transport exceptions into runner_mw's own (see ``runner_mw.errors``)."""
    try:
        yield
    except UpstreamError:
        raise
    except EmptyPoolError:
        raise Overloaded() from None
    except _NOT_SENT:
        raise RunnerUnreachable() from None
    except ReadTimeoutError:
        raise RunnerTimeout() from None
    except SSLError:
        raise RunnerUnreachable() from None
    except (ProtocolError, HTTPError, OSError, ValueError, UnicodeError):
        # ValueError/UnicodeError: a header value http.client cannot encode, or garbage.
        raise BadGateway() from None


class HTTPBackend(RunnerBackend):
    """A runner reached over HTTP(S). Subclasses only name their kind and schema."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        parts = urlsplit(settings.url)
        self._base_path = parts.path.rstrip("/")
        self._connect_s = settings.timeouts.connect_ms / 1000
        self._read_s = settings.timeouts.read_ms / 1000
        self._pool_wait_s = settings.pool_wait_ms / 1000
        # Made once: urllib3 clones it per request anyway (Timeout objects are immutable to us).
        self._timeout = urllib3.Timeout(connect=self._connect_s, read=self._read_s)
        # The Host header routes through a Knative ingress; otherwise urllib3 sends the URL's.
        self._host_header = {"host": settings.host} if settings.host else {}
        self._lock = threading.Lock()
        self._pool: urllib3.HTTPConnectionPool | None = None
        self._pool_pid = 0

    # ------------------------------------------------------------------ pool

    def pool(self) -> urllib3.HTTPConnectionPool:
        """The process's pool, made on first use (never inherited across a fork)."""
        pool, pid = self._pool, os.getpid()
        if pool is not None and self._pool_pid == pid:
            return pool
        with self._lock:
            if self._pool is None or self._pool_pid != pid:
                kwargs: dict[str, Any] = {
                    "maxsize": self.settings.pool_size,
                    "block": True,  # a bounded pool: waiting callers queue, then 503
                    "timeout": self._timeout,
                    "retries": False,
                }
                if self.settings.url.startswith("https:"):
                    kwargs["cert_reqs"] = "CERT_REQUIRED"
                    if self.settings.ca_bundle:
                        kwargs["ca_certs"] = self.settings.ca_bundle
                pool = urllib3.connection_from_url(self.settings.url, **kwargs)
                pool.ConnectionCls = (_HTTPSConnection if isinstance(pool, urllib3.HTTPSConnectionPool)
                                      else _HTTPConnection)
                self._pool = pool
                self._pool_pid = pid
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            pool.close()

    # ------------------------------------------------------------------ calls

    def _urlopen(self, method: str, path: str, body: bytes | None, headers: dict[str, str],
                 timeout: urllib3.Timeout) -> urllib3.BaseHTTPResponse:
        """One request, retried only while nothing was sent and the retry budget lasts."""
        retry = self.settings.retry
        deadline = time.monotonic() + retry.budget_ms / 1000
        pause = retry.backoff_ms / 1000
        attempt = 1
        while True:
            try:
                return self.pool().urlopen(
                    method, self._base_path + path, body=body, headers={**headers, **self._host_header},
                    timeout=timeout, retries=False, redirect=False, preload_content=False,
                    decode_content=False, release_conn=False, pool_timeout=self._pool_wait_s,
                    assert_same_host=False,
                )
            except _NOT_SENT:
                if attempt >= retry.attempts or time.monotonic() + pause > deadline:
                    raise
            attempt += 1
            time.sleep(pause)
            pause *= 2

    def execute(self, body: bytes, headers: dict[str, str]) -> ExecuteReply:
        _call.read_s, _call.token, _call.fired = self._read_s, None, False
        _call.deadline = time.monotonic() + self._connect_s + self._read_s  # until the send
        try:
            with mapped_errors():
                resp = self._urlopen("POST", "/v1/execute", body, headers,
                                     self._timeout)
                try:
                    data = self._read_capped(resp, _call.deadline)
                except BaseException:
                    resp.close()
                    raise
                finally:
                    _disarm()  # before the connection goes back to the pool
                    resp.release_conn()
        except UpstreamError:
            if _disarm() or _call.fired:
                raise RunnerTimeout() from None  # the watchdog cut a reply that was too slow
            raise
        finally:
            _disarm()
            _call.read_s = _call.deadline = None
        return ExecuteReply(resp.status, list(resp.headers.items()), data)

    def _read_capped(self, resp: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        """Read the whole reply within the total deadline and the reply size cap."""
        cap = self.settings.max_reply_bytes
        parts: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunnerTimeout()
            sock = getattr(getattr(resp, "connection", None), "sock", None)
            if sock is not None:
                # Each read waits at most for what is left of the total deadline.
                sock.settimeout(remaining)
            chunk = resp.read(CHUNK)
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > cap:
                raise BadGateway()
            parts.append(chunk)

    def fetch_asset(self, method: str, path: str, query: str, headers: dict[str, str]) -> AssetResponse:
        # A stray '%' would make urllib3 re-encode the whole query (%2F -> %252F): escape
        # only that, so the query reaches the runner with the meaning the client gave it.
        target = "/" + path + ("?" + _STRAY_PERCENT.sub("%25", query) if query else "")
        with mapped_errors():
            resp = self._urlopen(method, target, None, headers,
                                 self._timeout)
        return AssetResponse(
            status=resp.status,
            headers=list(resp.headers.items()),
            chunks=self._stream(resp, method),
            close=lambda: _finish(resp, method),
        )

    def _stream(self, resp: urllib3.BaseHTTPResponse, method: str) -> Iterator[bytes]:
        if method == "HEAD" or resp.status in (204, 304):
            return
        with mapped_errors():
            # The socket's read timeout is the longest silence between chunks; a body cut
            # short raises (urllib3 enforces Content-Length), so the client's transfer breaks.
            yield from resp.stream(CHUNK, decode_content=False)

    def health(self) -> dict[str, Any]:
        started = time.monotonic()
        try:
            headers = dict(self._host_header)
            if self.settings.service_token:  # an authenticating ingress guards /healthz too
                headers["x-runner-service-token"] = self.settings.service_token
            resp = self.pool().urlopen("GET", self._base_path + "/healthz",
                                       headers=headers, timeout=HEALTH_TIMEOUT,
                                       retries=False, redirect=False, pool_timeout=self._pool_wait_s,
                                       assert_same_host=False)
        except Exception as exc:  # health never raises: it reports
            return {"ok": False, "error": type(exc).__name__,
                    "latency_ms": round((time.monotonic() - started) * 1000, 1)}
        return {"ok": resp.status == 200, "status": resp.status,
                "latency_ms": round((time.monotonic() - started) * 1000, 1)}


def _finish(resp: urllib3.BaseHTTPResponse, method: str) -> None:
    """Give the connection back: reusable if the body was read to the end, else closed."""
    bodiless = method == "HEAD" or resp.status in (204, 304)
    if not resp.closed and not bodiless and not _fully_read(resp):
        resp.close()  # never reuse a connection with unread bytes on it
    resp.release_conn()


def _fully_read(resp: urllib3.BaseHTTPResponse) -> bool:
    fp = getattr(resp, "_fp", None)
    return fp is None or bool(getattr(fp, "isclosed", lambda: False)())
