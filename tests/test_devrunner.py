"""The devrunner speaks the runner's HTTP contract: real sockets, real requests."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from standin import StandinRunner

from runner_mw.devrunner import (
    SAMPLE_BUNDLES,
    SAMPLE_CONTENT_HASH,
    SAMPLE_EXTENSION_ID,
    main,
    make_app,
    make_server,
)

ROOT = Path(__file__).resolve().parent.parent
EXT = SAMPLE_EXTENSION_ID
HASH = SAMPLE_CONTENT_HASH
HEX = HASH.removeprefix("sha256:")
UI = f"/ext-ui/{EXT}/{HASH}"
FILES = SAMPLE_BUNDLES / EXT / HEX / "ui"
IMMUTABLE = "public, max-age=31536000, immutable"
ROUTING = {"Content-Type": "application/json", "x-alga-tenant": "acme", "x-alga-extension": EXT}
T = 10  # seconds: generous, for a busy machine
LISTENING = re.compile(r"devrunner listening on (http://127\.0\.0\.1:(\d+)) \(bundles: (.+)\)\n")


@pytest.fixture
def runner() -> Iterator[StandinRunner]:
    with StandinRunner(name="a") as r:
        yield r


@contextlib.contextmanager
def served(**options: Any) -> Iterator[str]:
    """The devrunner app built with ``options``, on a free port; yields its URL."""
    server = make_server("127.0.0.1", 0, make_app(**options)).start()
    try:
        yield server.url
    finally:
        server.stop()


def raw(url: str, method: str, target: str, headers: dict[str, str] | None = None,
        body: bytes | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request with the target sent verbatim (requests would normalise ``..`` away)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=T)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def envelope(body: bytes | None = b"hi", **http: Any) -> dict[str, Any]:
    return {
        "context": {"tenant_id": "acme", "extension_id": EXT, "content_hash": HASH},
        "http": {"method": "POST", "path": "/hello",
                 "body_b64": None if body is None else base64.b64encode(body).decode(), **http},
    }


def execute(url: str, payload: Any, headers: dict[str, str] | None = None) -> requests.Response:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return requests.post(f"{url}/v1/execute", data=data, headers=ROUTING if headers is None else headers,
                         timeout=T)


def echo_of(resp: requests.Response) -> dict[str, Any]:
    reply = resp.json()
    assert reply["status"] == 200 and reply["error"] is None, reply
    return json.loads(base64.b64decode(reply["body_b64"]))  # type: ignore[no-any-return]


# -- POST /v1/execute -------------------------------------------------------------------------------


def test_execute_echoes_the_call_in_the_runner_envelope(runner: StandinRunner) -> None:
    payload = envelope(b"hello there", query={"a": "1", "b": "x y"})
    payload["context"]["request_id"] = "req-1"
    resp = execute(runner.url, payload)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["cache-control"] == IMMUTABLE
    assert resp.headers["x-standin"] == "a"
    assert list(resp.json()) == ["status", "headers", "body_b64", "error"]
    assert resp.json()["headers"] == {"content-type": "application/json"}
    assert echo_of(resp) == {
        "tenant": "acme", "extension": EXT, "method": "POST", "path": "/hello?a=1&b=x+y",
        "body": "hello there", "request_id": "req-1", "runner": "a",
    }


def test_execute_echo_without_body_or_request_id(runner: StandinRunner) -> None:
    echo = echo_of(execute(runner.url, envelope(None, method="GET", path="/items")))
    assert (echo["method"], echo["path"], echo["body"], echo["request_id"]) == ("GET", "/items", None, None)
    echo = echo_of(execute(runner.url, envelope(), headers={**ROUTING, "x-request-id": "from-header"}))
    assert echo["request_id"] == "from-header"


@pytest.mark.parametrize("drop", ["x-alga-tenant", "x-alga-extension", "both", "empty"])
def test_missing_routing_headers_are_an_in_band_400(runner: StandinRunner, drop: str) -> None:
    headers = dict(ROUTING)
    if drop == "empty":
        headers["x-alga-tenant"] = ""
    for name in ("x-alga-tenant", "x-alga-extension") if drop == "both" else (drop,):
        headers.pop(name, None)
    resp = execute(runner.url, envelope(), headers)
    assert resp.status_code == 200
    assert resp.content == b'{"status":400,"headers":{},"body_b64":null,"error":"missing_routing_headers"}'
    assert resp.headers["cache-control"] == IMMUTABLE


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "json"])
def test_execute_needs_a_json_content_type(runner: StandinRunner, content_type: str | None) -> None:
    headers = {k: v for k, v in ROUTING.items() if k != "Content-Type"}
    if content_type:
        headers["Content-Type"] = content_type
    resp = execute(runner.url, envelope(), headers)
    assert resp.status_code == 415
    assert resp.text == "Expected request with `Content-Type: application/json`"
    assert resp.headers["cache-control"] == IMMUTABLE


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", "application/x+json"]
)
def test_execute_accepts_json_content_types_as_axum_does(runner: StandinRunner, content_type: str) -> None:
    assert echo_of(execute(runner.url, envelope(), {**ROUTING, "Content-Type": content_type}))["body"] == "hi"


@pytest.mark.parametrize("body", [b"{not json", b"", b'{"a": NaN}', b"\xff\xfe"])
def test_execute_body_that_is_not_json_is_400(runner: StandinRunner, body: bytes) -> None:
    resp = execute(runner.url, body)
    assert resp.status_code == 400
    assert resp.headers["content-type"] == "text/plain; charset=utf-8"
    assert resp.text.startswith("Failed to parse the request body as JSON")


@pytest.mark.parametrize(
    ("payload", "where"),
    [({}, "missing field `context`"), ([], "expected a struct"),
     ({**envelope(), "http": {"method": 1, "path": "/"}}, "http.method"),
     ({**envelope(), "context": {"tenant_id": "t", "extension_id": EXT}}, "missing field `content_hash`"),
     ({**envelope(), "limits": {"timeout_ms": -1}}, "limits.timeout_ms")],
)
def test_execute_envelope_of_the_wrong_shape_is_422(runner: StandinRunner, payload: Any, where: str) -> None:
    resp = execute(runner.url, payload)
    assert resp.status_code == 422
    assert resp.text.startswith("Failed to deserialize the JSON body into the target type")
    assert where in resp.text


def padded(size: int) -> bytes:
    """A valid execute request of exactly ``size`` bytes (unknown keys are ignored)."""
    base = json.dumps({**envelope(), "pad": ""}).encode()
    return base[:-2] + b"x" * (size - len(base)) + b'"}'


def test_execute_body_limit_is_2_mib(runner: StandinRunner) -> None:
    assert echo_of(execute(runner.url, padded(2 * 1024 * 1024)))["body"] == "hi"
    resp = execute(runner.url, padded(2 * 1024 * 1024 + 1))
    assert resp.status_code == 413
    assert resp.headers["content-type"] == "text/plain; charset=utf-8"
    assert resp.text == "Failed to buffer the request body: length limit exceeded"


def test_413_is_decided_from_content_length_before_reading(runner: StandinRunner) -> None:
    with socket.create_connection(("127.0.0.1", runner.port), timeout=T) as sock:
        sock.sendall(
            b"POST /v1/execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"x-alga-tenant: acme\r\nx-alga-extension: e\r\nContent-Length: 3000000\r\n\r\n"
        )
        data = b""
        while b"length limit exceeded" not in data:  # not one byte of the body was sent
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 413 ")
    assert runner.received[0].body_unread


def test_413_for_a_chunked_body_over_the_limit(runner: StandinRunner) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", runner.port, timeout=T)
    try:
        parts = (b"x" * 65536 for _ in range(48))  # 3 MiB, no Content-Length
        conn.request("POST", "/v1/execute", body=parts, headers=ROUTING, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413
        assert resp.read() == b"Failed to buffer the request body: length limit exceeded"
    finally:
        conn.close()


def test_idempotency_key_replays_the_first_result(runner: StandinRunner) -> None:
    keyed = {**ROUTING, "x-idempotency-key": "k1"}
    first = execute(runner.url, envelope(b"first"), keyed)
    again = execute(runner.url, envelope(b"second"), keyed)
    assert again.content == first.content and echo_of(again)["body"] == "first"
    other_key = {**keyed, "x-idempotency-key": "k2"}
    assert echo_of(execute(runner.url, envelope(b"third"), other_key))["body"] == "third"
    assert echo_of(execute(runner.url, envelope(b"fourth")))["body"] == "fourth"


def test_idempotency_caches_only_executed_results(runner: StandinRunner) -> None:
    bare = {"Content-Type": "application/json", "x-idempotency-key": "k"}
    assert execute(runner.url, envelope(), bare).json()["error"] == "missing_routing_headers"
    assert echo_of(execute(runner.url, envelope(b"now"), {**ROUTING, **bare}))["body"] == "now"


def test_undecodable_body_b64_is_an_in_band_execute_failure(runner: StandinRunner) -> None:
    payload = envelope()
    payload["http"]["body_b64"] = "***"
    reply = execute(runner.url, payload).json()
    assert (reply["status"], reply["body_b64"]) == (500, None)
    assert reply["error"].startswith("execute_failed:")


# -- GET/HEAD /ext-ui/... ---------------------------------------------------------------------------


def etag_of(name: str) -> str:
    return f'"sha256-{hashlib.sha256((FILES / name).read_bytes()).hexdigest()}"'


@pytest.mark.parametrize(
    ("name", "content_type"),
    [("index.html", "text/html"), ("app.js", "text/javascript"), ("style.css", "text/css")],
)
def test_assets_are_served_with_etag_nosniff_and_csp_on_html(
    runner: StandinRunner, name: str, content_type: str
) -> None:
    resp = requests.get(f"{runner.url}{UI}/{name}", params={"tenant": "acme"}, timeout=T)
    data = (FILES / name).read_bytes()
    assert resp.status_code == 200
    assert resp.content == data
    assert resp.headers["content-type"] == content_type
    assert resp.headers["content-length"] == str(len(data))
    assert resp.headers["etag"] == etag_of(name)
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["cache-control"] == IMMUTABLE
    assert "accept-ranges" not in resp.headers
    if name.endswith(".html"):
        assert "script-src 'self'" in resp.headers["content-security-policy"]
    else:
        assert "content-security-policy" not in resp.headers


def test_the_sample_page_has_what_a_browser_test_looks_for() -> None:
    html = (FILES / "index.html").read_text()
    assert 'id="loaded"' in html and 'id="answer"' in html
    assert 'src="app.js"' in html and 'href="style.css"' in html  # relative: works under /runner/
    script = (FILES / "app.js").read_text()
    assert '"runner_mw.execute"' in script and '"runner_mw.result"' in script
    assert "event.source !== window.parent" in script


def test_percent_encoded_hash_and_tenant_header_are_accepted(runner: StandinRunner) -> None:
    target = f"/ext-ui/{EXT}/sha256%3A{HEX}/app.js"
    status, _, body = raw(runner.url, "GET", target, {"x-tenant-id": "acme"})
    assert (status, body) == (200, (FILES / "app.js").read_bytes())
    assert runner.received[0].raw_path == target


def test_range_is_ignored(runner: StandinRunner) -> None:
    resp = requests.get(f"{runner.url}{UI}/app.js?tenant=acme", headers={"Range": "bytes=0-9"}, timeout=T)
    assert resp.status_code == 200 and resp.content == (FILES / "app.js").read_bytes()


@pytest.mark.parametrize("inm", ["{etag}", "*", '"other", {etag}'])
def test_if_none_match_gives_304_without_a_body(runner: StandinRunner, inm: str) -> None:
    status, headers, body = raw(runner.url, "GET", f"{UI}/app.js?tenant=acme",
                                {"If-None-Match": inm.format(etag=etag_of("app.js"))})
    assert (status, body) == (304, b"")
    assert headers["ETag"] == etag_of("app.js")
    assert headers["Cache-Control"] == IMMUTABLE


def test_a_stale_etag_gets_the_file(runner: StandinRunner) -> None:
    status, _, body = raw(runner.url, "GET", f"{UI}/app.js?tenant=acme", {"If-None-Match": '"sha256-00"'})
    assert (status, body) == (200, (FILES / "app.js").read_bytes())


@pytest.mark.parametrize("tail", ["", "some/client/route", "missing.js", "deep/dir/", "index.html"])
def test_unknown_paths_fall_back_to_index_html(runner: StandinRunner, tail: str) -> None:
    resp = requests.get(f"{runner.url}{UI}/{tail}?tenant=acme&path=/x", timeout=T)
    assert resp.status_code == 200
    assert resp.content == (FILES / "index.html").read_bytes()
    assert resp.headers["content-type"] == "text/html"
    assert resp.headers["etag"] == etag_of("index.html")


@pytest.mark.parametrize(
    "tail",
    ["../../../etc/passwd.json", "a/../app.js", "./app.js", "%2e%2e/app.js", ".env", "assets/.hidden/x.js",
     "x.exe", "file.", "app.JS.txt", "a%5Capp.js", "a\\app.js", "a%01b.js", "a%7Fb.js", "/app.js"],
)
def test_bad_paths_are_400(runner: StandinRunner, tail: str) -> None:
    status, headers, body = raw(runner.url, "GET", f"{UI}/{tail}?tenant=acme")
    assert (status, body) == (400, b"invalid path")
    assert headers["Cache-Control"] == IMMUTABLE


@pytest.mark.parametrize("bad_hash", ["md5:abc", "sha256:", "sha256:xyz", HEX])
def test_malformed_content_hash_is_400(runner: StandinRunner, bad_hash: str) -> None:
    status, _, body = raw(runner.url, "GET", f"/ext-ui/{EXT}/{bad_hash}/index.html?tenant=acme")
    assert (status, body) == (400, b"invalid content hash")


@pytest.mark.parametrize(
    "target",
    [
        f"{UI}/index.html",
        f"{UI}/index.html?tenant=",
        f"/ext-ui/com.example.other/{HASH}/index.html?tenant=acme",
        f"/ext-ui/{EXT}/sha256:{'0' * 64}/index.html?tenant=acme",
        f"/ext-ui/..%2F..%2Fetc/{HASH}/x.js?tenant=a",
    ],
)
def test_unknown_tenant_extension_or_hash_is_404(runner: StandinRunner, target: str) -> None:
    status, headers, body = raw(runner.url, "GET", target)
    assert (status, body) == (404, b"")
    assert headers["Cache-Control"] == IMMUTABLE


def test_tenant_of_index_html_is_remembered_for_subresources(runner: StandinRunner) -> None:
    assert requests.get(f"{runner.url}{UI}/app.js", timeout=T).status_code == 404
    assert requests.get(f"{runner.url}{UI}/index.html?tenant=acme", timeout=T).status_code == 200
    assert requests.get(f"{runner.url}{UI}/app.js", timeout=T).status_code == 200  # as the reference


def test_tenants_option_stands_in_for_the_install_check() -> None:
    with served(tenants={"acme"}) as url:
        assert requests.get(f"{url}{UI}/index.html?tenant=acme", timeout=T).status_code == 200
        assert requests.get(f"{url}{UI}/index.html?tenant=evil", timeout=T).status_code == 404


def test_oversize_asset_is_413() -> None:
    with served(max_file_bytes=100) as url:
        resp = requests.get(f"{url}{UI}/index.html?tenant=acme", timeout=T)
        assert (resp.status_code, resp.text) == (413, "asset too large")


def test_head_has_the_get_headers_and_no_body_on_a_kept_alive_connection(runner: StandinRunner) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", runner.port, timeout=T)
    try:
        conn.request("HEAD", f"{UI}/index.html?tenant=acme")
        head = conn.getresponse()
        assert head.status == 200 and head.read() == b""
        assert head.headers["Content-Length"] == str(len((FILES / "index.html").read_bytes()))
        assert head.headers["ETag"] == etag_of("index.html")
        conn.request("GET", f"{UI}/style.css")  # same connection: no stray body bytes in between
        get = conn.getresponse()
        assert (get.status, get.read()) == (200, (FILES / "style.css").read_bytes())
    finally:
        conn.close()
    first, second = runner.received
    assert first.peer == second.peer


# -- the rest ---------------------------------------------------------------------------------------


def test_healthz(runner: StandinRunner) -> None:
    resp = requests.get(f"{runner.url}/healthz", timeout=T)
    assert resp.status_code == 200
    assert resp.json() == {"cache_writable": True, "bundle_store": "ok", "ext_cache_max_bytes": None}
    assert resp.headers["content-type"] == "application/json"
    head = requests.head(f"{runner.url}/healthz", timeout=T)
    assert head.status_code == 200 and head.content == b""


def test_root_redirects_to_the_only_bundle(runner: StandinRunner) -> None:
    resp = requests.get(f"{runner.url}/?tenant=acme", allow_redirects=False, timeout=T)
    assert resp.status_code == 307
    assert resp.headers["location"] == f"{UI}/index.html?tenant=acme"


def test_warmup_is_always_refused(runner: StandinRunner) -> None:
    resp = requests.post(f"{runner.url}/warmup", json={"content_hash": HASH}, timeout=T)
    assert (resp.status_code, resp.text) == (400, "warmup unsupported without tenant + extension context")
    assert requests.post(f"{runner.url}/warmup", data=b"{}", timeout=T).status_code == 415


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/execute", "POST"),
        ("POST", "/healthz", "GET,HEAD"),
        ("POST", f"{UI}/index.html", "GET,HEAD"),
        ("GET", "/warmup", "POST"),
        ("DELETE", "/", "GET,HEAD"),
    ],
)
def test_wrong_method_is_405_with_allow(runner: StandinRunner, method: str, path: str, allow: str) -> None:
    resp = requests.request(method, f"{runner.url}{path}", timeout=T)
    assert (resp.status_code, resp.headers["allow"]) == (405, allow)


@pytest.mark.parametrize("path", ["/nope", "/v1/execute/", "/healthz/", f"{UI}", "/ext-ui/", "/V1/execute"])
def test_anything_else_is_404(runner: StandinRunner, path: str) -> None:
    resp = requests.get(f"{runner.url}{path}", timeout=T)
    assert (resp.status_code, resp.content) == (404, b"")
    assert resp.headers["cache-control"] == IMMUTABLE


# -- python -m runner_mw.devrunner ----------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_module_serves_on_a_free_port_and_stops_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    with (tmp_path / "stderr").open("w+") as err, subprocess.Popen(
        [sys.executable, "-m", "runner_mw.devrunner", "--port", "0"],
        stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=tmp_path,
    ) as proc:
        assert proc.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 30
            match = None
            while match is None:
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    err.seek(0)
                    pytest.fail(f"no listening line within 30 s; stderr: {err.read()}")
                match = LISTENING.fullmatch(line)
            assert int(match[2]) > 0 and Path(match[3]) == SAMPLE_BUNDLES
            assert requests.get(f"{match[1]}/healthz", timeout=T).json()["bundle_store"] == "ok"
            proc.send_signal(sig)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(T)


def test_main_refuses_a_missing_bundles_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--bundles", str(tmp_path / "nope")])
    assert exc.value.code == 2
    assert "is not a folder" in capsys.readouterr().err


def test_main_reports_a_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        assert main(["--port", str(busy.getsockname()[1])]) == 1
    assert "cannot listen" in capsys.readouterr().err
