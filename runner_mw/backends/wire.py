"""HTTP/1.1 to the runner: a bounded keep-alive pool, framing parsed by llhttp.

Use it only through ``runner_mw.backends.http.HTTPBackend``. The reply is parsed by
httptools, the Python binding of llhttp (Node.js's HTTP parser), in its strict mode:
it refuses Content-Length together with Transfer-Encoding, duplicate or signed
Content-Length, obs-fold, bare LF, control characters and chunk-size overflow. This
module adds only what the runner contract needs on top: one ``sendall`` per request
(and, when it fails, the reply that may already have come: a 413 from the head alone),
limits on the reply head and on framing without body (trailers, chunk extensions),
``chunked`` as the only transfer coding, the deadline of every ``recv``, and a connection
kept only when its reply was read exactly to its end. No redirects, no cookies, no proxies,
no decoding of the body; the target is sent as given (already canonical and strictly
encoded by ``runner_mw.paths``).

Why not urllib3 or http.client: measured against nginx on loopback (``bench/run``,
docs/benchmarks.md), a keep-alive GET costs about 300 us through urllib3, 140 us
through ``http.client`` (its ``email`` header parser alone is a third of that) and
about 45 us here, with a C parser rather than one of ours at the trust boundary.

Errors are ``runner_mw.errors``: ``NotSent`` (a ``RunnerUnreachable``: nothing left
this process, safe to retry for any method), ``RunnerTimeout``, ``BadGateway`` and
``Overloaded`` (no connection free within the pool wait).
"""

from __future__ import annotations

import _socket
import re
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator

import httptools

from runner_mw.errors import BadGateway, Overloaded, RunnerTimeout, RunnerUnreachable, UpstreamError
from runner_mw.headers import has_ctl

MAX_HEAD = 64 * 1024  # http.client's limit on one header line; here on the whole head
MAX_HEADERS = 100  # http.client's limit too
EARLY_S = 0.5  # how long a reset send waits for the reply that caused it (see _early_reply)
MAX_FRAMING = MAX_HEAD  # chunk framing and trailers beyond 8 bytes a body byte (see stream)
_CR_LF = (b"\r", b"\n")
CHUNK = 64 * 1024
STREAM_CHUNK = 256 * 1024  # after the first piece: a quarter of the syscalls for a big asset
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SENDABLE_NAMES: set[str] = set()  # header names found to be tokens (_check_names)
_METHOD = re.compile(r"[A-Z]+")
_METHODS = frozenset({"GET", "HEAD", "POST"})  # the usual ones, without the regex


class NotSent(RunnerUnreachable):
    """Connecting failed (refused, unreachable, DNS, connect or TLS timeout): nothing of
    the request left this process."""


class _Stale(Exception):
    """A reused keep-alive connection was closed by the runner before any reply byte."""


class _Conn:
    """One connection, the timeouts last given to it (``_limit`` skips the syscall when
    the one in place already fits) and the bytes read from it (``dropped``)."""

    __slots__ = ("kernel", "plain", "received", "recv_s", "send_s", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.plain = sock.gettimeout() is None  # plain TCP (blocking), not TLS
        # Timeouts by the kernel (SO_RCVTIMEO) for a plain blocking socket; Python's own for
        # TLS, and for a green socket (gevent, eventlet: non-blocking underneath, waiting in
        # its hub, where the kernel's timeouts are never seen: a silent runner held it forever).
        self.kernel = self.plain and isinstance(sock, _socket.socket)
        self.recv_s = self.send_s = -1.0  # none set yet
        self.received = 0  # bytes recv() returned, for the TCP_INFO check

    def recv(self, size: int) -> bytes:
        data = self.sock.recv(size)
        self.received += len(data)
        return data

    def dropped(self) -> bool:
        """An idle keep-alive connection the runner closed (or wrote to): not reusable."""
        if not self.plain and self.sock.pending():  # type: ignore[attr-defined]
            # Bytes already decrypted into the TLS object (they shared a record with the end
            # of the last reply): poll() cannot see them.
            return True
        if self.plain:
            idle = tcp_idle(self.sock, self.received)
            if idle is not None:
                return not idle
        try:
            if not hasattr(select, "poll"):  # eventlet's monkey-patching removes it
                return bool(select.select([self.sock], [], [], 0)[0])
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True


TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux
TCP_INFO_LEN = 136  # up to tcpi_bytes_received (Linux 4.1): the layout only ever grows
_TCP_ESTABLISHED = 1
_BYTES_RECEIVED = struct.Struct("Q").unpack_from  # tcpi_bytes_received, at offset 128


def tcp_idle(sock: socket.socket, received: int) -> bool | None:
    """Whether a TCP connection is still open with nothing unread, from the kernel's
    TCP_INFO: ESTABLISHED (no FIN or RST came) and exactly ``received`` bytes received.
    None where TCP_INFO cannot tell (another OS, an older kernel): poll instead.

    Why not just poll: ``getsockopt`` runs with the GIL held, where ``poll`` releases it,
    and under a threaded server every release is a likely hand-off to another thread.
    """
    if TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, TCP_INFO_LEN)
    except OSError:
        return False
    if len(info) < TCP_INFO_LEN:
        return None
    return info[0] == _TCP_ESTABLISHED and _BYTES_RECEIVED(info, 128)[0] == received


