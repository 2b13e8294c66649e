"""/runner/<prefix>/...: UI assets streamed same-origin, through real HTTP to a stand-in runner."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import logging
import socket
import struct
import threading
import time
import tracemalloc
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from mwfixtures import (
    EXT,
    HASH,
    HOST,
    INDEX,
    KNATIVE_HOST,
    SERVERS,
    SERVICE_TOKEN,
    UPSTREAM_INDEX,
    Gateway,
    config_for,
    raw_exchange,
    running_gateway,
    send,
    serve_wsgi,
    wait_until,
)
from standin import (
    DripRunner,
    GarbageRunner,
    SilentRunner,
    StandinRunner,
    _RawServer,
    _read_request,
    closed_port,
    stream_digest,
)

from runner_mw import RunnerMiddleware
from runner_mw.assets import StreamedBody
from runner_mw.backends.base import AssetResponse
from runner_mw.devrunner import SAMPLE_BUNDLES
from runner_mw.devrunner.app import IMMUTABLE

pytest_plugins = ["mwfixtures"]

INDEX_FILE = SAMPLE_BUNDLES / EXT / HASH.removeprefix("sha256:") / "ui" / "index.html"
Q = "?tenant=t1"


def read_all(resp: http.client.HTTPResponse) -> tuple[int, str]:
    """Read a body in chunks without keeping it: (size, sha256 hex)."""
    digest, size = hashlib.sha256(), 0
    while chunk := resp.read(65536):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


# -- the contract passes through ------------------------------------------------------------------


def test_an_asset_is_passed_with_its_headers(gateway: Gateway) -> None:
    resp = gateway.get(INDEX + Q)
    assert resp.status_code == 200
    assert resp.content == INDEX_FILE.read_bytes()
    assert resp.headers["Content-Type"] == "text/html"
    assert resp.headers["Content-Length"] == str(INDEX_FILE.stat().st_size)
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["ETag"].startswith('"sha256-')
    assert resp.headers["Cache-Control"] == IMMUTABLE  # a 2xx: the runner's
    (got,) = gateway.runner.received
    assert (got.method, got.raw_path) == ("GET", UPSTREAM_INDEX + Q)
    assert got.headers["host"] == gateway.upstream_host
    assert got.headers["x-request-id"] == resp.headers["X-Request-Id"]
    assert got.headers["x-runner-service-token"] == SERVICE_TOKEN
    assert got.body == b""


def test_head_has_the_length_and_no_body(gateway: Gateway) -> None:
    resp = gateway.raw("HEAD", INDEX + Q)
    assert resp.status == 200 and resp.body == b""
    assert resp.header("Content-Length") == str(INDEX_FILE.stat().st_size)
    assert resp.header("ETag") is not None
    assert gateway.runner.received[0].method == "HEAD"


def test_etag_revalidation_is_304(gateway: Gateway) -> None:
    etag = gateway.get(INDEX + Q).headers["ETag"]
    resp = gateway.raw("GET", INDEX + Q, [("If-None-Match", etag)])
    assert resp.status == 304 and resp.body == b""
    assert resp.header("ETag") == etag and resp.header("X-Request-Id")
    assert gateway.runner.received[1].headers["if-none-match"] == etag
    stale = gateway.get(INDEX + Q, headers={"If-None-Match": '"sha256-00"'})
    assert stale.status_code == 200 and stale.content == INDEX_FILE.read_bytes()


@pytest.mark.parametrize("query", [
    "?tenant=t1&path=%2Fsettings%3Fa%3D1&x=a+b&empty=&flag",
    "?tenant=t1&tenant=t2",
    "?tenant=%E7%A7%9F%E6%88%B7&next=%2F%2Fx",
    "",
])
def test_the_query_is_passed_as_is(gateway: Gateway, query: str) -> None:
    gateway.raw("GET", INDEX + query)
    assert gateway.runner.received[0].raw_path == UPSTREAM_INDEX + query


def test_a_query_with_a_stray_percent_keeps_its_meaning(gateway: Gateway) -> None:
    # A lone '%' is not valid percent-encoding; it travels as its encoding %25 while every
    # valid escape (here %2F) is left alone, so the runner decodes what the client meant.
    gateway.raw("GET", INDEX + "?tenant=t1&discount=100%&next=%2Fhome")
    assert gateway.runner.received[0].raw_path == UPSTREAM_INDEX + "?tenant=t1&discount=100%25&next=%2Fhome"


def test_runner_cookies_are_dropped(gateway: Gateway) -> None:
    gateway.runner.respond("/ext-ui/", 200, [("Content-Type", "text/css"), ("Set-Cookie", "a=1; Path=/"),
                                             ("Set-Cookie", "b=2; HttpOnly"), ("set-cookie2", "c=3")], b"x{}")
    resp = gateway.raw("GET", "/runner/ext-ui/a/b/c.css")
    assert resp.status == 200 and resp.body == b"x{}"
    assert resp.headers.get_all("Set-Cookie") is None and resp.header("Set-Cookie2") is None
    gateway.raw("GET", "/runner/ext-ui/a/b/d.css")
    assert "cookie" not in gateway.runner.received[1].headers  # and no cookie jar sends them back


def test_headers_that_act_on_the_whole_origin_are_dropped(gateway: Gateway) -> None:
    # The UI is served on the host app's origin: Clear-Site-Data from a sandboxed frame still
    # wiped the host's session cookie (Chromium), Refresh sent the page to the runner's address.
    origin_wide = {"clear-site-data", "strict-transport-security", "alt-svc", "service-worker-allowed",
                   "nel", "report-to", "reporting-endpoints", "origin-agent-cluster", "accept-ch",
                   "critical-ch", "set-login"}
    sent = [(name.title(), "x") for name in sorted(origin_wide)]
    gateway.runner.respond("/ext-ui/", 200, [("Content-Type", "text/css"), ("Clear-Site-Data", '"cookies"'),
                                             ("Refresh", "0; url=http://10.0.0.5:8080/x"), *sent,
                                             ("Vary", "Accept-Encoding")], b"x{}")
    resp = gateway.raw("GET", "/runner/ext-ui/a/b/c.css")
    assert resp.status == 200 and resp.body == b"x{}"
    names = {name.lower() for name, _ in resp.headers.items()}
    assert not names & (origin_wide | {"refresh"}), names & (origin_wide | {"refresh"})
    assert resp.header("Vary") == "Accept-Encoding"  # what describes this response stays
    # A Refresh that only reloads the page itself after a delay is the page's own business.
    gateway.runner.respond("/ext-ui/", 200, [("Content-Type", "text/html"), ("Refresh", "30")], b"x")
    assert gateway.raw("GET", "/runner/ext-ui/a/b/live.html").header("Refresh") == "30"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_compressed_bytes_pass_unchanged(gateway: Gateway, chunked: bool) -> None:
    payload = gzip.compress(b"console.log('hello');\n" * 500, mtime=0)
    gateway.runner.respond("/ext-ui/", 200, [("Content-Type", "text/javascript"),
                                             ("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")],
                           payload, chunked=chunked)
    resp = gateway.raw("GET", "/runner/ext-ui/a/b/app.js", [("Accept-Encoding", "gzip")])
    assert resp.status == 200 and resp.body == payload
    assert resp.header("Content-Encoding") == "gzip" and resp.header("Vary") == "Accept-Encoding"
    if not chunked:
        assert resp.header("Content-Length") == str(len(payload))
    assert gateway.runner.received[0].headers["accept-encoding"] == "gzip"


@pytest.mark.parametrize(("location", "client_sees"), [
    ("/ext-ui/other/sha256:00/index.html?tenant=t", "/runner/ext-ui/other/sha256:00/index.html?tenant=t"),
    ("https://cdn.example/ext-ui/x", "https://cdn.example/ext-ui/x"),
    ("//evil.example/ext-ui/x", "//evil.example/ext-ui/x"),
    ("relative/ext-ui/x", "relative/ext-ui/x"),
    ("index.html?x=..", "index.html?x=.."),
    # The browser would resolve these on the host app's origin: dropped.
    ("/elsewhere", None),
    ("/ext-ui/../../admin", None),
    ("../../../../admin", None),
    ("%2e%2e/%2E./x", None),
    ("/\\evil.example/", None),
])
@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_passed_never_followed(gateway: Gateway, status: int, location: str,
                                             client_sees: str | None) -> None:
    gateway.runner.respond("/ext-ui/a/", status, [("Location", location),
                                                  ("Cache-Control", IMMUTABLE)])
    resp = gateway.raw("GET", "/runner/ext-ui/a/b/index.html")
    assert resp.status == status and resp.header("Location") == client_sees
    assert resp.header("Cache-Control") == "no-store"
    assert len(gateway.runner.received) == 1


def test_a_redirect_naming_the_runners_own_origin_stays_on_the_gateway(gateway: Gateway, kind: str) -> None:
    # A runner that builds absolute URLs names itself: by its URL, or (Knative) by the Host
    # the ingress routes on. Neither may reach a browser.
    origins = [gateway.runner.url]
    if kind == "knative":
        origins += [f"http://{KNATIVE_HOST}", f"https://{KNATIVE_HOST}", f"HTTP://{KNATIVE_HOST.upper()}"]
    for origin in origins:
        gateway.runner.respond("/ext-ui/a/", 302, [("Location", origin + "/ext-ui/b/h/index.html")])
        resp = gateway.raw("GET", "/runner/ext-ui/a/h/x.js")
        assert resp.status == 302 and resp.header("Location") == "/runner/ext-ui/b/h/index.html", origin
    if kind == "knative":
        origins.append(f"https://{KNATIVE_HOST}:443")
        gateway.runner.respond("/ext-ui/a/", 302, [("Location", origins[-1] + "/ext-ui/b/h/index.html")])
        resp = gateway.raw("GET", "/runner/ext-ui/a/h/x.js")
        assert resp.header("Location") == "/runner/ext-ui/b/h/index.html"
    # Anything else on the runner is dropped: its address stays internal, and it is never cut
    # down to a link that leaves /runner/ or points at the host app's pages.
    for origin in origins:
        for tail in ("/admin", "/healthz", "//evil.example/x", "/\\evil.example/", "/ext-ui/%2e%2e/%2E./x",
                     "/ext-ui/../../x", "/ext-ui/a/%5c..%5cx", "/ext-ui/.\t./.\t./x"):
            gateway.runner.respond("/ext-ui/a/", 302, [("Location", origin + tail)])
            resp = gateway.raw("GET", "/runner/ext-ui/a/h/x.js")
            assert resp.status == 302 and resp.header("Location") is None, origin + tail
    for location in ("http://other.internal/ext-ui/b/h/i.html", "//cdn.example/x"):
        gateway.runner.respond("/ext-ui/a/", 302, [("Location", location)])
        assert gateway.raw("GET", "/runner/ext-ui/a/h/x.js").header("Location") == location


def test_a_redirect_into_the_assets_honours_the_mount_point() -> None:
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    with StandinRunner() as runner:
        runner.respond("/ext-ui/a/", 302, [("Location", "/ext-ui/b/h/index.html")])
        mw = RunnerMiddleware(lambda e, s: [], config_for(runner.url), reload_signal=False)
        try:
            with serve_wsgi(DispatcherMiddleware(lambda e, s: [], {"/app": mw})) as served:
                resp = send("GET", served.url + "/app/runner/ext-ui/a/h/x.js")
                assert resp.status_code == 302
                assert resp.headers["Location"] == "/app/runner/ext-ui/b/h/index.html"
                assert runner.received[0].raw_path == "/ext-ui/a/h/x.js"
        finally:
            mw.close()


@pytest.mark.parametrize(("status", "body"), [(400, b"invalid path"), (404, b""), (413, b"asset too large"),
                                              (500, b"boom"), (502, b"archive hash mismatch"), (201, b"ok")])
def test_error_statuses_and_bodies_pass_with_no_store(gateway: Gateway, status: int, body: bytes) -> None:
    gateway.runner.respond("/ext-ui/", status, [("Content-Type", "text/plain"), ("Cache-Control", IMMUTABLE)],
                           body)
    resp = gateway.raw("GET", "/runner/ext-ui/a/b/c.js")
    assert resp.status == status and resp.body == body
    expected = IMMUTABLE if status < 300 else "no-store"
    assert resp.headers.get_all("Cache-Control") == [expected]


def test_the_runners_own_refusals_pass_with_no_store(gateway: Gateway) -> None:
    unknown = gateway.get(f"/runner/ext-ui/com.example.unknown/{HASH}/index.html{Q}")
    assert unknown.status_code == 404 and unknown.headers["Cache-Control"] == "no-store"
    bad_type = gateway.get(INDEX.replace("index.html", "notes.txt") + Q)
    assert bad_type.status_code == 400 and bad_type.headers["Cache-Control"] == "no-store"


# -- streaming ------------------------------------------------------------------------------------

BIG = 64 * 1024 * 1024


def test_a_64_mib_asset_streams_in_flat_memory(gateway: Gateway) -> None:
    gateway.runner.stream_asset("/ext-ui/big/", BIG)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with raw_exchange(gateway.port, "GET", "/runner/ext-ui/big/h/file.bin") as resp:
            assert resp.status == 200 and resp.getheader("Content-Length") == str(BIG)
            size, digest = read_all(resp)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert (size, digest) == (BIG, stream_digest(BIG))
    assert peak < 32 * 1024 * 1024, f"gateway process grew by {peak / 1e6:.1f} MB"


def test_a_small_asset_frees_its_connection_before_the_body_is_sent(gateway: Gateway) -> None:
    # Called in-process, so that the pool can be looked at while the body is still unsent.
    from werkzeug.test import create_environ

    snap = gateway.middleware.store.current
    pool = snap.backend.pool()  # type: ignore[attr-defined]
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        statuses.append(status)

    body = gateway.middleware(create_environ(INDEX, query_string="tenant=t1"), start_response)
    assert statuses == ["200 OK"] and b"".join(body) == INDEX_FILE.read_bytes()
    assert isinstance(body, list)  # answered whole: nothing left for the server to close
    assert len(pool._idle) == 1 and snap.inflight == 0  # connection back, request finished

    gateway.runner.stream_asset("/ext-ui/big/", BIG)
    body = gateway.middleware(create_environ("/runner/ext-ui/big/h/file.bin"), start_response)
    try:
        assert statuses[-1] == "200 OK" and not isinstance(body, list)
        assert pool._idle == [] and snap.inflight == 1  # streaming: busy until closed
    finally:
        body.close()  # type: ignore[attr-defined]
    assert snap.inflight == 0


def _streamed(chunks: Any, complete: Any = lambda: False) -> tuple[StreamedBody, list[int]]:
    logged: list[int] = []
    return StreamedBody(AssetResponse(200, [], chunks, complete=complete), logged.append, 200), logged


def test_a_streamed_body_is_logged_as_what_became_of_it() -> None:
    def broken() -> Any:
        yield b"a"
        raise ConnectionResetError("a plugin's stream, not an UpstreamError")

    body, logged = _streamed(broken())
    with pytest.raises(ConnectionResetError):
        list(body)
    body.close()
    assert logged == [502]  # the runner's side failed, whatever the exception
    body, logged = _streamed(iter([b"a", b"b"]))
    assert next(iter(body)) == b"a"
    body.close()  # the server stopped asking: the client left
    assert logged == [499]
    body, logged = _streamed(iter([b"a"]), complete=lambda: True)
    assert next(iter(body)) == b"a"
    body.close()  # stopped at Content-Length (PEP 3333 allows it): the body was whole
    assert logged == [200]


def test_every_asset_response_is_sandboxed_by_its_own_csp(gateway: Gateway) -> None:
    # Opened directly (a link, no iframe) an extension page would run on the host's origin.
    sandbox = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads"
    gateway.runner.stream_asset("/ext-ui/big/", 300_000)
    gateway.runner.respond("/ext-ui/gone/", 404, [("Content-Type", "text/html"),
                                                  ("Content-Security-Policy", "default-src 'none'")], b"no")
    cases = ((INDEX + Q, 200), ("/runner/ext-ui/big/h/f.bin", 200), ("/runner/ext-ui/gone/h/x", 404))
    for path, status in cases:
        resp = gateway.raw("GET", path)
        assert resp.status == status
        policies = resp.headers.get_all("Content-Security-Policy") or []
        assert sandbox in policies, (path, policies)
        assert not any("allow-same-origin" in p or "allow-top-navigation" in p for p in policies)
    assert "default-src 'none'" in policies  # the runner's own policy is kept beside it
    etag = gateway.raw("GET", INDEX + Q).header("ETag")
    assert etag
    revalidated = gateway.raw("GET", INDEX + Q, [("If-None-Match", etag)])
    assert revalidated.status == 304


def test_a_304_leaves_the_cached_policies_as_they_were(gateway: Gateway) -> None:
    # A cache applying a 304 replaces every stored header of the same name (RFC 9111 4.3.4):
    # the sandbox alone on a 304 would replace the stored pair and drop the runner's policy.
    sandbox = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads"
    etag = gateway.raw("GET", INDEX + Q).header("ETag")
    revalidated = gateway.raw("GET", INDEX + Q, [("If-None-Match", etag)])
    assert revalidated.status == 304
    assert revalidated.headers.get_all("Content-Security-Policy") in (None, [])
    # A 304 with a policy of its own replaces the stored ones: the sandbox goes with it.
    gateway.runner.respond("/ext-ui/cached/", 304, [("ETag", '"x"'), ("Content-Security-Policy",
                                                                       "script-src 'self'")])
    own = gateway.raw("GET", "/runner/ext-ui/cached/h/index.html", [("If-None-Match", '"x"')])
    assert own.status == 304
    assert sorted(own.headers.get_all("Content-Security-Policy") or []) == [sandbox, "script-src 'self'"]


def test_a_small_assets_close_that_raises_does_not_spoil_the_answer(
        caplog: pytest.LogCaptureFixture) -> None:
    # A plugin's close() that raised after start_response: the middleware's catch-all then
    # called start_response again, and the server sent its own 500 page (no request id).
    from types import SimpleNamespace

    from runner_mw.assets import handle_asset

    def close() -> None:
        raise RuntimeError("close boom")

    reply = AssetResponse(200, [("Content-Type", "text/plain")], iter([b"small"]), close=close,
                          complete=lambda: True)
    active = SimpleNamespace(service_token=None, host=None, url="http://127.0.0.1:9")
    snap = SimpleNamespace(config=SimpleNamespace(active=active, asset_prefixes=("ext-ui/",)),
                           backend=SimpleNamespace(fetch_asset=lambda *a: reply))
    started: list[str] = []
    done: list[int] = []
    body = handle_asset({"REQUEST_METHOD": "GET"}, lambda status, headers: started.append(status),
                        snap, "rid", "ext-ui/x/h/a.txt", done.append)  # type: ignore[arg-type]
    assert body == [b"small"] and started == ["200 OK"] and done == [200]
    assert "closing the runner's reply failed" in caplog.text


def test_a_streamed_body_gives_the_connection_back_without_close() -> None:
    # werkzeug's server skips close() when the client resets during its drain of the request.
    closed: list[bool] = []
    upstream = AssetResponse(200, [], iter([b"a", b"b"]), close=lambda: closed.append(True))
    logged: list[int] = []
    body = StreamedBody(upstream, logged.append, 200)
    assert list(body) == [b"a", b"b"]
    assert closed == [True] and logged == [200]  # at the last piece, not at close()
    body.close()
    assert closed == [True] and logged == [200]  # once
    # Abandoned halfway and never closed: released when collected.
    upstream = AssetResponse(200, [], iter([b"a", b"b"]), close=lambda: closed.append(True))
    body = StreamedBody(upstream, logged.append, 200)
    pieces = iter(body)
    assert next(pieces) == b"a"
    del pieces, body
    assert closed == [True, True] and logged == [200, 499]


def test_clients_that_reset_after_a_streamed_asset_under_werkzeug_leave_the_pool_whole() -> None:
    # Each client reads the whole body, then resets with a stray byte after its request:
    # werkzeug's server raises while reading that byte away and never calls close().
    with running_gateway(upstream={"pool_size": 2, "pool_wait_ms": 200}) as gw:
        assert gw.runner is not None
        gw.runner.stream_asset("/ext-ui/big/", 150_000)
        for _ in range(4):
            with socket.create_connection((HOST, gw.port), timeout=10) as sock:
                sock.sendall(b"GET /runner/ext-ui/big/h/file.bin HTTP/1.1\r\nHost: x\r\n\r\nX")
                got = b""
                while not (got.count(b"\r\n\r\n") and len(got.partition(b"\r\n\r\n")[2]) >= 150_000):
                    piece = sock.recv(65536)
                    assert piece, got[:200]
                    got += piece
                assert got.startswith(b"HTTP/1.1 200")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
        for _ in range(3):
            assert gw.get("/runner/ext-ui/big/h/file.bin").status_code == 200  # not 503 "overloaded"


def access_statuses(caplog: pytest.LogCaptureFixture, rid: str) -> list[str]:
    return [r.getMessage().partition(" status=")[2].partition(" ")[0] for r in caplog.records
            if r.name == "runner_mw.access" and f"request_id={rid}" in r.getMessage()]


def test_a_client_that_leaves_mid_stream_releases_the_upstream_connection(
        kind: str, caplog: pytest.LogCaptureFixture) -> None:
    # One pooled connection: if the abandoned stream kept it, the next request would wait, then 503.
    caplog.set_level(logging.INFO, logger="runner_mw.access")
    with running_gateway(kind, upstream={"pool_size": 1, "pool_wait_ms": 10000}) as gw:
        gw.runner.stream_asset("/ext-ui/big/", BIG)
        with raw_exchange(gw.port, "GET", "/runner/ext-ui/big/h/file.bin",
                          [("X-Request-Id", "leaves")]) as resp:
            assert resp.status == 200
            assert len(resp.read(256 * 1024)) == 256 * 1024
        # Logged and counted as the client's doing (nginx's 499), not as a runner failure (502).
        assert wait_until(lambda: access_statuses(caplog, "leaves"), what="access line") == ["499"]
        for _ in range(3):
            started = time.monotonic()
            nxt = gw.get(INDEX + Q)
            assert nxt.status_code == 200 and time.monotonic() - started < 5
        peers = [r.peer for r in gw.runner.received]
        assert peers[1] != peers[0]  # the half-read connection was closed, never reused
        assert peers[1] == peers[2] == peers[3]  # the others are kept alive


@pytest.mark.parametrize("where", ["response_headers", "complete"])
def test_a_failure_before_the_body_is_handed_over_releases_the_upstream_connection(
        kind: str, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug between the runner's head and the WSGI body (simulated here; complete() is a
    # backend's own code) must not keep the pooled connection: with pool_size 1 the next
    # request would wait, then get 503.
    import runner_mw.assets as assets_mod
    from runner_mw.backends import wire

    owner, name = ((assets_mod, "response_headers") if where == "response_headers"
                   else (wire.Response, "finished"))
    calls = {"n": 0}
    real = getattr(owner, name)

    def failing_once(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated bug")
        return real(*args)

    monkeypatch.setattr(owner, name, failing_once)
    with running_gateway(kind, upstream={"pool_size": 1, "pool_wait_ms": 500}) as gw:
        assert gw.get(INDEX + Q).status_code == 500  # the middleware's own JSON 500
        started = time.monotonic()
        assert gw.get(INDEX + Q).status_code == 200
        assert time.monotonic() - started < 0.5  # no wait for a slot that was never freed


class CutMidBodyRunner(_RawServer):
    """Answers 200 with a head and part of a body, then, once ``go`` is set, resets the
    connection (``reset=True``) or just stays silent until the end of the test."""

    conn_timeout = 10.0

    def __init__(self, *, chunked: bool = False, reset: bool = True, total: int = 1_000_000,
                 sent: int = 200_000) -> None:
        super().__init__()
        self.chunked, self.reset, self.total, self.sent = chunked, reset, total, sent
        self.go = threading.Event()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.go.set()
        super().__exit__(et, ev, tb)

    def serve(self, conn: socket.socket) -> None:
        if _read_request(conn) is None:
            return
        framing = b"Transfer-Encoding: chunked" if self.chunked else b"Content-Length: %d" % self.total
        body = b"a" * self.sent
        if self.chunked:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + framing
                     + b"\r\n\r\n" + body)
        while not self.go.wait(0.05):
            if self._stop.is_set():
                return
        if self.reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            self._stop.wait(10)


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_runner_dying_mid_body_breaks_the_clients_transfer(kind: str, server: str, chunked: bool,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runner_mw.access")
    with CutMidBodyRunner(chunked=chunked) as cut, \
            running_gateway(kind, server=server, runner_url=cut.url) as gw, \
            raw_exchange(gw.port, "GET", "/runner/ext-ui/a/b/big.bin", [("X-Request-Id", "cut")]) as resp:
        assert resp.status == 200
        assert len(resp.read(1000)) == 1000
        cut.go.set()
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            resp.read()  # never a short body that looks complete
        assert wait_until(lambda: access_statuses(caplog, "cut"), what="access line") == ["502"]


def test_a_stalled_stream_is_cut_after_the_read_deadline(kind: str) -> None:
    with CutMidBodyRunner(reset=False) as stalled, \
            running_gateway(kind, runner_url=stalled.url, timeouts={"read_ms": 500}) as gw, \
            raw_exchange(gw.port, "GET", "/runner/ext-ui/a/b/big.bin") as resp:
        assert resp.status == 200
        started = time.monotonic()
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            resp.read()
        assert time.monotonic() - started < 5


def test_a_slow_but_steady_stream_may_outlast_the_read_deadline(kind: str) -> None:
    # read_ms bounds the first byte and each silence, not a whole download.
    body = b"/* steady as */"
    with DripRunner(0.05, body=body, content_type="text/javascript", head_at_once=True) as drip, \
            running_gateway(kind, runner_url=drip.url, timeouts={"read_ms": 600}) as gw:
        started = time.monotonic()
        resp = gw.get("/runner/ext-ui/a/b/app.js")
        assert resp.status_code == 200 and resp.content == body
        assert time.monotonic() - started > 0.6  # longer than read_ms, and not cut


def test_a_silent_runner_is_504_for_assets(kind: str) -> None:
    with SilentRunner() as silent, running_gateway(kind, runner_url=silent.url,
                                                   timeouts={"read_ms": 500}) as gw:
        started = time.monotonic()
        resp = gw.get(INDEX + Q)
        assert resp.status_code == 504 and resp.json()["error"] == "runner_timeout"
        assert resp.headers["Cache-Control"] == "no-store"
        assert time.monotonic() - started < 1.5 and silent.connections == 1


@pytest.mark.parametrize(("fault", "status", "code"), [("closed", 502, "runner_unreachable"),
                                                       ("garbage", 502, "bad_gateway")])
def test_unreachable_or_broken_runners_for_assets(kind: str, fault: str, status: int, code: str) -> None:
    with contextlib.ExitStack() as stack:
        if fault == "closed":
            url = f"http://{HOST}:{closed_port()}"
        else:
            url = stack.enter_context(GarbageRunner()).url
        gw = stack.enter_context(running_gateway(kind, runner_url=url,
                                                 backend={"retry": {"backoff_ms": 10}} if kind == "knative"
                                                 else None))
        resp = gw.get(INDEX + Q)
        assert resp.status_code == status
        assert resp.json() == {"error": code, "requestId": resp.headers["X-Request-Id"]}


def test_assets_of_another_bundle(tmp_path: Path, kind: str) -> None:
    hex_ = "ab" * 32
    ui = tmp_path / "com.example.other" / hex_ / "ui"
    ui.mkdir(parents=True)
    (ui / "index.html").write_bytes(b"<html>other</html>")
    (ui / "app.js").write_bytes(b"let x = 1;")
    with StandinRunner(tmp_path) as runner, \
            running_gateway(kind, runner_url=runner.url) as gw:
        resp = gw.get(f"/runner/ext-ui/com.example.other/sha256%3A{hex_}/app.js{Q}")
        assert resp.status_code == 200 and resp.content == b"let x = 1;"
        assert resp.headers["Content-Type"] == "text/javascript"

