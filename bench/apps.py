"""The WSGI targets the benchmark serves with gunicorn (``bench.apps:<name>``).

Every target is configured from environment variables set by ``bench/run``:
``BENCH_UPSTREAM`` (the nginx stand-in runner, ``http://127.0.0.1:PORT``) and
``BENCH_RUNNER_CONFIG`` (the YAML file runner_mw loads).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterable
from typing import Any

ASSET_BYTES = 1024
ENVELOPE_REPLY = b'{"status":200,"headers":{},"body_b64":"aGk=","error":null}'
_ASSET = b"/* bench */" + b"x" * (ASSET_BYTES - 12) + b"\n"


def _fallback(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    body = b"hello"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def bare(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """The ceiling: answers both routes itself, with no upstream call."""
    path = environ.get("PATH_INFO", "")
    if path == "/v1/execute":
        stream = environ["wsgi.input"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        while length > 0:
            chunk = stream.read(min(length, 65536))
            if not chunk:
                break
            length -= len(chunk)
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(ENVELOPE_REPLY)))])
        return [ENVELOPE_REPLY]
    if path.startswith("/runner/"):
        start_response("200 OK", [("Content-Type", "application/javascript"),
                                  ("Content-Length", str(len(_ASSET)))])
        return [_ASSET]
    return _fallback(environ, start_response)


def _werkzeug() -> Any:
    from werkzeug.middleware.http_proxy import ProxyMiddleware

    upstream = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:1")
    # ProxyMiddleware makes every prefix end in "/": an exact /v1/execute cannot be matched.
    return ProxyMiddleware(_fallback, {
        "/runner/": {"target": upstream + "/", "remove_prefix": True},
        "/v1/": {"target": upstream},
    })


class FloorProxy:
    """The least a Python WSGI proxy can cost here: NOT a usable proxy.

    One keep-alive socket per thread to the upstream, the request sent as fixed bytes,
    the reply cut at the blank line and read to its Content-Length; no checks, no
    timeouts, no error handling, no logging. Beside runner_mw under the same gunicorn it
    shows which part of the distance to the bare app is Python and the server (send,
    recv, the GIL between threads) and which part is what runner_mw does per request.
    """

    _KEEP = frozenset({"content-type", "content-length", "cache-control", "etag", "last-modified"})

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.address = (host, int(port))
        self.local = threading.local()

    def _roundtrip(self, data: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        sock = getattr(self.local, "sock", None)
        reply = b""
        if sock is not None:
            try:
                sock.sendall(data)
                reply = sock.recv(65536)
            except OSError:
                sock.close()
        if not reply:  # no connection yet, or nginx closed an idle one: a new one, once
            sock = self.local.sock = socket.create_connection(self.address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(data)
            reply = sock.recv(65536)
        head, _, body = reply.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers, length = [], 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            low, value = name.lower(), value.strip()
            if low == "content-length":
                length = int(value)
            if low in self._KEEP:
                headers.append((name, value))
        while len(body) < length:
            body += sock.recv(65536)
        return int(lines[0].split(" ", 2)[1]), headers, body

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/v1/execute":
            data = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            status, headers, body = self._roundtrip(
                b"POST /v1/execute HTTP/1.1\r\nHost: runner\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(data), data))
        elif path.startswith("/runner/"):
            status, headers, body = self._roundtrip(
                b"GET %s HTTP/1.1\r\nHost: runner\r\n\r\n" % path[7:].encode("latin-1"))
        else:
            return _fallback(environ, start_response)
        start_response(f"{status} X", headers)
        return [body]


def _runner_mw(wrapped: Any = _fallback) -> Any:
    from runner_mw import RunnerMiddleware

    return RunnerMiddleware(wrapped, os.environ["BENCH_RUNNER_CONFIG"])


def _flask(wrap: bool) -> Any:
    from flask import Flask

    app = Flask("bench")

    @app.get("/hello")
    def hello() -> str:
        return "hello"

    if wrap:
        app.wsgi_app = _runner_mw(app.wsgi_app)  # type: ignore[method-assign]
    return app


class _WithPid:
    """Adds ``X-Bench-Pid`` so the reload probe knows which worker answered."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        pid = str(os.getpid())

        def sr(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, [*headers, ("X-Bench-Pid", pid)], exc_info)

        return self.app(environ, sr)


_BUILDERS = {
    "werkzeug_proxy": _werkzeug,
    "floor_proxy": lambda: FloorProxy(os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:1")),
    "runner_mw": _runner_mw,
    "flask_bare": lambda: _flask(False),
    "flask_wrapped": lambda: _flask(True),
    "runner_mw_pid": lambda: _WithPid(_runner_mw()),
}


def __getattr__(name: str) -> Any:
    # Built lazily, so that importing one target never builds (or needs) the others.
    if name in _BUILDERS:
        app = _BUILDERS[name]()
        globals()[name] = app
        return app
    raise AttributeError(name)
