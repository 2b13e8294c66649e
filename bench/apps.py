"""The WSGI targets the benchmark serves with gunicorn (``bench.apps:<name>``).

Every target is configured from environment variables set by ``bench/run``:
``BENCH_UPSTREAM`` (the nginx stand-in runner, ``http://127.0.0.1:PORT``) and
``BENCH_RUNNER_CONFIG`` (the YAML file runner_mw loads).
"""

from __future__ import annotations

import os
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
