"""Stand-in runners for the test suite: the devrunner with a recorder, and raw-socket fault servers.

Use ``StandinRunner`` where a test needs a runner that answers by the contract, shows what it
received and can be told to answer otherwise; use the fault servers (``SilentRunner``,
``ResetMidBodyRunner``, ``DripRunner``, ``GarbageRunner``, ``HugeHeadersRunner``, ``NonJsonRunner``)
and ``closed_port()`` where it needs a runner that misbehaves at the socket level. Every server
listens on 127.0.0.1 on a free port, runs in daemon threads and is stopped, its connections closed,
when its ``with`` block ends::

    with StandinRunner(name="a") as runner:
        requests.get(f"{runner.url}/healthz", timeout=5)
        assert runner.received[0].raw_path == "/healthz"
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from runner_mw.devrunner import HEADER_LIST_KEY, DevServer, make_app, make_server
from runner_mw.devrunner.app import IMMUTABLE, MAX_JSON_BODY

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

HOST = "127.0.0.1"
_Server = TypeVar("_Server", bound="_RawServer")


@dataclass(frozen=True)
class Received:
    """One request as the stand-in saw it, before it answered."""

    method: str
    raw_path: str  # the request-target as sent, query included, nothing decoded
    headers: dict[str, str]  # lower-cased name -> value (repeated headers joined with ", ")
    header_list: list[tuple[str, str]]  # (name, value) as received, in order, duplicates kept
    body: bytes
    peer: tuple[str, int] = ("", 0)  # the client's address: same port = same connection
    body_unread: bool = False  # declared over the runner's 2 MiB: left unread, as the runner does

    @property
    def path(self) -> str:
        return self.raw_path.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.raw_path.partition("?")[2]


@dataclass(frozen=True)
class _Canned:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool
    delay: float


@dataclass(frozen=True)
class _Stream:
    total: int
    chunk: int
    content_type: str


def stream_pattern(total_bytes: int, chunk: int = 65536) -> Iterator[bytes]:
    """The bytes ``stream_asset`` sends: byte ``i`` is ``i % 256``, made chunk by chunk."""
    block = bytes(range(256)) * (chunk // 256 + 2)
    pos = 0
    while pos < total_bytes:
        n = min(chunk, total_bytes - pos)
        yield block[pos % 256 : pos % 256 + n]
        pos += n


def stream_digest(total_bytes: int) -> str:
    """SHA-256 hex of what ``stream_asset(path, total_bytes)`` sends, whatever its chunk size."""
    digest = hashlib.sha256()
    for part in stream_pattern(total_bytes):
        digest.update(part)
    return digest.hexdigest()


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


class StandinRunner:
    """The devrunner on a free port, recording every request, with per-test canned answers.

    ``bundles`` defaults to the shipped sample; ``name`` goes into an ``x-standin`` header on
    every response and into every execute echo (``"runner"``), to tell two stand-ins apart.
    Connections are kept alive (HTTP/1.1), as the real runner does.
    """

    def __init__(self, bundles: Path | str | None = None, *, name: str = "a") -> None:
        self.name = name
        self._app = make_app(bundles, name=name)
        self._cond = threading.Condition()
        self._received: list[Received] = []
        self._overrides: dict[str, _Canned | _Stream] = {}
        self._stopping = threading.Event()
        self._server: DevServer | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> StandinRunner:
        self._server = make_server(HOST, 0, self._wsgi).start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping.set()  # ends delays and streams early
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None, "use StandinRunner in a with block"
        return self._server.port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    # -- what it received ------------------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        """A copy of the requests received so far, oldest first."""
        with self._cond:
            return list(self._received)

    def clear(self) -> None:
        with self._cond:
            self._received.clear()

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[Received]:
        """Wait until ``count`` requests have arrived (AssertionError after ``timeout`` s)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._received) >= count, timeout):
                raise AssertionError(f"{self.name}: {len(self._received)} requests, expected {count}")
            return list(self._received)

    # -- answering otherwise ---------------------------------------------------------------------

    def respond(
        self,
        path_prefix: str,
        status: int,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        chunked: bool = False,
        delay: float = 0.0,
    ) -> None:
        """Answer requests whose raw path starts with ``path_prefix`` with exactly this.

        Headers go out as given, repeats and hop-by-hop ones included; ``Content-Length`` is
        added unless given or ``chunked`` (then the body goes out chunked). ``delay`` seconds pass
        before answering (cut short when the stand-in stops). The longest matching prefix wins.
        """
        canned = _Canned(status, list(headers), body, chunked, delay)
        with self._cond:
            self._overrides[path_prefix] = canned

    def stream_asset(
        self,
        path: str,
        total_bytes: int,
        chunk: int = 65536,
        *,
        content_type: str = "application/octet-stream",
    ) -> None:
        """Answer ``path`` (a prefix) with ``total_bytes`` made on the fly (see ``stream_pattern``)."""
        with self._cond:
            self._overrides[path] = _Stream(total_bytes, chunk, content_type)

    def reset(self) -> None:
        """Forget every ``respond``/``stream_asset``: answer by the contract again."""
        with self._cond:
            self._overrides.clear()

    # -- the WSGI side ---------------------------------------------------------------------------

    def _wsgi(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        declared = environ.get("CONTENT_LENGTH")
        unread = declared is not None and int(declared) > MAX_JSON_BODY
        body = b"" if unread else environ["wsgi.input"].read(MAX_JSON_BODY + 1)
        pairs = list(environ.get(HEADER_LIST_KEY, []))
        headers: dict[str, str] = {}
        for name, value in pairs:
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        record = Received(
            method=environ["REQUEST_METHOD"],
            raw_path=environ.get("RAW_URI") or environ.get("PATH_INFO", ""),
            headers=headers,
            header_list=pairs,
            body=body,
            peer=(environ.get("REMOTE_ADDR", ""), int(environ.get("REMOTE_PORT") or 0)),
            body_unread=unread,
        )
        with self._cond:
            self._received.append(record)
            self._cond.notify_all()
            prefixes = [p for p in self._overrides if record.path.startswith(p)]
            override = self._overrides[max(prefixes, key=len)] if prefixes else None
        if not unread:
            environ["wsgi.input"] = io.BytesIO(body)

        def start(status: str, hdrs: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, [*hdrs, ("x-standin", self.name)], exc_info)

        if isinstance(override, _Canned):
            return self._canned(override, start)
        if isinstance(override, _Stream):
            start("200 OK", [("Content-Type", override.content_type),
                             ("Content-Length", str(override.total)), ("Cache-Control", IMMUTABLE)])
            return [] if record.method == "HEAD" else self._generate(override)
        return self._app(environ, start)

    def _canned(self, canned: _Canned, start: Any) -> Iterable[bytes]:
        if canned.delay:
            self._stopping.wait(canned.delay)
        headers = list(canned.headers)
        names = {name.lower() for name, _ in headers}
        if canned.chunked and "transfer-encoding" not in names:
            headers.append(("Transfer-Encoding", "chunked"))
        elif not canned.chunked and not names & {"content-length", "transfer-encoding"}:
            headers.append(("Content-Length", str(len(canned.body))))
        start(_status_line(canned.status), headers)
        return [canned.body]

    def _generate(self, stream: _Stream) -> Iterator[bytes]:
        for part in stream_pattern(stream.total, stream.chunk):
            if self._stopping.is_set():
                return  # short body: the server closes the connection
            yield part


# -- fault servers ---------------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nobody listens on (bound, read, closed): connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _read_request(conn: socket.socket) -> bytes | None:
    """Read one request (head, then its body by Content-Length or chunked); return the head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
        if len(data) > 1 << 20:
            return data
    head, _, rest = data.partition(b"\r\n\r\n")
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    got, tail = len(rest), rest[-5:]
    while (tail != b"0\r\n\r\n") if chunked else (got < length):
        chunk = conn.recv(65536)
        if not chunk:
            break
        got, tail = got + len(chunk), (tail + chunk)[-5:]
    return head


class _RawServer:
    """A loopback listener handing each accepted connection to ``serve`` in its own thread."""

    conn_timeout = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accepted = 0

    @property
    def connections(self) -> int:
        """How many connections were accepted so far."""
        with self._lock:
            return self._accepted

    @property
    def port(self) -> int:
        assert self._listener is not None, f"use {type(self).__name__} in a with block"
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self: _Server) -> _Server:
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(1.0)  # a fallback only: __exit__ wakes accept() by connecting
        self._acceptor = threading.Thread(target=self._accept, name=type(self).__name__, daemon=True)
        self._acceptor.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._acceptor is not None:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=1.0):
                pass  # wakes accept(), which then sees the stop flag
            self._acceptor.join()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it
        for thread in threads:
            thread.join(5.0)
        for conn in conns:
            conn.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._stop.is_set():
                conn.close()
                return
            conn.settimeout(self.conn_timeout)
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            with self._lock:
                self._accepted += 1
                self._conns.append(conn)
                self._threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.serve(conn)
        except OSError:
            pass  # the client left, or we are stopping
        finally:
            conn.close()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError


class SilentRunner(_RawServer):
    """Accepts and reads, never answers: the client's read timeout must fire."""

    def serve(self, conn: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                if not conn.recv(65536):
                    return
            except TimeoutError:
                continue


class ResetMidBodyRunner(_RawServer):
    """Answers 200 with ``Content-Length: total_bytes``, sends at most half, then resets (RST)."""

    def __init__(self, total_bytes: int = 1000, *, content_type: str = "application/json") -> None:
        super().__init__()
        self.total_bytes = total_bytes
        self.content_type = content_type

    def serve(self, conn: socket.socket) -> None:
        if _read_request(conn) is None:
            return
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: {self.content_type}\r\n"
            f"Content-Length: {self.total_bytes}\r\n\r\n"
        ).encode()
        conn.sendall(head + b"x" * (self.total_bytes // 2))
        # Linger 0: close() sends RST instead of FIN, so the client sees a reset, not an EOF.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


DRIP_BODY = b'{"status":200,"headers":{},"body_b64":null,"error":null}'


class DripRunner(_RawServer):
    """Answers a valid response one byte per ``interval`` seconds (the first byte at once).

    ``head_at_once`` sends the status line and headers in one go and drips only the body, to
    test the silence allowed between body chunks rather than the wait for the response.
    """

    def __init__(
        self,
        interval: float = 1.0,
        *,
        body: bytes = DRIP_BODY,
        content_type: str = "application/json",
        head_at_once: bool = False,
    ) -> None:
        super().__init__()
        self.interval = interval
        self.body = body
        self.content_type = content_type
        self.head_at_once = head_at_once

    def serve(self, conn: socket.socket) -> None:
        if _read_request(conn) is None:
            return
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: {self.content_type}\r\n"
            f"Content-Length: {len(self.body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        data = self.body
        if self.head_at_once:
            conn.sendall(head)
        else:
            data = head + data
        for i in range(len(data)):
            conn.sendall(data[i : i + 1])
            if i + 1 < len(data) and self._stop.wait(self.interval):
                return


class GarbageRunner(_RawServer):
    """Answers a request with bytes that are not HTTP, then closes."""

    def __init__(self, payload: bytes = b"SSH-2.0-OpenSSH_9.6\r\nthis is not HTTP\r\n\r\n") -> None:
        super().__init__()
        self.payload = payload

    def serve(self, conn: socket.socket) -> None:
        if _read_request(conn) is not None:
            conn.sendall(self.payload)


class HugeHeadersRunner(_RawServer):
    """Answers 200 with more than ``header_bytes`` of headers (default 80 KiB, > 100 lines)."""

    def __init__(self, header_bytes: int = 80 * 1024, *, line_bytes: int = 512) -> None:
        super().__init__()
        self.header_bytes = header_bytes
        self.line_bytes = line_bytes

    def serve(self, conn: socket.socket) -> None:
        if _read_request(conn) is None:
            return
        lines = [b"HTTP/1.1 200 OK\r\n"]
        size = 0
        while size <= self.header_bytes:
            line = b"X-Filler-%05d: " % len(lines)
            line += b"a" * max(1, self.line_bytes - len(line) - 2) + b"\r\n"
            lines.append(line)
            size += len(line)
        lines.append(b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        conn.sendall(b"".join(lines))


class NonJsonRunner(_RawServer):
    """Answers every request 200 ``text/plain`` ``oops`` (not an execute envelope), then closes."""

    def serve(self, conn: socket.socket) -> None:
        if _read_request(conn) is not None:
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n"
                b"Connection: close\r\n\r\noops"
            )


__all__ = [
    "DRIP_BODY",
    "DripRunner",
    "GarbageRunner",
    "HugeHeadersRunner",
    "NonJsonRunner",
    "Received",
    "ResetMidBodyRunner",
    "SilentRunner",
    "StandinRunner",
    "closed_port",
    "stream_digest",
    "stream_pattern",
]
