"""``HTTPBackend``: talks to a runner over HTTP with one bounded keep-alive pool.

Use it as the base of any backend kind that speaks the runner's HTTP contract
(docker and knative both do). The transport is ``runner_mw.backends.wire``: a lean
pool with llhttp (httptools) parsing the replies, chosen by measurement over urllib3
and ``http.client`` (see that module). No cookie jar, no environment proxies, no
``.netrc``, no redirect following. Every transport failure becomes a
``runner_mw.errors.UpstreamError`` here or in ``wire``, nowhere else.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

from runner_mw.backends import wire
from runner_mw.backends.base import AssetResponse, ExecuteReply, RunnerBackend
from runner_mw.errors import BadGateway, RunnerTimeout, UpstreamError
from runner_mw.pid import current as current_pid

HEALTH_CONNECT_S, HEALTH_READ_S = 1.0, 2.0
REPORT_S = 10  # seconds between two "cannot reach the runner" lines of one backend
log = logging.getLogger("runner_mw")
_STRAY_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_QUERY_SAFE = "!$&'()*+,;=:@/?-._~%"  # RFC 3986 query characters, and '%' of existing escapes
_QUERY_PLAIN = re.compile(r"[A-Za-z0-9!$&'()*+,;=:@/?._~-]*")


def _query(query: str) -> str:
    """The query as the client sent it, but for what a request line cannot carry as is: a
    stray '%' becomes %25 (as any client would), and spaces, control characters and
    non-ASCII bytes are percent-encoded (existing escapes are kept, %2f stays %2f)."""
    if _QUERY_PLAIN.fullmatch(query):
        return query
    return quote(_STRAY_PERCENT.sub("%25", query), safe=_QUERY_SAFE, encoding="latin-1")


#: What can escape ``wire`` besides runner_mw's own errors: socket errors, and ValueError
#: (UnicodeError) for a header value that cannot be sent as it is. Catch these and raise
#: ``mapped(exc) from None`` (a plain ``except``: a context manager here cost 2 us a request).
UNMAPPED = (OSError, ValueError)


def mapped(exc: BaseException) -> UpstreamError:
    """runner_mw's own error for one of ``UNMAPPED`` (TimeoutError is an OSError)."""
    return RunnerTimeout() if isinstance(exc, TimeoutError) else BadGateway()


