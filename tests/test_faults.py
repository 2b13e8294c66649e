"""Fault injection: after every kind of runner failure the same gateway recovers, leaking nothing.

The single-shot mapping of each fault to its status is tested in test_execute.py, test_assets.py
and test_backends.py. Here each fault hits one gateway several times (more than its pool has
connections), through a real loopback port, with small deadlines (connect 300 ms, read 700 ms);
then the same runner, on the same port, answers well again and the gateway must serve it at once:
no pool slot, socket or thread was left behind by the failures. Also: concurrent faults, a runner
that goes away and a reload to a dead one (status must tell the truth), bounded Knative retries.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from mwfixtures import (
    HOST,
    INDEX,
    Gateway,
    config_for,
    raw_exchange,
    running_gateway,
    wait_until,
)
from standin import DRIP_BODY, DripRunner, StandinRunner, _RawServer, _read_request, closed_port
from testsecrets import TEST_COOKIE, TEST_SERVICE_TOKEN, TEST_TOKEN

from runner_mw import RunnerMiddleware
from runner_mw.loader import config_from_mapping

pytest_plugins = ["mwfixtures"]

CONNECT_MS, READ_MS = 300, 700
READ_S = READ_MS / 1000
FAST = {"connect_ms": CONNECT_MS, "read_ms": READ_MS}
ASSET = INDEX + "?tenant=t1"
SECTIONS: dict[str, Any] = {
    "timeouts": FAST,
    "upstream": {"service_token": TEST_SERVICE_TOKEN, "pool_size": 2, "pool_wait_ms": 500},
    "access": {"tokens": [TEST_TOKEN]},
}


# --------------------------------------------------------------------------- a switchable runner


class Chameleon(_RawServer):
    """A runner on one port whose behaviour can be switched between requests (``mode``).

    ``good`` answers a valid execute reply or a small asset and keeps the connection alive; the
    other modes are faults. Switching back to ``good`` on the same port is what shows that the
    gateway's pool (one per host:port) came out of the faults intact.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mode = "good"
        self.served = 0

    def serve(self, conn: socket.socket) -> None:
        while not self._stop.is_set():
            head = _read_request(conn)
            if head is None:
                return
            mode = self.mode
            with self._lock:
                self.served += 1
            method = head.split(b" ", 1)[0]
            if mode == "good":
                body = DRIP_BODY if b"/v1/execute" in head.split(b"\r\n", 1)[0] else b"body{}"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + (b"" if method == b"HEAD" else body))
                continue
            self.fault(conn, mode)
            return

    def fault(self, conn: socket.socket, mode: str) -> None:
        if mode == "silent":
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    if not conn.recv(65536):
                        return
        elif mode == "garbage":
            conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\nnot http\r\n\r\n")
        elif mode == "close":
            pass  # closes without a word
        elif mode == "reset":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
                         + b"x" * 2000)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif mode == "huge":
            filler = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"a" * 400) for i in range(200))
            conn.sendall(b"HTTP/1.1 200 OK\r\n" + filler + b"Content-Length: 2\r\n\r\n{}")
        elif mode == "drip":  # 1 byte per 0.2 s: each read is quick, the whole reply is not
            data = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                    % len(DRIP_BODY)) + DRIP_BODY
            for i in range(len(data)):
                conn.sendall(data[i:i + 1])
                if self._stop.wait(0.2):
                    return
        elif mode == "nonjson":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\noops")
        elif mode == "error500":
            text = b"execute_failed: /srv/secret/x"
            conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(text), text))
        elif mode in ("reset-late", "stall-late", "reset-early", "stall-early"):
            # late: more than the gateway's first 64 KiB chunk arrives before the failure
            sent = 70_000 if mode.endswith("late") else 2000
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/javascript\r\nContent-Length: 100000\r\n\r\n"
                         + (b"x" * sent if mode != "stall-early" else b""))
            if mode.startswith("reset"):
                self._stop.wait(0.3)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    if not conn.recv(65536):
                        return
        else:  # pragma: no cover - a typo in a test
            raise ValueError(mode)


# --------------------------------------------------------------------------- threads


_existing: set[threading.Thread] = set()  # threads alive before the test (other tests' servers)


def request_threads() -> list[threading.Thread]:
    """This test's gateway request threads still alive (werkzeug: one per connection)."""
    return [t for t in threading.enumerate() if "process_request_thread" in t.name and t not in _existing]


