"""HTTPBackend (docker and knative) used directly, and the behaviour the middleware gets from it:
pooling, no cookie jar, no environment proxies, no redirects, bounded retries, TLS, ui_url, health."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import pytest
from mwfixtures import (
    EXT,
    HASH,
    HOST,
    INDEX,
    KNATIVE_HOST,
    SERVICE_TOKEN,
    TENANT,
    T,
    config_for,
    envelope,
    reply_envelope,
    running_gateway,
    send,
    wait_until,
)
from standin import GarbageRunner, SilentRunner, StandinRunner, closed_port

from runner_mw.backends import RunnerBackend, build_backend
from runner_mw.backends.docker import DockerBackend
from runner_mw.backends.knative import KnativeBackend
from runner_mw.devrunner import make_app, make_server
from runner_mw.errors import BadGateway, RunnerTimeout, RunnerUnreachable, UpstreamError
from runner_mw.loader import config_from_mapping

pytest_plugins = ["mwfixtures"]

BODY = json.dumps(envelope()).encode()
HEADERS = {"content-type": "application/json", "x-alga-tenant": TENANT, "x-alga-extension": EXT}


@contextlib.contextmanager
def backend_for(url: str, kind: str = "docker", **config: Any) -> Iterator[RunnerBackend]:
    cfg = config_from_mapping(config_for(url, kind, **config))
    backend = build_backend(cfg.active)
    try:
        yield backend
    finally:
        backend.close()


def fetch(backend: RunnerBackend, path: str, method: str = "GET", query: str = "",
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    resp = backend.fetch_asset(method, path, query, headers or {})
    try:
        body = b"".join(resp.chunks)
    finally:
        resp.close()
    return resp.status, {k.lower(): v for k, v in resp.headers}, body


ASSET = f"ext-ui/{EXT}/{HASH}/index.html"


# -- kinds and defaults ----------------------------------------------------------------------------


def test_kinds_build_their_own_class_with_their_defaults() -> None:
    with backend_for("http://127.0.0.1:8085") as docker, backend_for("http://runner.svc", "knative") as kn:
        assert isinstance(docker, DockerBackend) and isinstance(kn, KnativeBackend)
        assert docker.settings.retry.attempts == 1  # a local container that refuses is down
        assert kn.settings.retry.attempts == 3 and kn.settings.retry.budget_ms == 10000
        assert docker.settings.public_base == kn.settings.public_base == "/runner"
        assert kn.settings.host == KNATIVE_HOST
        assert docker.metadata() == {"name": "main", "kind": "docker", "url": "http://127.0.0.1:8085",
                                     "public_base": "/runner"}


def test_metadata_never_shows_the_service_token(kind: str) -> None:
    with backend_for("http://127.0.0.1:9", kind, upstream={"service_token": SERVICE_TOKEN}) as backend:
        assert SERVICE_TOKEN not in json.dumps(backend.metadata())
        assert SERVICE_TOKEN not in repr(backend.settings)


def test_the_constructor_does_no_io() -> None:
    with SilentRunner() as silent, backend_for(silent.url):
        pass
    assert silent.connections == 0


# -- the pool --------------------------------------------------------------------------------------


def test_connections_are_kept_alive_and_reused(kind: str) -> None:
    with StandinRunner() as runner, backend_for(runner.url, kind) as backend:
        for _ in range(3):
            assert backend.execute(BODY, dict(HEADERS)).status == 200
        for _ in range(2):
            status, _, body = fetch(backend, ASSET, query="tenant=t1")
            assert status == 200 and body
        assert len({r.peer for r in runner.received}) == 1
        assert all(r.headers["host"] == (KNATIVE_HOST if kind == "knative" else f"{HOST}:{runner.port}")
                   for r in runner.received)


@pytest.mark.parametrize("method", ["HEAD", "GET-304"])
def test_bodiless_replies_are_answered_and_their_connection_is_not_reused(kind: str, method: str) -> None:
    # A runner may send bytes after a bodiless reply once the next request came (tests/test_wire.py):
    # its connection is closed after it, the GET's before it is reused once.
    with StandinRunner() as runner, backend_for(runner.url, kind) as backend:
        etag = fetch(backend, ASSET, query="tenant=t1")[1]["etag"]
        for _ in range(3):
            if method == "HEAD":
                status = fetch(backend, ASSET, "HEAD", "tenant=t1")[0]
            else:
                status = fetch(backend, ASSET, query="tenant=t1", headers={"if-none-match": etag})[0]
            assert status == (200 if method == "HEAD" else 304)
        peers = [r.peer for r in runner.received]
        assert peers[1] == peers[0] and len(set(peers)) == 3


def test_close_releases_and_a_later_call_reopens(kind: str) -> None:
    with StandinRunner() as runner, backend_for(runner.url, kind) as backend:
        assert backend.execute(BODY, dict(HEADERS)).status == 200
        backend.close()
        backend.close()  # idempotent
        assert backend.execute(BODY, dict(HEADERS)).status == 200
        first, second = (r.peer for r in runner.received)
        assert first != second


def test_a_full_pool_answers_503_overloaded(kind: str) -> None:
    with SilentRunner() as silent, running_gateway(
            kind, runner_url=silent.url, upstream={"pool_size": 1, "pool_wait_ms": 200},
            timeouts={"read_ms": 10000}) as gw:
        results: list[Any] = []
        holder = threading.Thread(target=lambda: results.append(gw.execute(timeout=30)), daemon=True)
        holder.start()
        wait_until(lambda: silent.connections == 1, what="the first call to hold the connection")
        started = time.monotonic()
        resp = gw.execute()
        assert resp.status_code == 503 and resp.json()["error"] == "overloaded"
        assert resp.headers["Retry-After"] == "1"
        assert time.monotonic() - started < 5
        asset = gw.get(INDEX)
        assert asset.status_code == 503 and asset.headers["Retry-After"] == "1"
        assert silent.connections == 1
        silent.__exit__(None, None, None)  # cut the held call short
        holder.join(T)
        assert not holder.is_alive() and results[0].status_code in (502, 504)


# -- no cookie jar, no environment, no redirects ---------------------------------------------------


def test_runner_cookies_are_never_sent_back(kind: str) -> None:
    with StandinRunner() as runner, backend_for(runner.url, kind) as backend:
        runner.respond("/", 200, [("Content-Type", "application/json"),
                                  ("Set-Cookie", "sid=runner-1; Path=/")], reply_envelope())
        for _ in range(2):
            assert backend.execute(BODY, dict(HEADERS)).status == 200
            fetch(backend, ASSET)
        assert all("cookie" not in r.headers for r in runner.received)


def test_environment_proxies_and_netrc_are_ignored(kind: str, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    bogus = f"http://{HOST}:{closed_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, bogus)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / ".netrc"
    netrc.write_text(f"machine {HOST} login user password netrc-secret\n"
                     f"machine {KNATIVE_HOST} login user password netrc-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    with running_gateway(kind) as gw:
        assert gw.middleware.store.current.backend.execute(BODY, dict(HEADERS)).status == 200
        assert gw.execute().status_code == 200
        assert gw.get(INDEX + "?tenant=t1").status_code == 200
        for got in gw.runner.received:
            assert got.raw_path.startswith("/")  # origin-form: not a request to a proxy
            assert "authorization" not in got.headers and "proxy-authorization" not in got.headers


def test_redirects_are_never_followed(kind: str) -> None:
    with StandinRunner() as runner, backend_for(runner.url, kind) as backend:
        runner.respond("/v1/execute", 307, [("Location", "/v1/elsewhere")])
        runner.respond("/ext-ui/", 302, [("Location", "/ext-ui/other/index.html")])
        assert backend.execute(BODY, dict(HEADERS)).status == 307
        status, headers, _ = fetch(backend, ASSET)
        assert status == 302 and headers["location"] == "/ext-ui/other/index.html"
        assert [r.path for r in runner.received] == ["/v1/execute", "/" + ASSET]


def test_an_execute_redirect_reaches_the_client_as_502(kind: str) -> None:
    with running_gateway(kind) as gw:
        gw.runner.respond("/v1/execute", 302, [("Location", "http://evil.example/v1/execute")])
        resp = gw.execute()
        assert resp.status_code == 502 and "Location" not in resp.headers
        assert len(gw.runner.received) == 1


# -- retries: never after sending, bounded before ---------------------------------------------------


def test_knative_retries_a_refused_connect_within_its_attempts() -> None:
    url = f"http://{HOST}:{closed_port()}"
    with backend_for(url, "knative", backend={"retry": {"attempts": 2, "backoff_ms": 300}}) as backend:
        started = time.monotonic()
        with pytest.raises(RunnerUnreachable):
            backend.execute(BODY, dict(HEADERS))
        elapsed = time.monotonic() - started
    assert 0.25 < elapsed < 0.25 + 0.6 + 0.6, elapsed  # one pause of 0.3 s, not two (0.3 + 0.6)


def test_knative_retries_stop_at_the_time_budget() -> None:
    url = f"http://{HOST}:{closed_port()}"
    retry = {"attempts": 10, "backoff_ms": 100, "budget_ms": 700}  # unbounded: 51 s of pauses
    with backend_for(url, "knative", backend={"retry": retry}) as backend:
        started = time.monotonic()
        with pytest.raises(RunnerUnreachable):
            fetch(backend, ASSET)
        elapsed = time.monotonic() - started
    assert 0.25 < elapsed < 2.0, elapsed


def test_docker_does_not_retry() -> None:
    url = f"http://{HOST}:{closed_port()}"
    times = []
    with backend_for(url, "docker") as backend:
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(RunnerUnreachable):
                backend.execute(BODY, dict(HEADERS))
            times.append(time.monotonic() - started)
    assert min(times) < 0.09, times  # the 100 ms default backoff never ran


class LateRunner:
    """A devrunner that starts listening on a reserved port ``delay`` seconds after ``start()``:
    a Knative service scaling up from zero. Counts the requests it answers."""

    def __init__(self, delay: float) -> None:
        self.port = closed_port()
        self.url = f"http://{HOST}:{self.port}"
        self.delay = delay
        self.requests = 0
        self._server: Any = None
        self._timer = threading.Timer(delay, self._listen)

    def _app(self, environ: Any, start_response: Any) -> Any:
        self.requests += 1
        return make_app()(environ, start_response)

    def _listen(self) -> None:
        self._server = make_server(HOST, self.port, self._app).start()

    def __enter__(self) -> LateRunner:
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()
        self._timer.join(T)
        if self._server is not None:
            self._server.stop()


def test_knative_reaches_a_runner_that_scales_up_during_the_retries() -> None:
    retry = {"attempts": 6, "backoff_ms": 300}  # attempts at 0, 0.3, 0.9, 2.1, 4.5, 9.3 s
    with LateRunner(0.15) as late, backend_for(late.url, "knative", backend={"retry": retry},
                                               timeouts={"read_ms": 20000}) as backend:
        assert backend.execute(BODY, dict(HEADERS)).status == 200  # a POST: nothing was sent before
        assert late.requests == 1


def test_a_cold_start_longer_than_read_ms_still_gets_its_read_time() -> None:
    retry = {"attempts": 6, "backoff_ms": 200}  # attempts at 0, 0.2, 0.6, 1.4, 3.0, 6.2 s
    with LateRunner(0.7) as late, backend_for(late.url, "knative", backend={"retry": retry},
                                              timeouts={"read_ms": 500}) as backend:
        assert backend.execute(BODY, dict(HEADERS)).status == 200


def test_an_unreachable_runner_stays_unreachable_after_long_retries() -> None:
    backend = {"retry": {"attempts": 3, "backoff_ms": 300}, "timeouts": {"read_ms": 500}}
    with running_gateway("knative", runner_url=f"http://{HOST}:{closed_port()}", backend=backend) as gw:
        resp = gw.execute()
        assert resp.status_code == 502 and resp.json()["error"] == "runner_unreachable"


@contextlib.contextmanager
def full_backlog() -> Iterator[str]:
    """A listener whose accept queue is full: a connect hangs (SYN dropped) until its timeout."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind((HOST, 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield f"http://{HOST}:{listener.getsockname()[1]}"
    finally:
        filler.close()
        listener.close()