class Pool:
    """Bounded keep-alive connections to one origin, for one process.

    LIFO (the most recently used socket first: the likeliest still open). ``get``
    waits at most ``wait_s`` for a free slot, then raises ``Overloaded``.

    Slots and idle connections share one lock, taken once by ``get`` and once by ``put``
    (a ``threading.BoundedSemaphore`` is Python code around a Condition: it took about
    3 us a request on its own); a Condition is waited on only when every slot is busy.
    """

    def __init__(self, host: str, port: int, *, tls: ssl.SSLContext | None, maxsize: int,
                 wait_s: float, connect_s: float) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.wait_s, self.connect_s = wait_s, connect_s
        self.maxsize = maxsize
        self._idle: list[_Conn] = []
        self._busy = 0  # slots taken: connections handed out, or being made
        self._waiting = 0  # threads waiting for a slot (notified only when there are some)
        # Reentrant: a body never closed by its server gives its connection back when it is
        # collected (assets.StreamedBody.__del__), and the collector may run that on a thread
        # inside get(), which would wait on itself for good with a plain lock. put() re-entered
        # there frees its own connection's slot: the counts stay right.
        self._lock = threading.RLock()
        self._slot_free = threading.Condition(self._lock)
        self._closed = False

    def get(self) -> tuple[_Conn, bool]:
        """A connection and whether it was used before. Raises ``Overloaded`` or ``NotSent``.

        An idle connection is reused only if nothing arrived on it while it sat in the pool:
        a close from the runner, or stray bytes (a body sent late to a HEAD, a second reply)
        that would otherwise be read as the next request's reply.
        """
        with self._lock:
            if self._busy >= self.maxsize and not self._wait_for_slot():
                raise Overloaded()
            self._busy += 1
            conn = self._idle.pop() if self._idle else None
        try:
            while True:
                if conn is None:
                    return _Conn(self._connect()), False
                if not conn.dropped():
                    return conn, True
                conn.sock.close()
                with self._lock:
                    conn = self._idle.pop() if self._idle else None
        except BaseException:
            self._free_slot()
            raise

    def _wait_for_slot(self) -> bool:
        # Called with the lock held; wait_for keeps waiting, within wait_s, after a wake-up
        # that another thread's get() won.
        self._waiting += 1
        try:
            return self._slot_free.wait_for(lambda: self._busy < self.maxsize, self.wait_s)
        except BaseException:  # KeyboardInterrupt, say: the wake-up it may have used goes on
            if self._busy < self.maxsize:
                self._slot_free.notify()
            raise
        finally:
            self._waiting -= 1

    def _free_slot(self) -> None:
        with self._lock:
            self._release_slot()

    def _release_slot(self) -> None:
        # Called with the lock held. Freeing a slot twice would let two threads share one
        # connection: refused, as BoundedSemaphore refused it.
        if self._busy <= 0:
            raise RuntimeError("pool slot released twice")
        self._busy -= 1
        if self._waiting:
            self._slot_free.notify()

    def discard_idle(self) -> None:
        """Close every idle connection (the busy ones are closed when they come back broken)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.sock.close()

    def put(self, conn: _Conn, reusable: bool) -> None:
        """Give a connection back (kept only if ``reusable``); frees its slot."""
        with self._lock:
            self._release_slot()
            if reusable and not self._closed:
                self._idle.append(conn)
                return
        conn.sock.close()

    def close(self) -> None:
        """Close the idle connections; busy ones are closed when they come back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.sock.close()

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_s)
        except OSError as exc:  # refused, unreachable, DNS failure, connect timeout
            raise NotSent(f"{self.host}:{self.port}: {_why(exc)}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                # A TCP close without TLS's close_notify must not end a body cleanly.
                sock = self.tls.wrap_socket(sock, server_hostname=self.host, suppress_ragged_eofs=False)
            else:
                # Blocking, with the kernel's per-call timeouts (``_limit``): a Python timeout
                # polls before every recv and send, one more syscall and GIL release each.
                sock.settimeout(None)
        except OSError as exc:  # TLS refused, failed to verify or timed out: nothing was sent
            sock.close()
            raise NotSent(f"{self.host}:{self.port}: TLS handshake: {_why(exc)}") from exc
        return sock


def _why(exc: OSError) -> str:
    """Why a connect failed, for the operator (a log line, the status page): the
    client is told only ``runner_unreachable``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not verified ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc})"
    if isinstance(exc, socket.gaierror):
        return f"name not resolved ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return "connect timed out"
    return exc.strerror or type(exc).__name__


class _Parse:
    """httptools' callbacks for one reply: collects the head, then the body pieces.

    The header lines are not taken one callback at a time (a Python call per line, a
    third of the parse): once llhttp has accepted a whole head, the head is cut from the
    bytes it was fed. Strict llhttp refuses bare CR or LF, obs-fold, a space before the
    colon and a name that is not a token, so in an accepted head every line ends in CRLF,
    none is empty before the last, and a line is ``name:value``: the first blank line
    ends the head, and the first colon of a line ends the name. (llhttp skips CR and LF
    before a reply; so does this.) A value loses its leading spaces and tabs, as llhttp's
    own ``on_header`` value does.
    """

    __slots__ = ("body", "body_bytes", "buffer", "done", "framed", "head_bytes", "head_done",
                 "head_start", "headers", "interim", "keep_alive", "parser", "status")

    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.buffer: bytes | bytearray = b""  # every byte fed until the head was complete
        self.head_start = 0  # where the next head starts in ``buffer`` (after interim replies)
        self.headers: list[tuple[str, str]] = []
        self.head_bytes = 0  # bytes received before the head was complete
        self.head_done = False
        self.interim = False
        self.done = False
        self.body: list[bytes] = []
        self.body_bytes = 0  # every body byte parsed so far (those handed out included)
        self.status = 0
        self.keep_alive = False
        self.framed = False  # Content-Length or chunked: an early EOF means a body cut short

    def on_message_begin(self) -> None:
        if self.done:  # bytes after a complete reply: the connection is out of step
            raise BadGateway("data after the reply")

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # only cleared once the reply is done with
        status = parser.get_status_code()
        if parser.get_http_version() not in ("1.1", "1.0"):
            raise BadGateway("not HTTP/1.x")
        buffer, start = self.buffer, self.head_start
        while buffer[start:start + 1] in _CR_LF:
            start += 1
        end = buffer.find(b"\r\n\r\n", start)
        if end < 0:  # cannot be, for a head llhttp accepted; refuse rather than guess
            raise BadGateway("reply head not found")
        self.head_start = end + 4
        head = buffer[start:end].decode("latin-1")
        low = head.lower()
        if 100 <= status < 200:  # 100 Continue, 103 Early Hints: the real reply follows
            # A 1xx has no body (RFC 9110), but llhttp reads one for a 1xx other than
            # 100-103 that gives a length; its bytes would then sit between this head and
            # the next, where the next head is looked for: refused.
            if "\r\ncontent-length:" in low or "\r\ntransfer-encoding:" in low:
                raise BadGateway("interim reply with a body")
            self.interim = True
            return
        if not 200 <= status <= 599:
            raise BadGateway("status out of range")
        lines = head.split("\r\n")
        if len(lines) > MAX_HEADERS + 1:
            raise BadGateway("too many headers")
        headers = []
        for line in lines[1:]:  # lines[0] is the status line
            name, _, value = line.partition(":")
            headers.append((name, value.lstrip(" \t")))
        if "\r\ntransfer-encoding:" in low:
            for name, value in headers:
                if name.lower() == "transfer-encoding" and value.strip().lower() != "chunked":
                    raise BadGateway("transfer coding other than chunked")
            self.framed = True
        elif "\r\ncontent-length:" in low:
            self.framed = True
        self.headers = headers
        self.status = status
        self.keep_alive = parser.should_keep_alive()
        self.head_done = True

    def on_body(self, data: bytes) -> None:
        if self.interim:  # cannot be (see on_headers_complete); refused, never read as the reply
            raise BadGateway("interim reply with a body")
        self.body.append(data)
        self.body_bytes += len(data)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
        else:
            self.done = True

    def feed(self, data: bytes) -> None:
        if self.parser is None:
            raise BadGateway("reply already released")
        if not self.head_done:
            buffer = self.buffer
            if not buffer:
                self.buffer = data  # the usual case: the whole head in one read, no copy
            else:  # a head in pieces: appended in place (a runner sending a byte at a time
                if type(buffer) is bytes:  # must not cost a copy of all before each one)
                    buffer = self.buffer = bytearray(buffer)
                buffer += data
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserUpgrade, httptools.HttpParserError) as exc:
            # Out of step from here on, even when the reply itself was complete (bytes after
            # it, "data after the reply"): the connection must never be reused.
            self.keep_alive = False
            if isinstance(exc, httptools.HttpParserUpgrade):  # a 101 (or CONNECT): never asked for
                raise BadGateway("unexpected protocol switch") from None
            raise BadGateway() from exc  # also raised for errors in our callbacks


class Response:
    """A reply whose head is read. Read the body with ``read_all`` or ``stream``, then
    always call ``release()``: the connection goes back to the pool only when the body
    was read exactly to its end and the runner keeps it open; otherwise it is closed.
    """

    def __init__(self, pool: Pool, conn: _Conn, parse: _Parse, *, head_only: bool,
                 read_s: float, deadline: float | None) -> None:
        self.status = parse.status
        self.headers = parse.headers
        self._pool, self._conn, self._parse = pool, conn, parse
        # A HEAD reply has no body, but llhttp cannot be told so (it waits for the
        # Content-Length bytes): the head is the whole reply. ``_read_head`` marks it done
        # only when nothing followed the head, so the connection can be kept.
        self._head_only = head_only
        self._released = False
        self.read_s = read_s  # the longest silence
        self.deadline = deadline  # the end of the whole call (time.monotonic), or None

    def stream(self) -> Iterator[bytes]:
        """The body in pieces: the first of about ``CHUNK`` bytes, then of about
        ``STREAM_CHUNK`` (fewer, larger reads and writes for a big body; the last piece may be
        shorter). ``read_s`` bounds each silence, ``deadline`` (when set) the whole. A body
        cut short raises ``BadGateway``."""
        parse, conn = self._parse, self._conn
        if self._head_only:
            return
        size = sum(len(p) for p in parse.body)
        target = CHUNK  # the first piece soon: the middleware waits for it before answering
        received, before = 0, parse.body_bytes
        while not parse.done:
            if size >= target:
                pieces, parse.body, size = parse.body, [], 0
                yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
                target = STREAM_CHUNK
            _arm(conn, self.read_s, self.deadline)
            data = _recv(conn, target - size if size < target else target)
            if not data:
                if parse.framed:
                    raise BadGateway("body cut short")  # before its Content-Length or last chunk
                parse.keep_alive = False  # framed by the end of the connection: complete
                break
            parse.feed(data)
            size += len(data)  # an upper bound of the body bytes it held (chunk sizes aside)
            received += len(data)
            if received - (parse.body_bytes - before) > MAX_FRAMING + 8 * parse.body_bytes:
                # Chunk sizes, extensions and trailers with no body to show for them: a runner
                # sending trailers or an extension without end keeps bytes coming, so read_s
                # never fires (one-byte chunks cost 5 bytes of framing a byte: allowed).
                raise BadGateway("reply framing without a body")
        if parse.body:
            pieces, parse.body = parse.body, []
            yield pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def finished(self) -> bool:
        """Whether ``stream`` has handed out the whole body (nothing is left to read)."""
        return self._head_only or (self._parse.done and not self._parse.body)

    def read_all(self, cap: int) -> bytes:
        """The whole body, at most ``cap`` bytes (else ``BadGateway``), within the deadline."""
        parts: list[bytes] = []
        size = 0
        for piece in self.stream():
            size += len(piece)
            if size > cap:
                raise BadGateway()
            parts.append(piece)
        return b"".join(parts)

    def release(self) -> None:
        """Back to the pool if complete and reusable, else closed. Idempotent."""
        if self._released:
            return
        self._released = True
        parse = self._parse
        reusable = parse.done and parse.keep_alive and not parse.body
        parse.parser = None  # break the parser <-> callbacks cycle now, not at the next GC
        self._pool.put(self._conn, reusable)


def encode_request(method: str, target: str, headers: dict[str, str], body: bytes | None) -> bytes:
    """The request head (and body) as one buffer. ``headers`` must include ``host``.
    Raises ``ValueError`` for a name that is not a token, or a value with a control
    character other than HTAB (RFC 9110): the allow-lists should have dropped them, and
    a header must never split in two."""
    # Visible ASCII only in the target ("/[!-~]*"): isascii() and isprintable() leave the space.
    if not (target[:1] == "/" and target.isascii() and target.isprintable() and " " not in target
            and (method in _METHODS or _METHOD.fullmatch(method))):
        raise ValueError("request line not fit to send")
    # Checked in bulk, not header by header (this runs on every request): every name a
    # token (names seen before are in a set), no control character in the values but HTAB.
    if not _SENDABLE_NAMES.issuperset(headers):
        _check_names(headers)
    if has_ctl(" ".join(headers.values())):  # a space joins them: it is allowed
        raise ValueError("header value not fit to send")
    fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    length = "" if body is None else f"content-length: {len(body)}\r\n"
    data = f"{method} {target} HTTP/1.1\r\n{fields}{length}\r\n".encode("latin-1")  # else ValueError
    return data + body if body else data


def _check_names(headers: dict[str, str]) -> None:
    for name in headers:
        if not _TOKEN.fullmatch(name):
            raise ValueError("header name not fit to send")
    if len(_SENDABLE_NAMES) < 1024:  # bounded: x-alga-* names are the client's choice
        _SENDABLE_NAMES.update(headers)


def request(pool: Pool, method: str, data: bytes, *, read_s: float,
            total_s: float | None = None) -> Response:
    """Send one encoded request (``encode_request``) and read the reply head.

    ``read_s`` bounds every wait for bytes and the whole reply head; ``total_s``, when
    given, bounds everything after the connect, body included (``Response.deadline``).
    A reused connection that the runner
    closed before any reply byte is replaced once for GET and HEAD (never for POST:
    the runner may have acted on it).
    """
    retry_stale = method in ("GET", "HEAD")
    for attempt in (1, 2):
        conn, reused = pool.get()
        started = time.monotonic()
        deadline = None if total_s is None else started + total_s
        try:
            _limit(conn, read_s if total_s is None else min(read_s, total_s), send=True)
            try:
                _send_all(conn, data, deadline)
            except (TimeoutError, BlockingIOError):  # it stopped reading: had it answered?
                parse = _early_reply(conn, method, 0.05)
                if parse is None:
                    raise RunnerTimeout() from None
            except OSError:  # reset or broken pipe: the runner dropped an idle connection
                if reused and retry_stale and attempt == 1:
                    raise _Stale() from None
                parse = _early_reply(conn, method, EARLY_S)
                if parse is None:
                    raise BadGateway() from None
            else:
                # The head must come whole within read_s (or the total deadline): a runner
                # dripping it byte by byte cannot hold a pool slot for long.
                head_by = started + read_s if deadline is None else min(deadline, started + read_s)
                parse = _read_head(conn, read_s, head_by, stale_ok=reused and retry_stale and attempt == 1,
                                   head_only=method == "HEAD")
        except _Stale:
            # The runner (or a proxy in front) dropped it while idle: it likely dropped the
            # others idle beside it too (a restart). The retry goes on a new connection.
            pool.put(conn, False)
            pool.discard_idle()
            continue
        except BaseException:
            pool.put(conn, False)
            raise
        return Response(pool, conn, parse, head_only=method == "HEAD", read_s=read_s, deadline=deadline)
    raise BadGateway()


def _early_reply(conn: _Conn, method: str, wait_s: float) -> _Parse | None:
    """The reply a runner sent before it had read the whole request, then reset the
    connection or stopped reading (a 413 decided from the head alone, as a body limit
    does): what arrived within ``wait_s``, or None. The connection is never reused."""
    try:
        parse = _read_head(conn, wait_s, time.monotonic() + wait_s, stale_ok=False,
                           head_only=method == "HEAD")
    except UpstreamError:
        return None
    parse.keep_alive = False
    return parse


def _send_all(conn: _Conn, data: bytes, deadline: float | None) -> None:
    """``sendall``, but within ``deadline``: a runner reading slowly but steadily would keep
    a plain ``sendall`` going, each ``send`` making a little progress within its timeout."""
    if deadline is None:
        conn.sock.sendall(data)
        return
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        _limit(conn, left, send=True)
        view = view[conn.sock.send(view):]


def _read_head(conn: _Conn, read_s: float, deadline: float | None, *, stale_ok: bool,
               head_only: bool) -> _Parse:
    parse = _Parse()
    while not parse.head_done:
        _arm(conn, read_s, deadline)
        try:
            # Never past MAX_HEAD + 1 bytes while the head is incomplete: a head that
            # completes within what was read is at most MAX_HEAD long.
            data = conn.recv(min(CHUNK, MAX_HEAD + 1 - parse.head_bytes))
        except (TimeoutError, BlockingIOError):  # BlockingIOError: the kernel's timeout
            raise RunnerTimeout() from None
        except OSError:  # a reset before any reply byte is a stale connection too
            data = b""
        if not data:
            if stale_ok and parse.head_bytes == 0:
                raise _Stale()
            raise BadGateway()  # closed before the reply head
        parse.head_bytes += len(data)
        parse.feed(data)
        if not parse.head_done and parse.head_bytes > MAX_HEAD:
            raise BadGateway("reply head too long")  # (interim replies count too)
    if head_only:
        # llhttp (strict) allows no CR or LF inside a header line, so the first blank line
        # ends the head. Complete only if it is all we got and no interim reply came first.
        received = parse.buffer
        parse.done = received.find(b"\r\n\r\n") + 4 == len(received)
        parse.body.clear()
    if head_only or parse.status in (204, 304):
        # No body by its framing, yet a runner may send one (a HEAD answered like a GET, in a
        # second write that Nagle holds back until our next request's ACK): bytes that come
        # after the next request went out, where Pool.get's idle check cannot see them, and
        # would be read as its reply. Rare on this route (assets are immutable): not reused.
        parse.keep_alive = False
    parse.buffer = b""  # the head is read: the bytes need not stay
    return parse


def _recv(conn: _Conn, size: int) -> bytes:
    try:
        return conn.recv(size)
    except (TimeoutError, BlockingIOError):
        raise RunnerTimeout() from None
    except OSError:  # reset, or a TLS record that does not decrypt
        raise BadGateway() from None


def _arm(conn: _Conn, read_s: float, deadline: float | None) -> None:
    """Make the next blocking call end by ``deadline`` (and wait at most ``read_s``): a
    runner dripping a byte at a time cannot stretch a call past it (socket timeouts bound
    each call, not their sum)."""
    if deadline is None:
        _limit(conn, read_s)
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise RunnerTimeout()
    _limit(conn, min(left, read_s))


# A timeout in place that ends no earlier than asked and at most this much later is kept:
# a call then costs no syscall (a request's deadlines are almost equal to the last one's).
# Below the kernel's own timer granularity (a jiffy, 1-10 ms).
SLACK_S = 0.001


def _limit(conn: _Conn, seconds: float, *, send: bool = False) -> None:
    """The longest any one recv (and with ``send``, send) on ``conn`` may wait."""
    keep_recv = seconds <= conn.recv_s <= seconds + SLACK_S
    if conn.kernel:
        if not keep_recv:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(seconds))
            conn.recv_s = seconds
        if send and not seconds <= conn.send_s <= seconds + SLACK_S:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(seconds))
            conn.send_s = seconds
    elif not keep_recv:  # TLS or a green socket: one Python timeout for both directions
        conn.sock.settimeout(seconds)
        conn.recv_s = conn.send_s = seconds


def timeval(seconds: float) -> bytes:
    """``seconds`` as the ``struct timeval`` that ``SO_RCVTIMEO`` / ``SO_SNDTIMEO`` take."""
    whole = int(seconds)
    return struct.pack("ll", whole, max(1, int((seconds - whole) * 1_000_000)))  # 0 is "never"
