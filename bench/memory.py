"""A runner in memory: every proxy's upstream connection replays nginx's recorded replies.

Use it (``python -m bench.inprocess --runner memory``) to see what each proxy's own Python
costs per request, with no upstream syscall, no loopback TCP and no nginx sharing the CPUs
(runner_mw's access lines still go to a stderr handler, here /dev/null): the
figure that moves when the hot path changes, steadier than anything with sockets on a
busy machine. ``replaying(replies)`` swaps ``socket.create_connection``, which runner_mw's
pool, werkzeug's ``http.client`` and the Python floor all connect through.
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
from collections.abc import Iterator
from typing import Any

from bench import lib


def record(nginx: lib.Nginx, execute_body: bytes) -> dict[bytes, bytes]:
    """nginx's raw replies to the two benchmark requests, by request method (nginx frames
    both with Content-Length)."""
    asset = f"GET {lib.ASSET_1K} HTTP/1.1\r\nHost: runner\r\n\r\n".encode()
    execute = (b"POST /v1/execute HTTP/1.1\r\nHost: runner\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n%s" % (len(execute_body), execute_body))
    replies = {}
    for method, request in ((b"GET", asset), (b"POST", execute)):
        with socket.create_connection(("127.0.0.1", nginx.port_a)) as sock:
            sock.sendall(request)
            reply = b""
            while b"\r\n\r\n" not in reply:
                reply += _more(sock)
            head, _, body = reply.partition(b"\r\n\r\n")
            length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            while len(body) < length:
                body += _more(sock)
        replies[method] = head + b"\r\n\r\n" + body
    return replies


def _more(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise RuntimeError("nginx closed the connection before its reply was whole")
    return data


class MemorySocket:
    """What the proxies call on a connected socket; each request gets its method's reply."""

    def __init__(self, replies: dict[bytes, bytes]) -> None:
        self.replies = replies
        self.pending = b""
        self.received = 0  # for runner_mw's TCP_INFO idle check

    def sendall(self, data: Any) -> None:
        method = bytes(data[:5]).split(b" ", 1)[0]
        if method in self.replies:  # a request head (a POST body comes on its own: ignored)
            self.pending = self.replies[method]

    def send(self, data: Any) -> int:
        self.sendall(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        data, self.pending = self.pending[:size], self.pending[size:]
        self.received += len(data)
        return data

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BytesIO:
        data, self.pending = self.pending, b""
        return io.BytesIO(data)

    def getsockopt(self, level: int, option: int, size: int = 0) -> bytes:
        info = bytearray(size)
        info[0] = 1  # TCP_ESTABLISHED
        struct.pack_into("Q", info, 128, self.received)
        return bytes(info)

    def gettimeout(self) -> float | None:
        return None

    def settimeout(self, value: float | None) -> None:
        pass

    def setsockopt(self, *args: Any) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def replaying(replies: dict[bytes, bytes]) -> Iterator[None]:
    real = socket.create_connection
    socket.create_connection = lambda *args, **kwargs: MemorySocket(replies)  # type: ignore[assignment]
    try:
        yield
    finally:
        socket.create_connection = real
