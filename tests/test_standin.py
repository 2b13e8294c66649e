"""The stand-in runners do what they say: recording, canned answers, and each socket-level fault."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.client
import json
import socket
import time

import pytest
import requests
from standin import (
    DRIP_BODY,
    DripRunner,
    GarbageRunner,
    HugeHeadersRunner,
    NonJsonRunner,
    ResetMidBodyRunner,
    SilentRunner,
    StandinRunner,
    closed_port,
    stream_digest,
)

T = 10  # seconds: generous, for a busy machine


def connect(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=T)


# -- StandinRunner ----------------------------------------------------------------------------------


def test_it_records_raw_path_headers_with_duplicates_body_and_peer() -> None:
    with StandinRunner() as runner:
        conn = connect(runner.port)
        try:
            conn.putrequest("POST", "/runner/%2e%2e/x?a=1&a=2", skip_accept_encoding=True)
            for name, value in [("X-Dup", "one"), ("X-Dup", "two"), ("Content-Type", "text/plain"),
                                ("Content-Length", "5")]:
                conn.putheader(name, value)
            conn.endheaders(b"hello")
            resp = conn.getresponse()
            assert resp.status == 404 and resp.headers["x-standin"] == "a"
            resp.read()
        finally:
            conn.close()
        (got,) = runner.wait_for(1)
        assert (got.method, got.raw_path, got.path, got.query) == (
            "POST", "/runner/%2e%2e/x?a=1&a=2", "/runner/%2e%2e/x", "a=1&a=2")
        assert got.headers["x-dup"] == "one, two"
        assert [(k, v) for k, v in got.header_list if k == "X-Dup"] == [("X-Dup", "one"), ("X-Dup", "two")]
        assert got.body == b"hello"
        assert got.peer[0] == "127.0.0.1" and got.peer[1] > 0
        runner.clear()
        assert runner.received == []


def test_chunked_request_bodies_are_recorded_whole() -> None:
    with StandinRunner() as runner:
        conn = connect(runner.port)
        try:
            conn.request("POST", "/nope", body=iter([b"ab", b"cd", b"ef"]), encode_chunked=True)
            conn.getresponse().read()
        finally:
            conn.close()
        assert runner.received[0].body == b"abcdef"
        assert runner.received[0].headers["transfer-encoding"] == "chunked"


def test_two_stand_ins_tell_themselves_apart() -> None:
    payload = {
        "context": {"tenant_id": "t", "extension_id": "e", "content_hash": "sha256:00"},
        "http": {"method": "GET", "path": "/"},
    }
    headers = {"x-alga-tenant": "t", "x-alga-extension": "e"}
    with StandinRunner(name="a") as a, StandinRunner(name="b") as b:
        for runner in (a, b):
            resp = requests.post(f"{runner.url}/v1/execute", json=payload, headers=headers, timeout=T)
            assert resp.headers["x-standin"] == runner.name
            echo = json.loads(base64.b64decode(resp.json()["body_b64"]))
            assert echo["runner"] == runner.name
        assert len(a.received) == len(b.received) == 1


def test_connections_are_kept_alive() -> None:
    with StandinRunner() as runner:
        conn = connect(runner.port)
        try:
            for _ in range(3):
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                assert resp.status == 200 and resp.headers.get("Connection") != "close"
                resp.read()
        finally:
            conn.close()
        assert len({r.peer for r in runner.received}) == 1


def test_respond_sends_exactly_the_canned_answer() -> None:
    packed = gzip.compress(b'{"ok": true}')
    with StandinRunner() as runner:
        canned = [
            ("Content-Type", "application/json"), ("Content-Encoding", "gzip"),
            ("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Path=/"),
            ("Keep-Alive", "timeout=5"), ("Proxy-Connection", "keep-alive"),
        ]
        runner.respond("/v1/execute", 200, canned, packed)
        runner.respond("/ext-ui/", 302, [("Location", "https://elsewhere.example/")])
        runner.respond("/ext-ui/deeper/", 413, [("Content-Type", "text/plain")], b"too big")
        conn = connect(runner.port)
        try:
            conn.request("POST", "/v1/execute", body=b"{}", headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.read() == packed  # http.client does not decompress: the bytes as sent
            assert resp.headers.get_all("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
            assert resp.headers["Keep-Alive"] == "timeout=5"
            assert resp.headers["Proxy-Connection"] == "keep-alive"
            assert resp.headers["Content-Length"] == str(len(packed))
            conn.request("GET", "/ext-ui/x")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (302, b"")
            assert resp.headers["Location"] == "https://elsewhere.example/"
            conn.request("GET", "/ext-ui/deeper/x")  # the longest prefix wins
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (413, b"too big")
        finally:
            conn.close()
        runner.reset()
        assert requests.get(f"{runner.url}/healthz", timeout=T).status_code == 200


def test_respond_chunked_and_delayed() -> None:
    with StandinRunner() as runner:
        runner.respond("/slow", 200, [("Content-Type", "text/plain")], b"late", chunked=True, delay=0.05)
        resp = requests.get(f"{runner.url}/slow", timeout=T)
        assert resp.text == "late"
        assert resp.headers["transfer-encoding"] == "chunked" and "content-length" not in resp.headers


def test_stream_asset_streams_a_large_body_with_content_length() -> None:
    total = 5 * 1024 * 1024 + 123
    with StandinRunner() as runner:
        runner.stream_asset("/ext-ui/big.bin", total, chunk=65536)
        digest = hashlib.sha256()
        with requests.get(f"{runner.url}/ext-ui/big.bin", stream=True, timeout=T) as resp:
            assert resp.headers["content-length"] == str(total)
            for part in resp.iter_content(1 << 20):
                digest.update(part)
        assert digest.hexdigest() == stream_digest(total)
        head = requests.head(f"{runner.url}/ext-ui/big.bin", timeout=T)
        assert head.headers["content-length"] == str(total) and head.content == b""


def test_exit_cuts_idle_kept_alive_connections_promptly() -> None:
    started = time.monotonic()
    conn = None
    try:
        with StandinRunner() as runner:
            conn = connect(runner.port)
            conn.request("GET", "/healthz")
            conn.getresponse().read()  # the connection now idles, kept alive
        assert time.monotonic() - started < 5
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            conn.request("GET", "/healthz")
            conn.getresponse()
    finally:
        if conn is not None:
            conn.close()


# -- fault servers ----------------------------------------------------------------------------------


def test_closed_port_refuses() -> None:
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{closed_port()}/healthz", timeout=T)


def test_silent_runner_times_a_client_out() -> None:
    with SilentRunner() as silent:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.get(f"{silent.url}/healthz", timeout=(T, 0.3))
        assert silent.connections == 1


def test_fault_servers_stop_with_a_client_still_connected() -> None:
    started = time.monotonic()
    with socket.socket() as sock:
        with SilentRunner() as silent:
            sock.settimeout(T)
            sock.connect(("127.0.0.1", silent.port))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            deadline = time.monotonic() + T
            while silent.connections < 1:
                assert time.monotonic() < deadline, "never accepted"
                time.sleep(0.01)
        assert time.monotonic() - started < 5
        # The stand-in closed its end on exit (a reset if it had not read the request yet).
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""


def test_reset_mid_body_runner_cuts_the_body_short() -> None:
    with ResetMidBodyRunner(1000) as reset:
        with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
            requests.get(f"{reset.url}/ext-ui/x", timeout=T)
        with socket.create_connection(("127.0.0.1", reset.port), timeout=T) as sock:
            sock.sendall(b"GET /ext-ui/x HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except ConnectionResetError:
                pass
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 1000" in head
        assert len(body) <= 500
        assert reset.connections == 2


def test_drip_runner_is_slower_than_a_short_read_timeout() -> None:
    with DripRunner(interval=1.0) as drip, pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(f"{drip.url}/v1/execute", timeout=(T, 0.2))


def test_drip_runner_eventually_sends_a_valid_response() -> None:
    with DripRunner(interval=0.002, head_at_once=True) as drip:
        resp = requests.post(f"{drip.url}/v1/execute", json={}, timeout=T)
        assert resp.status_code == 200 and resp.content == DRIP_BODY
        assert drip.connections == 1


def test_garbage_runner_is_not_http() -> None:
    with GarbageRunner() as garbage:
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"{garbage.url}/healthz", timeout=T)
        assert garbage.connections >= 1


def test_huge_headers_runner_sends_more_than_64_kib_of_headers() -> None:
    with HugeHeadersRunner() as huge:
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"{huge.url}/healthz", timeout=T)
        with socket.create_connection(("127.0.0.1", huge.port), timeout=T) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                assert chunk
                data += chunk
        assert data.index(b"\r\n\r\n") > 64 * 1024


def test_non_json_runner_answers_oops() -> None:
    with NonJsonRunner() as odd:
        resp = requests.post(f"{odd.url}/v1/execute", json={}, timeout=T)
        assert (resp.status_code, resp.headers["content-type"], resp.text) == (200, "text/plain", "oops")
        with pytest.raises(ValueError):
            resp.json()
        assert odd.connections == 1