@pytest.mark.parametrize("kind_attempts", [("docker", 1), ("knative", 3)], ids=["docker", "knative"])
def test_connect_timeout_is_separate_from_the_read_deadline(kind_attempts: tuple[str, int]) -> None:
    kind, attempts = kind_attempts
    with full_backlog() as url, backend_for(
            url, kind, timeouts={"connect_ms": 200, "read_ms": 20000},
            backend={"retry": {"attempts": attempts, "backoff_ms": 10}} if kind == "knative" else None
    ) as backend:
        started = time.monotonic()
        with pytest.raises(RunnerUnreachable):
            backend.execute(BODY, dict(HEADERS))
        elapsed = time.monotonic() - started
    assert 0.15 * attempts < elapsed < 0.2 * attempts + 2.0, elapsed  # connect_ms per attempt, not read_ms


@pytest.mark.parametrize("call", ["execute", "asset"])
def test_nothing_is_retried_once_sent(kind: str, call: str) -> None:
    for fault, error in ((SilentRunner, RunnerTimeout), (GarbageRunner, BadGateway)):
        with fault() as runner, backend_for(runner.url, kind, timeouts={"read_ms": 300},
                                            backend={"retry": {"attempts": 5, "backoff_ms": 10}}
                                            if kind == "knative" else None) as backend:
            with pytest.raises(error):
                if call == "execute":
                    backend.execute(BODY, dict(HEADERS))
                else:
                    fetch(backend, ASSET)
            assert runner.connections == 1, fault.__name__


