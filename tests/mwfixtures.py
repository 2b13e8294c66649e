"""Shared fixtures and helpers of the proxy suite: a real gateway on a loopback port.

Use it from the middleware's test modules (``test_middleware``, ``test_paths``, ``test_headers``,
``test_access``, ``test_execute``, ``test_assets``, ``test_backends``)::

    pytest_plugins = ["mwfixtures"]
    from mwfixtures import INDEX, raw_request

    def test_x(gateway):          # parametrised: docker and knative
        resp = gateway.get(INDEX + "?tenant=t1")
        assert gateway.runner.received[0].method == "GET"

``gateway`` is a ``RunnerMiddleware`` wrapping a recording WSGI app, served by werkzeug's
threaded server on a free port, in front of a ``StandinRunner``; the session keeps one per kind
(and server) and resets it for each test. ``running_gateway(...)`` builds one with other
settings for a single test. ``raw_request`` sends a request line byte for byte (requests and
urllib3 normalise ``..`` and ``%2e``, which would hide what the gateway must refuse).

(PYTEST_DONT_REWRITE: this module is imported by the test modules before pytest loads it as a
plugin; plain asserts only.)
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from requires import missing
from standin import StandinRunner

from runner_mw import RunnerMiddleware
from runner_mw.devrunner import SAMPLE_CONTENT_HASH, SAMPLE_EXTENSION_ID

HOST = "127.0.0.1"
KINDS = ("docker", "knative")
SERVERS = ("werkzeug", "waitress")
T = 10.0  # seconds: the generous client timeout of every request (a busy 2-core machine)

#: The Host header a knative backend is configured to send (its ingress routes on it).
KNATIVE_HOST = "hello.runner.example.internal"
EXT = SAMPLE_EXTENSION_ID
HASH = SAMPLE_CONTENT_HASH
TENANT = "tenant-1"
#: ``/runner/ext-ui/{ext}/{hash, colon encoded}``: the sample bundle through the gateway.
ASSET_BASE = f"/runner/ext-ui/{EXT}/{quote(HASH, safe='')}"
INDEX = f"{ASSET_BASE}/index.html"
#: What the runner is asked for INDEX (re-encoded strictly: the colon needs no escape).
UPSTREAM_INDEX = f"/ext-ui/{EXT}/{HASH}/index.html"
SERVICE_TOKEN = "svc-token-0123456789abcdef"  # configured upstream token of the shared gateways
ACCESS_TOKEN = "access-token-0123456789abcdef"

# werkzeug logs every request at INFO on its own stderr handler; keep the output readable.
logging.getLogger("werkzeug").setLevel(logging.WARNING)
logging.getLogger("waitress").setLevel(logging.ERROR)


# -- config and envelopes ----------------------------------------------------------------------


def config_for(url: str, kind: str = "docker", *, backend: Mapping[str, Any] | None = None,
               **sections: Any) -> dict[str, Any]:
    """A config mapping with one active backend ``main`` of ``kind`` at ``url``.

    A knative backend gets ``host: KNATIVE_HOST``; ``backend`` adds or overrides keys of the
    entry; ``sections`` are top-level keys (``limits=...``, ``access=...``, ``upstream=...``).
    """
    entry: dict[str, Any] = {"kind": kind, "url": url}
    if kind == "knative":
        entry["host"] = KNATIVE_HOST
    entry.update(backend or {})
    data: dict[str, Any] = {"version": 1, "backend": "main", "backends": {"main": entry}}
    data.update(sections)
    return data


def envelope(**context: Any) -> dict[str, Any]:
    """A valid execute envelope (the devrunner accepts it); ``context`` keys override."""
    return {
        "context": {"tenant_id": TENANT, "extension_id": EXT, "content_hash": HASH, **context},
        "http": {"method": "POST", "path": "/hello", "query": {"a": "1"}, "headers": {},
                 "body_b64": base64.b64encode(b"hi there").decode()},
    }


def reply_envelope(status: int = 200, error: str | None = None, body: bytes | None = b"ok") -> bytes:
    """A runner's execute reply body (transport status 200)."""
    return json.dumps({
        "status": status, "headers": {"content-type": "text/plain"},
        "body_b64": None if body is None else base64.b64encode(body).decode(), "error": error,
    }).encode()


