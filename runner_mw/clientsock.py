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

import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any

from runner_mw.backends.wire import timeval

_TIMEVAL_BYTES = len(timeval(1.0))


def bound_sends(environ: dict[str, Any], seconds: float) -> Callable[[], None] | None:
    """Make each write to this request's client fail once it has made no progress for
    ``seconds`` (``SO_SNDTIMEO``); returns what puts the socket's previous setting back
    (call it when the body is done: the connection may serve more requests), or None when
    the server's socket is out of reach."""
    sock = environ.get("gunicorn.socket")
    http1 = str(environ.get("SERVER_PROTOCOL", "")).startswith("HTTP/1")
    if not (http1 and isinstance(sock, socket.socket)):
        return None
    if isinstance(sock, ssl.SSLSocket):
        # TLS (gunicorn's certfile): a blocking SSL write retries the kernel's EAGAIN by itself
        # (OpenSSL's WANT_WRITE), so SO_SNDTIMEO would never end it. A Python timeout does.
        return _python_timeout(sock, seconds)
    try:
        before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(seconds))
    except OSError:  # closed already, or not a kind of socket that has the option
        return None

    def restore() -> None:
        with contextlib.suppress(OSError):  # the client is gone and the socket with it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, before)

    return restore


def _python_timeout(sock: ssl.SSLSocket, seconds: float) -> Callable[[], None] | None:
    try:
        before = sock.gettimeout()
        sock.settimeout(seconds)
    except OSError:
        return None

    def restore() -> None:
        with contextlib.suppress(OSError):
            sock.settimeout(before)

    return restore