@pytest.fixture
def no_thread_left() -> Iterator[None]:
    """After the test and its servers are gone, the thread count is back near its baseline."""
    _existing.clear()
    _existing.update(threading.enumerate())
    before = len([t for t in threading.enumerate() if t.name != "runner_mw-metrics"])
    yield
    # (runner_mw-metrics is the process's one flusher, started at the first metric and kept:
    # when this file runs alone, that is during one of its tests.)
    wait_until(lambda: len([t for t in threading.enumerate() if t.name != "runner_mw-metrics"]) <= before,
               timeout=15, what=f"threads back to {before}, now {[t.name for t in threading.enumerate()]}")


def settled() -> None:
    """No request thread of the gateway is still busy (nothing blocked after a fault)."""
    wait_until(lambda: not request_threads(), timeout=10,
               what=f"request threads to finish: {[t.name for t in request_threads()]}")


def call(gw: Gateway, route: str, timeout: float = 10.0) -> requests.Response:
    if route == "execute":
        return gw.execute(timeout=timeout)
    return gw.get(ASSET, timeout=timeout)


def assert_error(resp: requests.Response, status: int, code: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text[:200])
    assert resp.json() == {"error": code, "requestId": resp.headers["X-Request-Id"]}
    assert resp.headers["Cache-Control"] == "no-store"


def assert_serves(gw: Gateway, route: str) -> None:
    """Good requests are served at once: well within the pool wait and the deadlines."""
    for _ in range(3):
        started = time.monotonic()
        resp = call(gw, route)
        assert resp.status_code == 200, (resp.status_code, resp.text[:200])
        assert time.monotonic() - started < 3.0
    assert gw.get("/runner/-/healthz").status_code == 200
    assert gw.get("/somewhere/else").headers.get("X-From-App") == "yes"


# --------------------------------------------------------------------------- the fault matrix

#: mode -> (execute status, code), (asset status, code or None for a broken transfer / passthrough)
FAULTS: dict[str, tuple[tuple[int, str], tuple[int, str | None]]] = {
    "silent": ((504, "runner_timeout"), (504, "runner_timeout")),
    "garbage": ((502, "bad_gateway"), (502, "bad_gateway")),
    "close": ((502, "bad_gateway"), (502, "bad_gateway")),
    "huge": ((502, "bad_gateway"), (502, "bad_gateway")),
    "drip": ((504, "runner_timeout"), (200, None)),  # assets: see test_assets_drip_* below
    "nonjson": ((502, "bad_gateway"), (200, None)),
    "error500": ((502, "bad_gateway"), (500, None)),  # assets keep the runner's status
    "reset": ((502, "bad_gateway"), (200, None)),  # assets: a broken transfer (below)
}
MATRIX = [(mode, route) for mode in FAULTS for route in ("execute", "asset")
          if not (route == "asset" and mode in ("drip", "reset"))]


@pytest.mark.parametrize(("mode", "route"), MATRIX, ids=[f"{m}-{r}" for m, r in MATRIX])
def test_repeated_faults_leave_the_gateway_whole(mode: str, route: str, no_thread_left: None) -> None:
    (status, code) = FAULTS[mode][0] if route == "execute" else FAULTS[mode][1]
    with Chameleon() as runner, running_gateway("docker", runner_url=runner.url, **SECTIONS) as gw:
        assert_serves(gw, route)  # a pooled keep-alive connection exists before the faults
        runner.mode = mode
        for _ in range(4):  # twice the pool size: every fault must give its slot back
            started = time.monotonic()
            resp = call(gw, route)
            elapsed = time.monotonic() - started
            if code is not None:
                assert_error(resp, status, code)
            else:
                assert resp.status_code == status
                if status >= 400:
                    assert resp.headers["Cache-Control"] == "no-store"
                    assert "/srv/secret" in resp.text  # an asset error page passes as is
            assert elapsed < 3 * READ_S, f"{mode}: {elapsed:.2f} s for a {READ_MS} ms deadline"
            if mode in ("silent", "drip"):
                assert elapsed > READ_S * 0.9
        settled()
        runner.mode = "good"
        assert_serves(gw, route)
        settled()


@pytest.mark.parametrize("server", ["werkzeug", "waitress"])
@pytest.mark.parametrize("mode", ["reset-late", "stall-late"])
def test_an_asset_broken_mid_body_is_a_broken_transfer(mode: str, server: str, no_thread_left: None) -> None:
    with Chameleon() as runner, running_gateway("docker", server=server, runner_url=runner.url,
                                                **SECTIONS) as gw:
        runner.mode = mode
        for _ in range(3):
            with raw_exchange(gw.port, "GET", ASSET) as resp:
                assert resp.status == 200 and resp.getheader("Content-Length") == "100000"
                started = time.monotonic()
                with pytest.raises((http.client.IncompleteRead, ConnectionError)):
                    resp.read()  # never a complete-looking short body
                assert time.monotonic() - started < 0.3 + 3 * READ_S
        runner.mode = "good"
        assert_serves(gw, "asset")