class HTTPBackend(RunnerBackend):
    """A runner reached over HTTP(S). Subclasses only name their kind and schema."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        parts = urlsplit(settings.url)
        self._tls = parts.scheme == "https"
        self._hostname = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        self._base_path = parts.path.rstrip("/")
        self._connect_s = settings.timeouts.connect_ms / 1000
        self._read_s = settings.timeouts.read_ms / 1000
        self._pool_wait_s = settings.pool_wait_ms / 1000
        # Knative's ingress routes on the Host header (``host``); otherwise the URL's authority.
        authority = f"[{self._hostname}]" if ":" in self._hostname else self._hostname
        if parts.port is not None:
            authority += f":{parts.port}"
        self._host = settings.host or authority
        self._lock = threading.Lock()
        self._reported = -float(REPORT_S)  # when the last "cannot reach" line was logged
        self._pool: wire.Pool | None = None
        self._pool_pid = 0

    # ------------------------------------------------------------------ pool

    def pool(self) -> wire.Pool:
        """The process's pool, made on first use (never inherited across a fork)."""
        pool, pid = self._pool, current_pid()
        if pool is not None and self._pool_pid == pid:
            return pool
        with self._lock:
            if self._pool is None or self._pool_pid != pid:
                self._pool = wire.Pool(self._hostname, self._port, tls=self._tls_context(),
                                       maxsize=self.settings.pool_size, wait_s=self._pool_wait_s,
                                       connect_s=self._connect_s)
                self._pool_pid = pid
            return self._pool

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self._tls:
            return None
        # Verified always (CERT_REQUIRED, hostname checked); ``ca_bundle`` replaces the system CAs.
        try:
            return ssl.create_default_context(cafile=self.settings.ca_bundle or None)
        except (OSError, ValueError) as exc:
            # A bundle broken since the load checked it (a worker takes the master's word):
            # nothing can be sent, and the operator is told why, as for a failed connect.
            why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            raise wire.NotSent(f"{self._hostname}:{self._port}: CA bundle "
                               f"{self.settings.ca_bundle or '(system)'} unusable ({why})") from None

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            pool.close()

    # ------------------------------------------------------------------ calls

    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str], *,
              read_s: float, total_s: float | None = None) -> wire.Response:
        """One request, retried only while nothing was sent and the retry budget lasts."""
        out = {"host": self._host, **headers}
        out.setdefault("accept-encoding", "identity")  # bodies pass through undecoded
        data = wire.encode_request(method, self._base_path + path, out, body)
        retry = self.settings.retry
        deadline = time.monotonic() + retry.budget_ms / 1000
        pause = retry.backoff_ms / 1000
        attempt = 1
        while True:
            try:
                return wire.request(self.pool(), method, data, read_s=read_s, total_s=total_s)
            except wire.NotSent as exc:
                if attempt >= retry.attempts or time.monotonic() + pause > deadline:
                    self._report(exc)
                    raise
            attempt += 1
            time.sleep(pause)
            pause *= 2

    def _report(self, exc: wire.NotSent) -> None:
        # The client gets runner_unreachable and the access line 502; the cause (refused,
        # DNS, TLS) is for the operator. At most one line per REPORT_S: an outage must not
        # write one per request.
        now = time.monotonic()
        if now - self._reported >= REPORT_S:
            self._reported = now
            log.warning("runner_mw: backend %r cannot reach the runner: %s (at most one such "
                        "line every %d s)", self.settings.name, exc, REPORT_S)

    def execute(self, body: bytes, headers: dict[str, str]) -> ExecuteReply:
        # read_ms is the total deadline of the reply, counted from when the request is sent
        # (connects and their retries are bounded by connect_ms and the retry budget).
        try:
            resp = self._send("POST", "/v1/execute", body, headers, read_s=self._read_s,
                              total_s=self._read_s)
            try:
                data = resp.read_all(self.settings.max_reply_bytes)
            finally:
                resp.release()
        except UNMAPPED as exc:
            raise mapped(exc) from None
        return ExecuteReply(resp.status, resp.headers, data)

    def fetch_asset(self, method: str, path: str, query: str, headers: dict[str, str]) -> AssetResponse:
        target = "/" + path + ("?" + _query(query) if query else "")
        try:
            resp = self._send(method, target, None, headers, read_s=self._read_s)
        except UNMAPPED as exc:
            raise mapped(exc) from None
        return AssetResponse(status=resp.status, headers=resp.headers,
                             chunks=_stream(resp), close=resp.release, complete=resp.finished)

    def health(self) -> dict[str, Any]:
        started = time.monotonic()
        headers = {"host": self._host}
        if self.settings.service_token:  # an authenticating ingress guards /healthz too
            headers["x-runner-service-token"] = self.settings.service_token
        try:
            data = wire.encode_request("GET", self._base_path + "/healthz", headers, None)
            # Its own short-lived connection: a probe must not wait behind a full pool.
            probe = wire.Pool(self._hostname, self._port, tls=self._tls_context(), maxsize=1,
                              wait_s=0, connect_s=HEALTH_CONNECT_S)
            try:
                resp = wire.request(probe, "GET", data, read_s=HEALTH_READ_S, total_s=HEALTH_READ_S)
                try:
                    resp.read_all(64 * 1024)
                finally:
                    resp.release()
            finally:
                probe.close()
        except Exception as exc:  # health never raises: it reports
            why = str(exc) if isinstance(exc, wire.NotSent) else ""  # the cause, ours to show
            return {"ok": False, "error": f"{type(exc).__name__}: {why}" if why else type(exc).__name__,
                    "latency_ms": round((time.monotonic() - started) * 1000, 1)}
        return {"ok": resp.status == 200, "status": resp.status,
                "latency_ms": round((time.monotonic() - started) * 1000, 1)}


def _stream(resp: wire.Response) -> Iterator[bytes]:
    try:
        # The socket's read timeout is the longest silence between pieces; a body cut
        # short raises, so the client's transfer breaks instead of ending clean.
        yield from resp.stream()
    except UNMAPPED as exc:
        raise mapped(exc) from None
