"""A deadline on writes to the client, where the WSGI server lets the app reach its socket.

Use ``bound_sends`` for a response body that can outgrow the kernel's socket buffers (a
streamed asset). gunicorn writes to its clients with no timeout at all: a client that
stops reading such a body (a zero TCP window, kept open) would hold a server thread, and
the runner connection feeding it, for as long as it likes; a handful of them would take
every thread and every pool slot. With the deadline, a write that makes no progress for
that long fails, gunicorn drops the connection, and the body's ``close()`` frees the rest.

Only gunicorn says where its socket is (``environ["gunicorn.socket"]``), and only HTTP/1
owns one socket per request (HTTP/2 shares it between streams): elsewhere this does
nothing, and a buffering proxy in front (the README's Deploy section) is the answer.
"""

from __future__ import annotations

import _socket
import array
import contextlib
import fcntl
import os
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

from runner_mw.backends.wire import TCP_INFO, TCP_INFO_LEN, timeval

_TIMEVAL_BYTES = len(timeval(1.0))


def bound_sends(environ: dict[str, Any], seconds: float) -> Callable[[], None] | None:
    """Make writes to this request's client fail once they have made no progress for
    ``seconds``; returns what undoes it (call it when the body is done: the connection may
    serve more requests), or None when the server's socket is out of reach."""
    sock = environ.get("gunicorn.socket")
    http1 = str(environ.get("SERVER_PROTOCOL", "")).startswith("HTTP/1")
    if not (http1 and isinstance(sock, socket.socket)):
        return None
    if isinstance(sock, ssl.SSLSocket) or not isinstance(sock, _socket.socket):
        # TLS (gunicorn's certfile): a blocking SSL write retries the kernel's EAGAIN by itself
        # (OpenSSL's WANT_WRITE), so SO_SNDTIMEO never ends it, and Python's own timeout bounds
        # a whole write waiting for a third of the send buffer (it would cut a slow reader).
        # A green socket (gevent, eventlet: socket.socket is theirs once patched) is
        # non-blocking underneath and waits in its hub, where SO_SNDTIMEO is never seen.
        return _watchdog.watch(sock, seconds)
    try:
        before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(seconds))
    except OSError:  # closed already, or not a kind of socket that has the option
        return None

    def restore() -> None:
        with contextlib.suppress(OSError):  # the client is gone and the socket with it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, before)

    return restore


_BYTES_ACKED = struct.Struct("Q").unpack_from  # tcpi_bytes_acked, at offset 120


def _progress(sock: socket.socket) -> tuple[int, int] | None:
    """(bytes the client acknowledged, bytes still queued to it), or None where the kernel
    does not say (another OS, an older kernel, a closed socket)."""
    if TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, TCP_INFO_LEN)
        queued = array.array("i", [0])
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, queued)
    except (OSError, ValueError):
        return None
    if len(info) < TCP_INFO_LEN:
        return None
    return _BYTES_ACKED(info, 120)[0], queued[0]


class _Watched:
    def __init__(self, sock: socket.socket, seconds: float, now: float) -> None:
        self.sock, self.seconds, self.since, self.acked = sock, seconds, now, -1


class _Watchdog:
    """One thread per process, running while a watched socket exists (it ends when none is
    left; the next ``watch`` starts another): a socket whose queued bytes the client has
    not taken for ``seconds`` is shut down, which fails the write blocked on it (gunicorn
    then drops the connection).

    A lock, no Condition: this object is made at import, which may come before gevent or
    eventlet patch threading, and an unpatched Condition's notify() fails under eventlet
    (its owner check asks the patched thread ident); a lock never held across anything that
    yields works either way. Reentrant: ``restore`` runs from a body's ``__del__``, which
    the collector may run on a thread that holds it (inside ``watch``'s allocations)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._watched: dict[int, _Watched] = {}
        self._thread: threading.Thread | None = None
        self._pid = 0

    def watch(self, sock: socket.socket, seconds: float) -> Callable[[], None] | None:
        if _progress(sock) is None:
            return None
        entry = _Watched(sock, seconds, time.monotonic())
        start = None
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's sockets and thread are not ours
                self._watched.clear()
                self._thread, self._pid = None, os.getpid()
            if self._thread is None:
                start = self._thread = threading.Thread(target=self._run, name="runner_mw-send-deadline",
                                                        daemon=True)
            self._watched[id(entry)] = entry
        if start is not None:  # outside the lock (see logs._start_writer)
            try:
                start.start()
            except RuntimeError:  # no thread now: no deadline for this body, the next tries again
                with self._lock:
                    self._watched.pop(id(entry), None)
                    if self._thread is start:
                        self._thread = None
                return None

        def restore() -> None:
            with self._lock:
                self._watched.pop(id(entry), None)

        return restore

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._watched:
                    self._thread = None  # the next watch() starts another
                    return
                entries = list(self._watched.copy().values())  # a restore() from a collection may pop
            time.sleep(max(0.02, min(1.0, min(e.seconds for e in entries) / 4)))
            now = time.monotonic()
            for entry in entries:
                seen = _progress(entry.sock)
                if seen is None:
                    continue
                acked, queued = seen
                if acked != entry.acked or queued == 0:  # taken, or nothing to take
                    entry.acked, entry.since = acked, now
                elif now - entry.since >= entry.seconds:
                    with self._lock:  # restore() cannot return while this runs
                        if self._watched.pop(id(entry), None) is None:
                            continue  # the body ended meanwhile: its socket is not ours now
                        # The plain socket's shutdown: SSLSocket.shutdown drops its TLS object
                        # first, and a write racing with it would go out unencrypted.
                        with contextlib.suppress(OSError):
                            socket.socket.shutdown(entry.sock, socket.SHUT_RDWR)


_watchdog = _Watchdog()