@pytest.mark.parametrize("server", ["werkzeug", "waitress"])
@pytest.mark.parametrize(("mode", "status", "code"), [("reset-early", 502, "bad_gateway"),
                                                      ("stall-early", 504, "runner_timeout")])
def test_an_asset_failing_before_its_first_chunk_is_a_json_error(mode: str, status: int, code: str,
                                                                 server: str) -> None:
    with Chameleon() as runner, running_gateway("docker", server=server, runner_url=runner.url,
                                                **SECTIONS) as gw:
        runner.mode = mode
        resp = gw.get(ASSET)
        assert_error(resp, status, code)


def test_assets_drip_faster_than_read_ms_completes_in_bytes_times_interval(no_thread_left: None) -> None:
    # Design: for assets read_ms bounds the first byte and the longest silence, not the whole
    # download. 12 bytes at 0.2 s each: 2.2 s, three times read_ms, and it must not be cut
    # nor hang past bytes x interval (+ slack for a busy machine).
    body = b"/* 12 bytes"[:12].ljust(12, b"*")
    with DripRunner(0.2, body=body, content_type="text/css", head_at_once=True) as drip, \
            running_gateway("docker", runner_url=drip.url, **SECTIONS) as gw:
        started = time.monotonic()
        resp = gw.get("/runner/ext-ui/a/b/slow.css", timeout=30)
        elapsed = time.monotonic() - started
        assert resp.status_code == 200 and resp.content == body
        assert 0.9 * 11 * 0.2 < elapsed < 12 * 0.2 + 3.0, elapsed
        settled()


def test_execute_drip_is_cut_at_the_total_deadline_not_after_bytes_times_interval(
        no_thread_left: None) -> None:
    with DripRunner(0.2) as drip, running_gateway("docker", runner_url=drip.url, **SECTIONS) as gw:
        started = time.monotonic()
        resp = gw.execute(timeout=30)
        elapsed = time.monotonic() - started
        assert_error(resp, 504, "runner_timeout")
        assert READ_S * 0.9 < elapsed < 3 * READ_S, elapsed  # dripping it all would take > 20 s
        assert drip.connections == 1


@pytest.mark.parametrize("route", ["execute", "asset"])
def test_concurrent_faults_then_recovery(route: str, no_thread_left: None) -> None:
    # 8 clients against a silent runner with 2 pooled connections and a 500 ms pool wait: two wait
    # for the runner (504 after read_ms), the others may be shed (503) or get a freed slot (504).
    with Chameleon() as runner, running_gateway("docker", runner_url=runner.url, **SECTIONS) as gw:
        runner.mode = "silent"
        with ThreadPoolExecutor(8) as pool:
            started = time.monotonic()
            answers = list(pool.map(lambda _: call(gw, route), range(8)))
            elapsed = time.monotonic() - started
        codes = sorted((r.status_code, r.json()["error"]) for r in answers)
        assert {c for c in codes} <= {(503, "overloaded"), (504, "runner_timeout")}, codes
        assert codes.count((504, "runner_timeout")) >= 2
        for r in answers:
            if r.status_code == 503:
                assert r.headers["Retry-After"]
        assert elapsed < 4 * (READ_S + 0.5) + 3, elapsed  # each waits at most pool wait + read
        settled()
        runner.mode = "good"
        assert_serves(gw, route)


# --------------------------------------------------------------------------- unreachable runners


@pytest.mark.parametrize("url", ["closed", f"http://runner-{'x' * 8}.invalid:8085"], ids=["refused", "dns"])
@pytest.mark.parametrize("route", ["execute", "asset"])
def test_unreachable_runner_then_recovery_by_reload(url: str, route: str, no_thread_left: None) -> None:
    if url == "closed":
        url = f"http://{HOST}:{closed_port()}"
    with StandinRunner(name="good") as good, running_gateway("docker", runner_url=url, **SECTIONS) as gw:
        for _ in range(3):
            started = time.monotonic()
            resp = call(gw, route, timeout=30)
            assert_error(resp, 502, "runner_unreachable")
            # Refused: at once. DNS: not bounded by connect_ms (the resolver's own timeouts).
            assert time.monotonic() - started < (3 * CONNECT_MS / 1000 if "closed" in url else 10.0)
        settled()
        gw.middleware.store.apply(config_from_mapping(config_for(good.url, **SECTIONS)))
        assert_serves(gw, route)