# -- TLS ---------------------------------------------------------------------------------------------


def test_https_to_a_plain_http_port_fails(kind: str) -> None:
    with StandinRunner() as runner:
        url = runner.url.replace("http://", "https://")
        no_retry = {"retry": {"attempts": 1}} if kind == "knative" else None
        with backend_for(url, kind, backend=no_retry) as backend, pytest.raises(UpstreamError):
            backend.execute(BODY, dict(HEADERS))
        with running_gateway(kind, runner_url=url) as gw:
            resp = gw.execute()
            assert resp.status_code == 502 and resp.json()["error"] in ("runner_unreachable", "bad_gateway")


@contextlib.contextmanager
def tls_runner(cert: Path, key: Path) -> Iterator[str]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = make_server(HOST, 0, make_app())
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.start()
    try:
        yield f"https://{HOST}:{server.port}"
    finally:
        server.stop()


def test_tls_is_verified(kind: str, self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    with tls_runner(cert, key) as url:
        with running_gateway(kind, runner_url=url) as gw:
            resp = gw.execute()
            assert resp.status_code == 502 and resp.json()["error"] == "runner_unreachable"
            assert gw.get(INDEX + "?tenant=t1").status_code == 502
        with running_gateway(kind, runner_url=url, backend={"ca_bundle": str(cert)}) as gw:
            assert gw.execute().status_code == 200
            assert gw.get(INDEX + "?tenant=t1").status_code == 200


def test_an_unreachable_runner_says_why_to_the_operator_not_to_the_client(
        kind: str, self_signed: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="runner_mw")
    cert, key = self_signed
    with tls_runner(cert, key) as tls_url:
        for url, why in ((f"http://{HOST}:{closed_port()}", "connection refused"),
                         (tls_url, "TLS certificate not verified")):
            caplog.clear()
            with running_gateway(kind, runner_url=url, backend={"retry": {"attempts": 1}}
                                 if kind == "knative" else None) as gw:
                for _ in range(3):
                    resp = gw.execute()
                    assert resp.status_code == 502 and resp.json()["error"] == "runner_unreachable"
                    assert why.split()[0] not in resp.text.lower()  # the cause is not the client's
                messages = [r.getMessage() for r in caplog.records]
                lines = [m for m in messages if "cannot reach the runner" in m]
                assert len(lines) == 1 and why.lower() in lines[0].lower(), lines  # once per 10 s
                status = gw.get("/runner/-/status").json()
                assert why.lower() in status["upstream"]["error"].lower(), status["upstream"]


def test_a_ca_bundle_broken_after_the_load_is_unreachable_with_the_reason(
        kind: str, self_signed: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A worker takes its master's checked config without reading the files again: a bundle
    # broken since then fails at the first request, as unreachable, and says why.
    caplog.set_level(logging.WARNING, logger="runner_mw")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(self_signed[0].read_bytes())
    cert, key = self_signed
    with tls_runner(cert, key) as url:
        data = {"version": 1, "backend": "b",
                "backends": {"b": {"kind": kind, "url": url, "ca_bundle": str(ca)}}}
        checked = config_from_mapping(data)
        ca.write_text("rotated away\n", encoding="utf-8")
        backend = build_backend(config_from_mapping(data, sha256=checked.sha256).active)
        try:
            with pytest.raises(RunnerUnreachable, match="CA bundle"):
                backend.execute(BODY, dict(HEADERS))
            assert "CA bundle" in backend.health()["error"]
        finally:
            backend.close()
    assert any("CA bundle" in r.getMessage() for r in caplog.records)


# -- ui_url ------------------------------------------------------------------------------------------


def reference_ui_url(public_base: str, extension_id: str, content_hash: str, path: str,
                     tenant: str | None) -> str:
    """The reference gateway's ``buildExtUiSrc`` (encodeURIComponent + URLSearchParams), in Python."""
    def component(s: str) -> str:
        return quote(s, safe="-_.!~*'()")

    def form(s: str) -> str:
        return quote(s, safe="-_.*").replace("%20", "+")

    params = [("path", path or "/"), *([("tenant", tenant)] if tenant else []), ("extensionId", extension_id)]
    qs = "&".join(f"{form(k)}={form(v)}" for k, v in params)
    return f"{public_base}/ext-ui/{component(extension_id)}/{component(content_hash)}/index.html?{qs}"


def same_shape(ours: str, reference: str) -> None:
    a, b = urlsplit(ours), urlsplit(reference)
    assert (a.scheme, a.netloc, a.path) == (b.scheme, b.netloc, b.path)
    assert parse_qsl(a.query, keep_blank_values=True) == parse_qsl(b.query, keep_blank_values=True)


@pytest.mark.parametrize(("extension_id", "path", "tenant"), [
    (EXT, "/", None), (EXT, "/settings", TENANT), (EXT, "", "t"),
    ("com.example.a-b_c", "/a b&c=d#e?f", "t&x=1"), ("ext with space", "/ü/ñ", "租户"), ("a?b#c", "/x", None),
])
def test_ui_url_has_the_reference_shape(extension_id: str, path: str, tenant: str | None) -> None:
    with backend_for("http://127.0.0.1:9") as backend:
        ours = backend.ui_url(extension_id, HASH, path, tenant)
    same_shape(ours, reference_ui_url("/runner", extension_id, HASH, path, tenant))
    assert ours.startswith(f"/runner/ext-ui/{quote(extension_id, safe='')}/sha256%3A")


def test_ui_url_exact_for_the_sample() -> None:
    with backend_for("http://127.0.0.1:9") as backend:
        url = backend.ui_url(EXT, HASH, "/", TENANT)
    hex_ = HASH.removeprefix("sha256:")
    assert url.startswith(f"/runner/ext-ui/{EXT}/sha256%3A{hex_}/index.html?path=")
    assert parse_qsl(urlsplit(url).query) == [("path", "/"), ("tenant", TENANT), ("extensionId", EXT)]


@pytest.mark.parametrize(("public_base", "script_name", "prefix"), [
    ("/runner", "", "/runner"), ("/runner", "/app", "/app/runner"), ("/runner", "/app/", "/app/runner"),
    # PEP 3333: a mount at /café arrives as its UTF-8 bytes decoded as latin-1; '#', '?', '%'
    # and spaces must not end or break the path.
    ("/runner", "/caf\xc3\xa9", "/caf%C3%A9/runner"), ("/runner", "/a#b?c", "/a%23b%3Fc/runner"),
    ("/runner", "/50% off", "/50%25%20off/runner"),
    # gunicorn passes a mount as it matched it in the raw target, still encoded: kept as it is.
    ("/runner", "/my%20app", "/my%20app/runner"), ("/runner", "/caf%C3%A9", "/caf%C3%A9/runner"),
    ("/runner", "/a%2x%5c", "/a%252x%5c/runner"),
    ("/runner", "/caf\u00e9\u65e5", "/caf%C3%A9%E6%97%A5/runner"),
    ("/runner", "/caf\u00e9", "/caf%C3%A9/runner"),  # decoded text (Flask's script_root)
    # A SCRIPT_NAME from a request header (gunicorn, for forwarded_allow_ips peers) must not
    # make the URL another origin's ("//evil.example/runner/..." is scheme-relative).
    ("/runner", "//evil.example", "/evil.example/runner"),
    ("/runner", "/\\evil.example", "/%5Cevil.example/runner"),
    ("https://runner.example.com", "/app", "https://runner.example.com"),
    ("https://runner.example.com/pub/", "/app", "https://runner.example.com/pub"),
])
def test_ui_url_public_base_and_script_name(kind: str, public_base: str, script_name: str,
                                            prefix: str) -> None:
    with backend_for("http://127.0.0.1:9", kind, backend={"public_base": public_base}) as backend:
        url = backend.ui_url(EXT, HASH, "/x", None, script_name=script_name)
    assert url.startswith(f"{prefix}/ext-ui/{EXT}/sha256%3A")
    same_shape(url, reference_ui_url(prefix, EXT, HASH, "/x", None))


@pytest.mark.parametrize("content_hash", [
    "", "sha256:", HASH[7:], "sha256:" + "g" * 64, HASH[:-1], HASH + "0", "md5:" + HASH[7:39], HASH + "\n",
    " " + HASH, "sha256: " + HASH[8:], "sha512:" + HASH[7:],
])
def test_ui_url_refuses_a_bad_hash(content_hash: str) -> None:
    with backend_for("http://127.0.0.1:9") as backend, pytest.raises(ValueError):
        backend.ui_url(EXT, content_hash)


def test_ui_url_accepts_any_case_like_the_reference_and_refuses_an_empty_id() -> None:
    with backend_for("http://127.0.0.1:9") as backend:
        backend.ui_url(EXT, HASH.upper())
        backend.ui_url(EXT, "sha256:" + HASH[7:].upper())
        with pytest.raises(ValueError):
            backend.ui_url("", HASH)


def test_ui_url_of_the_middleware_follows_the_active_backend() -> None:
    with running_gateway(backend={"public_base": "https://assets.example/r"}) as gw:
        assert gw.middleware.ui_url(EXT, HASH).startswith(f"https://assets.example/r/ext-ui/{EXT}/")
        page = send("GET", gw.url + gw.middleware.ui_url(EXT, HASH, tenant="t1",
                                                        script_name="").replace("https://assets.example/r",
                                                                                "/runner"))
        assert page.status_code == 200  # /runner/* still works with an absolute public_base


# -- health --------------------------------------------------------------------------------------------


def test_health_of_a_live_runner(kind: str) -> None:
    with StandinRunner() as runner, backend_for(runner.url, kind) as backend:
        health = backend.health()
        assert health["ok"] is True and health["status"] == 200 and health["latency_ms"] >= 0
        (got,) = runner.received
        assert got.raw_path == "/healthz"
        assert got.headers["host"] == (KNATIVE_HOST if kind == "knative" else f"{HOST}:{runner.port}")


def test_health_reports_and_never_raises(kind: str) -> None:
    with backend_for(f"http://{HOST}:{closed_port()}", kind) as backend:
        health = backend.health()
        assert health["ok"] is False and "error" in health
    with GarbageRunner() as garbage, backend_for(garbage.url, kind) as backend:
        assert backend.health()["ok"] is False
    with StandinRunner() as runner, backend_for(runner.url, kind) as backend:
        runner.respond("/healthz", 503, [("Content-Type", "application/json")], b'{"cache_writable":false}')
        health = backend.health()
        assert health["ok"] is False and health["status"] == 503


def test_a_base_path_in_the_url_prefixes_every_call(kind: str) -> None:
    with StandinRunner() as runner, backend_for(runner.url + "/prefix", kind) as backend:
        runner.respond("/prefix/", 200, [("Content-Type", "application/json")],
                       reply_envelope())
        backend.execute(BODY, dict(HEADERS))
        fetch(backend, ASSET, query="a=1")
        backend.health()
        assert [r.raw_path for r in runner.received] == ["/prefix/v1/execute", f"/prefix/{ASSET}?a=1",
                                                         "/prefix/healthz"]


def test_ui_url_refuses_what_the_gateway_would_refuse() -> None:
    # A long path made an iframe URL whose query the gateway's own route refuses (400).
    from runner_mw.paths import MAX_QUERY

    backend = build_backend(config_from_mapping(config_for("http://127.0.0.1:9")).active)
    assert "path=/a" in backend.ui_url(EXT, HASH, "/a" * 1000)
    with pytest.raises(ValueError, match="longer than the gateway takes"):
        backend.ui_url(EXT, HASH, "/a" * MAX_QUERY)
    with pytest.raises(ValueError, match="longer than the gateway takes"):
        backend.ui_url("e" * 2100, HASH)  # the path this time
    # Non-ASCII ids are fine while the whole URL fits (MAX_TARGET: the id is in it twice).
    assert "/ext-ui/" in backend.ui_url("\u00e9" * 300, HASH)  # 600 bytes, 1 800 characters each


@pytest.mark.parametrize("extension_id", ["acme/hello", "acme;hello", "100%-hello", "a\\b", "a\x00b", "a\nb",
                                          "a\x7fb", ".", ".."])
def test_ui_url_refuses_an_extension_id_the_route_refuses(extension_id: str) -> None:
    # Encoded, these are %2F, %3B, %25, %5C and control escapes, which the route answers 400;
    # "." and ".." the browser resolves away before it asks (a 404).
    backend = build_backend(config_from_mapping(config_for("http://127.0.0.1:9")).active)
    with pytest.raises(ValueError, match="extension_id"):
        backend.ui_url(extension_id, HASH)
    assert "/ext-ui/a.b/" in backend.ui_url("a.b", HASH) and "/ext-ui/..a/" in backend.ui_url("..a", HASH)


@pytest.mark.parametrize("public_base", ["/runner", "https://assets.example/r",
                                         "https://assets.example/r\u00e4nner/" + "\u00e4" * 100])
def test_ui_url_stays_within_gunicorns_default_request_line(public_base: str) -> None:
    # A deep link of 4 000 characters made a URL of 4 172, within the route's limits but past
    # gunicorn's default limit_request_line (4 094 for the line): a 414 from the server.
    from runner_mw.backends.base import MAX_TARGET

    backend = build_backend(config_from_mapping(config_for(
        "http://127.0.0.1:9", backend={"public_base": public_base})).active)
    with pytest.raises(ValueError, match="request target"):
        backend.ui_url(EXT, HASH, "/" + "a" * 3990, script_name="/app")
    with pytest.raises(ValueError, match="request target"):
        backend.ui_url(EXT, HASH, "/" + "\u00e9" * 660)
    for length in (3000, 3400, 3700):
        try:
            url = backend.ui_url(EXT, HASH, "/" + "a" * length)
        except ValueError:
            continue
        # As the browser sends it: a non-ASCII base path goes out percent-encoded.
        target = quote(urlsplit(url).path, safe="/%:@!$&'()*+,;=~") + "?" + urlsplit(url).query
        assert len(target) <= MAX_TARGET