def echo(resp: requests.Response) -> dict[str, Any]:
    """The devrunner's echo carried in a successful execute reply."""
    data = resp.json()
    assert data["status"] == 200, data
    return json.loads(base64.b64decode(data["body_b64"]))  # type: ignore[no-any-return]


# -- clients -----------------------------------------------------------------------------------


def send(method: str, url: str, **kwargs: Any) -> requests.Response:
    """One request with ``requests``, ignoring environment proxies and .netrc (tests set them)."""
    kwargs.setdefault("timeout", T)
    kwargs.setdefault("allow_redirects", False)
    with requests.Session() as session:
        session.trust_env = False
        return session.request(method, url, **kwargs)


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> Any:
        return json.loads(self.body)


def _request_bytes(method: str, target: str | bytes, headers: Sequence[tuple[str, str]],
                   body: bytes | None, port: int) -> bytes:
    names = {n.lower() for n, _ in headers}
    lines = [(method.encode() + b" " + (target if isinstance(target, bytes) else target.encode("latin-1"))
              + b" HTTP/1.1")]
    if "host" not in names:
        lines.append(f"Host: {HOST}:{port}".encode())
    if "connection" not in names:
        lines.append(b"Connection: close")
    if body is not None and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(b"Content-Length: %d" % len(body))
    lines += [f"{n}: {v}".encode("latin-1") for n, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


@contextlib.contextmanager
def raw_exchange(port: int, method: str, target: str | bytes, headers: Sequence[tuple[str, str]] = (),
                 body: bytes | None = None, timeout: float = T) -> Iterator[http.client.HTTPResponse]:
    """Send the request line exactly as given; yield the response with its body unread."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    try:
        sock.sendall(_request_bytes(method, target, headers, body, port))
        resp = http.client.HTTPResponse(sock, method=method)
        try:
            resp.begin()
            yield resp
        finally:
            resp.close()
    finally:
        sock.close()


def raw_request(port: int, method: str, target: str | bytes, headers: Sequence[tuple[str, str]] = (),
                body: bytes | None = None, timeout: float = T) -> RawResponse:
    """One request whose request line is sent byte for byte; the whole response read."""
    with raw_exchange(port, method, target, headers, body, timeout) as resp:
        data = resp.read()
        return RawResponse(resp.status, resp.reason, resp.headers, data)


def wait_until(predicate: Callable[[], Any], timeout: float = T, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy (AssertionError after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- servers -----------------------------------------------------------------------------------


@dataclass
class Served:
    url: str
    port: int
    server: str


@contextlib.contextmanager
def serve_wsgi(app: Any, server: str = "werkzeug") -> Iterator[Served]:
    """Serve a WSGI app on a free loopback port from a thread: werkzeug's threaded dev server
    (RAW_URI and REQUEST_URI set) or waitress (REQUEST_URI only). Stopped on exit."""
    if server == "werkzeug":
        from werkzeug.serving import make_server

        srv = make_server(HOST, 0, app, threaded=True)
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                  name="werkzeug-test", daemon=True)
        thread.start()
        try:
            yield Served(f"http://{HOST}:{srv.server_port}", srv.server_port, server)
        finally:
            srv.shutdown()
            thread.join(T)
            srv.server_close()
    elif server == "waitress":
        from waitress import wasyncore
        from waitress.server import create_server

        wsrv: Any = create_server(app, host=HOST, port=0, threads=8, ident="waitress-test")
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                wasyncore.loop(timeout=0.05, map=wsrv._map, use_poll=True, count=1)

        thread = threading.Thread(target=loop, name="waitress-test", daemon=True)
        thread.start()
        try:
            port = int(wsrv.effective_port)
            yield Served(f"http://{HOST}:{port}", port, server)
        finally:
            stop.set()
            thread.join(T)
            wsrv.task_dispatcher.shutdown()
            wasyncore.close_all(wsrv._map)
    else:  # pragma: no cover - a typo in a test
        raise ValueError(server)


class RecordingApp:
    """The wrapped app: a plain WSGI callable recording a copy of every environ it receives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: list[dict[str, Any]] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with self._lock:
            self.seen.append(dict(environ))
        body = json.dumps({"app": True, "path": environ.get("PATH_INFO", "")}).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body))), ("X-From-App", "yes")])
        return [body]