def test_knative_retries_of_a_closed_port_are_bounded_by_attempts_and_budget(no_thread_left: None) -> None:
    url = f"http://{HOST}:{closed_port()}"
    cases = [  # (retry settings, least time the pauses take, most time allowed)
        ({"attempts": 1, "budget_ms": 10000, "backoff_ms": 1000}, 0.0, 0.9),  # no retry, no pause
        ({"attempts": 3, "budget_ms": 10000, "backoff_ms": 150}, 0.15 + 0.3, 3.0),  # attempts bound
        ({"attempts": 10, "budget_ms": 700, "backoff_ms": 200}, 0.2 + 0.4, 3.0),  # budget bound
    ]
    for retry, least, most in cases:
        with running_gateway("knative", runner_url=url, backend={"retry": retry}, **SECTIONS) as gw:
            started = time.monotonic()
            resp = gw.execute(timeout=30)
            elapsed = time.monotonic() - started
            assert_error(resp, 502, "runner_unreachable")
            assert least * 0.95 <= elapsed < most, (retry, elapsed)
            settled()


def test_knative_never_retries_what_was_sent(no_thread_left: None) -> None:
    with Chameleon() as runner, running_gateway(
            "knative", runner_url=runner.url, backend={"retry": {"attempts": 5, "backoff_ms": 10}},
            **SECTIONS) as gw:
        for mode, status in (("silent", 504), ("garbage", 502), ("close", 502)):
            runner.mode = mode
            served = runner.served
            assert gw.execute().status_code == status
            assert runner.served == served + 1, mode
        settled()


# --------------------------------------------------------------------------- runner goes away


def write_config(path: Path, url: str) -> None:
    data = config_for(url, **SECTIONS)
    path.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML


@contextlib.contextmanager
def file_gateway(path: Path) -> Iterator[Gateway]:
    from mwfixtures import RecordingApp, serve_wsgi

    app = RecordingApp()
    mw = RunnerMiddleware(app, path, reload_signal=False)
    try:
        with serve_wsgi(mw) as served:
            yield Gateway(served.url, served.port, "docker", "werkzeug", mw, app, None, {})
    finally:
        mw.close()


def status_of(gw: Gateway) -> dict[str, Any]:
    resp = gw.get("/runner/-/status")
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def test_a_runner_that_stops_and_a_reload_to_a_dead_one(tmp_path: Path, no_thread_left: None) -> None:
    config = tmp_path / "runner.yaml"
    with contextlib.ExitStack() as stack:
        runner = stack.enter_context(StandinRunner(name="first"))
        write_config(config, runner.url)
        gw = stack.enter_context(file_gateway(config))
        assert_serves(gw, "execute")
        assert status_of(gw)["upstream"]["ok"] is True

        runner.__exit__(None, None, None)  # the runner stops, the pool holds a dead keep-alive
        for _ in range(3):
            resp = gw.execute()
            assert resp.status_code == 502, resp.text
            assert resp.json()["error"] in ("runner_unreachable", "bad_gateway")
        # The health shown is cached for a few seconds; then it must say the truth.
        wait_until(lambda: status_of(gw)["upstream"]["ok"] is False, timeout=15, what="upstream.ok false")

        dead = f"http://{HOST}:{closed_port()}"
        write_config(config, dead)
        outcome = gw.middleware.reload()
        assert outcome.ok and outcome.generation == 2
        assert_error(gw.execute(), 502, "runner_unreachable")
        assert_error(gw.get(ASSET), 502, "runner_unreachable")
        doc = status_of(gw)
        assert doc["generation"] == 2 and doc["url"] == dead
        assert doc["upstream"]["ok"] is False and doc["last_reload"]["ok"] is True
        settled()

        second = stack.enter_context(StandinRunner(name="second"))
        write_config(config, second.url)
        assert gw.middleware.reload().generation == 3
        assert_serves(gw, "execute")
        assert status_of(gw)["upstream"]["ok"] is True


def test_the_health_probe_sends_the_service_token() -> None:
    with running_gateway("docker", **SECTIONS) as gw:
        assert gw.get("/runner/-/status").status_code == 200
        probes = [r for r in gw.runner.received if r.path == "/healthz"]
        assert probes and probes[0].headers.get("x-runner-service-token") == TEST_SERVICE_TOKEN


def test_faults_never_echo_runner_text_or_secrets(no_thread_left: None) -> None:
    with Chameleon() as runner, running_gateway("docker", runner_url=runner.url, **SECTIONS) as gw:
        for mode in ("error500", "garbage", "nonjson"):
            runner.mode = mode
            credentials = {"Cookie": f"sid={TEST_COOKIE}", "Authorization": f"Bearer {TEST_TOKEN}"}
            resp = gw.execute(headers=credentials)
            assert resp.status_code == 502
            for text in ("/srv/secret", "SSH", "oops", TEST_COOKIE, TEST_TOKEN, TEST_SERVICE_TOKEN):
                assert text not in resp.text
        settled()