@dataclass
class Gateway:
    """A served ``RunnerMiddleware`` and what stands behind it."""

    url: str
    port: int
    kind: str
    server: str
    middleware: RunnerMiddleware
    app: RecordingApp
    runner: Any  # a StandinRunner, or None when built on a fault server's URL
    config: dict[str, Any] = field(repr=False)

    def reset(self) -> None:
        if self.runner is not None:
            self.runner.reset()
            self.runner.clear()
        with self.app._lock:
            self.app.seen.clear()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return send(method, self.url + path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def execute(self, body: Any = None, headers: Mapping[str, str] | None = None,
                **kwargs: Any) -> requests.Response:
        """POST /v1/execute with ``body`` (a mapping as JSON, bytes as is)."""
        if body is None:
            body = envelope()
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        return self.request("POST", "/v1/execute", data=data, headers=hdrs, **kwargs)

    def raw(self, method: str, target: str | bytes, headers: Sequence[tuple[str, str]] = (),
            body: bytes | None = None, timeout: float = T) -> RawResponse:
        return raw_request(self.port, method, target, headers, body, timeout)

    @property
    def upstream_host(self) -> str:
        """The Host header the runner must see."""
        if self.kind == "knative":
            return KNATIVE_HOST
        return f"{HOST}:{self.runner.port}"


@contextlib.contextmanager
def running_gateway(kind: str = "docker", *, server: str = "werkzeug", runner_url: str | None = None,
                    backend: Mapping[str, Any] | None = None, app: Any = None, authorize: Any = None,
                    execute_hook: Any = None, **sections: Any) -> Iterator[Gateway]:
    """A gateway in front of a fresh ``StandinRunner`` (or of ``runner_url``), for one test."""
    with contextlib.ExitStack() as stack:
        runner = None
        if runner_url is None:
            runner = stack.enter_context(StandinRunner(name=f"{kind}-runner"))
            runner_url = runner.url
        config = config_for(runner_url, kind, backend=backend, **sections)
        recorder = RecordingApp()
        mw = RunnerMiddleware(app if app is not None else recorder, config, authorize=authorize,
                              execute_hook=execute_hook, reload_signal=False)
        stack.callback(mw.close)
        served = stack.enter_context(serve_wsgi(mw, server))
        yield Gateway(served.url, served.port, kind, server, mw, recorder, runner, config)


SHARED_SECTIONS: dict[str, Any] = {
    "upstream": {"service_token": SERVICE_TOKEN},
    "timeouts": {"connect_ms": 2000, "read_ms": 10000},
}


@pytest.fixture(scope="session")
def gateways() -> Iterator[Callable[..., Gateway]]:
    """``gateways(kind, server="werkzeug")``: the session's shared gateway, reset for the caller."""
    cache: dict[tuple[str, str], Gateway] = {}
    with contextlib.ExitStack() as stack:

        def get(kind: str, server: str = "werkzeug") -> Gateway:
            if (kind, server) not in cache:
                cache[kind, server] = stack.enter_context(
                    running_gateway(kind, server=server, **SHARED_SECTIONS))
            gw = cache[kind, server]
            gw.reset()
            return gw

        yield get


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """The backend kind a test runs against: docker, then knative."""
    return str(request.param)


@pytest.fixture
def gateway(kind: str, gateways: Callable[..., Gateway]) -> Gateway:
    """The shared gateway of ``kind`` (werkzeug server), its runner and app records cleared."""
    return gateways(kind)


@pytest.fixture(scope="session")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and key for 127.0.0.1 (openssl)."""
    if shutil.which("openssl") is None:
        missing("openssl is not installed (apt-get install openssl)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key
