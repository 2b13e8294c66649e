"""gunicorn with runner_mw's hooks, as real processes: HUP swaps the config in place in every worker.

Each test starts ``python -m gunicorn -c config/gunicorn.conf.py`` on a free loopback port in its
own process group (always stopped at the end) and talks to it over HTTP only. Set
``RUNNER_MW_TEST_GUNICORN_PATH`` to a folder holding another gunicorn package to run the same
tests against that version (the supported range is pinned in setup.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import mwfixtures
import pytest
import requests
from standin import SilentRunner, StandinRunner
from traffic import ASSET, BROKEN, CLOSE, T, Traffic, config_text

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "config" / "gunicorn.conf.py"
HOST = "127.0.0.1"

# The app gunicorn loads: a plain WSGI app wrapped in the middleware, reading $RUNNER_MW_CONFIG.
# It also tells where it was imported and which threads existed then (preload_app checks).
APP_MODULE = """\
import json, os, threading, time
from runner_mw import RunnerMiddleware

if os.environ.get("RUNNER_MW_TEST_IMPORT_DELAY"):  # a slow app import
    # gunicorn sets a worker's signals up, then imports the app: from here on, they are.
    open(f"importing-{os.getpid()}", "w").close()
    time.sleep(float(os.environ["RUNNER_MW_TEST_IMPORT_DELAY"]))

IMPORTED_IN = os.getpid()

def hello(environ, start_response):
    body = json.dumps({"pid": os.getpid(), "imported_in": IMPORTED_IN,
                       "threads_at_import": THREADS}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]

application = RunnerMiddleware(hello, os.environ["RUNNER_MW_CONFIG"])
THREADS = sorted(t.name for t in threading.enumerate())
"""

BROKEN_LINE = ":6: backends.a.url"


def write_atomically(file: Path, text: str) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, file)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# The suite's one poll helper, with this module's longer deadline (processes boot here).
wait_until = partial(mwfixtures.wait_until, timeout=T)


class Gunicorn:
    """One gunicorn master (and its workers) in a process group of its own."""

    def __init__(self, tmp_path: Path, config_file: Path, *, worker_class: str = "gthread",
                 preload: bool = False, max_requests: int = 0, workers: int = 2) -> None:
        self.dir = tmp_path
        self.config_file = config_file
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.log = tmp_path / "gunicorn.log"
        self.pidfile = tmp_path / "gunicorn.pid"
        self.tmpdir = tmp_path / "tmp"  # TMPDIR of gunicorn: where the hooks' state folder goes
        self.tmpdir.mkdir(exist_ok=True)
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "app_mod.py").write_text(APP_MODULE, encoding="utf-8")
        self.args = [sys.executable, "-m", "gunicorn", "-c", str(CONF), "--bind", f"{HOST}:{self.port}",
                     # threads > 1 would turn "sync" into gthread
                     "--workers", str(workers), "--worker-class", worker_class,
                     "--threads", "4" if worker_class == "gthread" else "1",
                     "--pid", str(self.pidfile), "--log-level", "info"]
        if preload:
            self.args.append("--preload")
        if max_requests:
            self.args += ["--max-requests", str(max_requests), "--max-requests-jitter", "0"]
        self.args.append("app_mod:application")
        paths = [os.environ.get("RUNNER_MW_TEST_GUNICORN_PATH", ""), str(REPO), str(tmp_path)]
        self.env = {**os.environ, "RUNNER_MW_CONFIG": str(config_file), "TMPDIR": str(self.tmpdir),
                    "XDG_RUNTIME_DIR": str(tmp_path / "run"),  # gunicorn >= 25's control socket
                    "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.args, cwd=self.dir, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self.proc

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(T)
        with contextlib.suppress(ProcessLookupError):  # anything left of the group
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(T)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def hup(self) -> None:
        os.kill(self.pid, signal.SIGHUP)

    # -- looking at it -------------------------------------------------------------------------

    def workers(self) -> set[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.pid)], capture_output=True,
                             text=True, check=False).stdout
        return {int(p) for p in out.split()}

    def status(self) -> dict[str, Any] | None:
        """One worker's status (whichever accepts the connection), None if none answered."""
        try:
            resp = requests.get(self.base + "/runner/-/status", headers=CLOSE, timeout=10)
        except requests.RequestException:
            return None
        with resp:
            if resp.status_code != 200:
                return None
            doc: dict[str, Any] = resp.json()
            return doc

    def all_workers(self, predicate: Callable[[dict[str, Any]], bool], what: str,
                    timeout: float = T) -> dict[int, dict[str, Any]]:
        """Poll status until every current worker answered with ``predicate`` true."""
        deadline = time.monotonic() + timeout
        good: dict[int, dict[str, Any]] = {}
        while True:
            assert self.alive(), f"gunicorn exited while waiting for {what}:\n{self.text()[-3000:]}"
            doc = self.status()
            if doc is not None:
                if predicate(doc):
                    good[doc["pid"]] = doc
                else:
                    good.pop(doc["pid"], None)
            kids = self.workers()
            if len(kids) == 2 and kids <= set(good):
                return {pid: good[pid] for pid in kids}
            assert time.monotonic() < deadline, (
                f"timed out waiting for {what}: workers {kids}, good {sorted(good)}, last {doc}\n"
                f"{self.text()[-3000:]}")
            time.sleep(0.01)

    def ready(self) -> dict[int, dict[str, Any]]:
        return self.all_workers(lambda doc: True, "both workers to answer")


@contextlib.contextmanager
def gunicorn(tmp_path: Path, config_file: Path, **options: Any) -> Iterator[Gunicorn]:
    server = Gunicorn(tmp_path, config_file, **options)
    server.start()
    try:
        server.ready()
        yield server
    finally:
        server.stop()
    assert list(server.tmpdir.iterdir()) == [], "on_exit leaves no state folder behind"


@pytest.fixture
def runners() -> Iterator[tuple[StandinRunner, StandinRunner]]:
    with StandinRunner(name="a") as a, StandinRunner(name="b") as b:
        yield a, b


@pytest.fixture
def config_file(tmp_path: Path, runners: tuple[StandinRunner, StandinRunner]) -> Path:
    file = tmp_path / "runner.yaml"
    file.write_text(config_text(runners[0]), encoding="utf-8")
    return file


def log_lines(server: Gunicorn, pattern: str) -> list[str]:
    return [line for line in server.text().splitlines() if re.search(pattern, line)]


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("worker_class", ["sync", "gthread", "gevent"])
def test_20_hups_switch_backends_in_place_without_failing_a_request(
        worker_class: str, tmp_path: Path, config_file: Path,
        runners: tuple[StandinRunner, StandinRunner]) -> None:
    with gunicorn(tmp_path, config_file, worker_class=worker_class) as server:
        first = server.ready()
        pids = set(first)
        assert {d["generation"] for d in first.values()} == {1}
        assert f"Using worker: {worker_class}" in server.text()
        switch_s: list[float] = []
        with Traffic(server.base, keep_alive=(True, False)) as traffic:
            traffic.wait_for(4)
            for i in range(20):
                runner = runners[(i + 1) % 2]
                config_file.write_text(config_text(runner), encoding="utf-8")
                started = time.monotonic()
                server.hup()
                docs = server.all_workers(
                    lambda d, g=i + 2, r=runner.name: d["generation"] == g and d["backend"] == r,
                    f"generation {i + 2} ({runner.name}) on every worker")
                switch_s.append(time.monotonic() - started)
                assert all(d["last_reload"]["ok"] and d["url"] == runner.url for d in docs.values())
                assert len({d["config_sha256"] for d in docs.values()}) == 1
                traffic.wait_for(4)
        assert traffic.failures == []
        assert traffic.runners == {"a", "b"}
        assert server.workers() == pids, "the same worker processes served every generation"
        # The master logs each attempt right after publishing it: allow it a moment.
        ok_line = r"runner_mw reload result=ok generation=\d+ backend="
        wait_until(lambda: len(log_lines(server, ok_line)) == 21, what="21 result=ok lines (start + 20 HUPs)")
        assert len(log_lines(server, r"Booting worker")) == 2
    ms = sorted(round(s * 1000) for s in switch_s)
    print(f"\n{worker_class}: 20 switches, HUP -> every worker on the new generation (ms, incl. polling): "
          f"min {ms[0]} median {statistics.median(ms):.0f} max {ms[-1]}; {traffic.ok} requests, 0 failed")


def test_a_broken_missing_or_renamed_file_under_gunicorn(
        tmp_path: Path, config_file: Path, runners: tuple[StandinRunner, StandinRunner]) -> None:
    with gunicorn(tmp_path, config_file) as server:
        pids = set(server.ready())
        # The published state holds interpolated secrets: private folder, private file.
        [state_dir] = server.tmpdir.iterdir()
        assert state_dir.name.startswith("runner-mw-") and state_dir.stat().st_mode & 0o777 == 0o700
        assert (state_dir / "state.json").stat().st_mode & 0o777 == 0o600
        # Invalid: nothing changes, every worker reports the failed attempt with FILE:LINE.
        config_file.write_text(BROKEN, encoding="utf-8")
        server.hup()
        docs = server.all_workers(lambda d: d["last_reload"]["ok"] is False, "the failure in every status")
        for doc in docs.values():
            assert doc["backend"] == "a" and doc["generation"] == 1
            assert f"{config_file}{BROKEN_LINE}" in doc["last_reload"]["error"]
        failed = wait_until(lambda: log_lines(server, "runner_mw reload result=failed"), what="the log line")
        assert len(failed) == 1 and f"{config_file}{BROKEN_LINE}" in failed[0] and "kept=a" in failed[0]
        with requests.get(server.base + ASSET, headers=CLOSE, timeout=10) as resp:
            assert resp.status_code == 200 and resp.headers["x-standin"] == "a"
        # Deleted: the same.
        config_file.unlink()
        server.hup()
        docs = server.all_workers(lambda d: "cannot read file" in (d["last_reload"]["error"] or ""),
                                  "the missing file in every status")
        for doc in docs.values():
            assert doc["backend"] == "a" and str(config_file) in doc["last_reload"]["error"]
        # A file put in place by an atomic rename (how editors and ConfigMaps do it) is picked up.
        write_atomically(config_file, config_text(runners[1]))
        server.hup()
        docs = server.all_workers(lambda d: d["backend"] == "b" and d["last_reload"]["ok"] is True,
                                  "the renamed file in every worker")
        assert {d["generation"] for d in docs.values()} == {2}
        # The same file again is a no-op; a HUP sent to a worker itself changes nothing either.
        server.hup()
        wait_until(lambda: log_lines(server, "result=unchanged generation=2"), what="the no-op reload")
        victim = min(pids)
        os.kill(victim, signal.SIGHUP)
        docs = server.all_workers(lambda d: d["generation"] == 2, "both workers still there")
        assert server.workers() == pids and victim in docs
        assert server.alive()


def test_a_rotated_secret_file_and_a_hup_reach_every_worker(
        tmp_path: Path, config_file: Path, runners: tuple[StandinRunner, StandinRunner]) -> None:
    # The YAML stays the same; the service token file it names is rotated. The master must
    # see a change (not "unchanged"), and every worker must send the new token.
    token = tmp_path / "svc-token"
    token.write_text("first-service-token-0001\n", encoding="utf-8")
    config_file.write_text(config_text(runners[0]) + "upstream:\n  service_token: {file: svc-token}\n",
                           encoding="utf-8")
    runner = runners[0]
    with gunicorn(tmp_path, config_file) as server:
        write_atomically(token, "second-service-token-002\n")
        server.hup()
        server.all_workers(lambda d: d["generation"] == 2, "generation 2 in every worker")
        assert not log_lines(server, "result=unchanged")
        seen = len(runner.received)  # (status polls probed the runner with the old token before)
        for _ in range(8):  # new connections: both workers answer
            assert requests.get(server.base + ASSET, headers=CLOSE, timeout=T).status_code == 200
        sent = {r.headers.get("x-runner-service-token") for r in runner.received[seen:]}
        assert sent == {"second-service-token-002"}
    assert "second-service-token-002" not in server.text()  # logs never show it


def test_a_hup_to_the_process_group_while_workers_import_the_app_kills_none(
        tmp_path: Path, config_file: Path) -> None:
    server = Gunicorn(tmp_path, config_file)
    server.env["RUNNER_MW_TEST_IMPORT_DELAY"] = "3"
    server.start()
    try:
        marks = wait_until(lambda: m if len(m := list(tmp_path.glob("importing-*"))) == 2 else None,
                           what="both workers importing the app")
        booting = {int(mark.name.split("-")[1]) for mark in marks}
        os.killpg(server.pid, signal.SIGHUP)  # while both still import the app (3 s)
        server.ready()
        assert server.workers() == booting, server.text()[-2000:]
        assert not log_lines(server, "was sent SIGHUP")
    finally:
        server.stop()


def test_a_burst_of_100_hups_ends_on_the_last_file(
        tmp_path: Path, config_file: Path, runners: tuple[StandinRunner, StandinRunner]) -> None:
    with gunicorn(tmp_path, config_file) as server:
        pids = set(server.ready())
        for i in range(100):
            text = config_text(runners[i % 2], read_ms=10000 + i)
            write_atomically(config_file, text)
            server.hup()
        final = hashlib.sha256(text.encode()).hexdigest()
        docs = server.all_workers(lambda d: d["config_sha256"] == final and d["last_reload"]["ok"],
                                  "the last file on every worker")
        assert {d["backend"] for d in docs.values()} == {"b"}
        assert server.workers() == pids and server.alive()
        wait_until(lambda: len(log_lines(server, "runner_mw reload result=")) >= 2, what="the log lines")
        handled = len(log_lines(server, "runner_mw reload result="))
        assert handled <= 101
        print(f"\nburst: 100 HUPs sent, the master handled {handled - 1} (pending signals coalesce)")


def test_preload_app_builds_in_the_master_and_workers_still_follow(
        tmp_path: Path, config_file: Path, runners: tuple[StandinRunner, StandinRunner]) -> None:
    with gunicorn(tmp_path, config_file, preload=True) as server:
        pids = set(server.ready())
        with requests.get(server.base + "/", headers=CLOSE, timeout=10) as resp:
            app = resp.json()
        assert app["imported_in"] == server.pid, "preload_app: the app was built in the master"
        assert app["threads_at_import"] == ["MainThread"], "no thread may start before the fork"
        config_file.write_text(config_text(runners[1]), encoding="utf-8")
        server.hup()
        server.all_workers(lambda d: d["backend"] == "b" and d["generation"] == 2, "generation 2")
        config_file.write_text(BROKEN, encoding="utf-8")
        server.hup()
        docs = server.all_workers(lambda d: d["last_reload"]["ok"] is False, "the failure")
        assert all(d["backend"] == "b" and BROKEN_LINE in d["last_reload"]["error"] for d in docs.values())
        # The last good file again: same generation, and the error is cleared everywhere.
        config_file.write_text(config_text(runners[1]), encoding="utf-8")
        server.hup()
        server.all_workers(lambda d: d["generation"] == 2 and d["last_reload"]["ok"] is True, "no error")
        assert server.workers() == pids


def _reply(sock: socket.socket) -> tuple[int, bytes]:
    """One whole reply: status and body (gunicorn writes the head and the body apart)."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, resp.read()


def test_a_malformed_or_cut_chunked_body_is_the_clients_400_not_a_500(tmp_path: Path,
                                                                      config_file: Path) -> None:
    # gunicorn's body reader raises (InvalidChunkSize, NoMoreData) inside the app's read.
    head = (b"POST /v1/execute HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    with gunicorn(tmp_path, config_file) as server:
        for body, shut in ((b"ZZ\r\n{}\r\n0\r\n\r\n", False), (b"10\r\n{\"context\":", True)):
            with socket.create_connection((HOST, server.port), timeout=10) as sock:
                sock.sendall(head + body)
                if shut:
                    sock.shutdown(socket.SHUT_WR)  # the client stops sending mid-body
                status, body = _reply(sock)
            assert (status, json.loads(body)["error"]) == (400, "invalid_request"), body
        assert log_lines(server, "internal error") == []


def test_no_preload_builds_the_app_in_each_worker(tmp_path: Path, config_file: Path) -> None:
    with gunicorn(tmp_path, config_file) as server:
        docs = server.ready()
        seen: set[int] = set()

        def imported_in_both() -> bool:
            with requests.get(server.base + "/", headers=CLOSE, timeout=10) as resp:
                app = resp.json()
            assert app["imported_in"] == app["pid"] != server.pid
            seen.add(app["pid"])
            return seen == set(docs)

        wait_until(imported_in_both, what="an answer from both workers")


def test_workers_recycled_while_the_file_is_broken_boot_from_the_last_good_config(
        tmp_path: Path, config_file: Path, runners: tuple[StandinRunner, StandinRunner]) -> None:
    with gunicorn(tmp_path, config_file, max_requests=25) as server:
        server.ready()
        config_file.write_text(config_text(runners[1]), encoding="utf-8")
        server.hup()
        server.all_workers(lambda d: d["backend"] == "b" and d["generation"] == 2, "generation 2")
        config_file.write_text(BROKEN, encoding="utf-8")
        server.hup()
        # Status requests count too, so workers may already have been replaced: the ones that
        # report the failure were all there once it was published.
        first = set(server.all_workers(lambda d: d["last_reload"]["ok"] is False, "the failure"))
        served: list[str] = []

        def recycled() -> bool:
            assert server.alive(), server.text()[-3000:]
            try:
                with requests.get(server.base + ASSET, headers=CLOSE, timeout=10) as resp:
                    served.append(resp.headers.get("x-standin", str(resp.status_code)))
            except requests.RequestException as exc:
                served.append(type(exc).__name__)
            return not (server.workers() & first)

        wait_until(recycled, what="max_requests to replace both workers")
        docs = server.all_workers(lambda d: d["pid"] not in first, "answers from the new workers")
        for doc in docs.values():
            assert doc["backend"] == "b" and doc["generation"] == 2
            assert doc["last_reload"]["ok"] is False and BROKEN_LINE in doc["last_reload"]["error"]
        assert "Worker failed to boot" not in server.text()
        assert "b" in served and "a" not in served
        # Fixed: the new workers follow the next HUP too.
        config_file.write_text(config_text(runners[0]), encoding="utf-8")
        server.hup()
        server.all_workers(lambda d: d["backend"] == "a" and d["generation"] == 3 and d["last_reload"]["ok"],
                           "generation 3")


def _reloads(server: Gunicorn, result: str) -> float:
    with requests.get(server.base + "/runner/-/metrics", headers=CLOSE, timeout=10) as resp:
        found = re.search(rf'^runner_mw_reloads_total\{{result="{result}"\}} (\S+)$', resp.text, re.M)
    return float(found[1]) if found else 0.0


def test_a_worker_booting_after_a_failed_reload_takes_it_over_without_counting_it_again(
        tmp_path: Path, config_file: Path) -> None:
    with gunicorn(tmp_path, config_file) as server:
        config_file.write_text(BROKEN, encoding="utf-8")
        server.hup()
        docs = server.all_workers(lambda d: d["last_reload"]["ok"] is False, "the failure")
        assert len({d["last_reload"]["at"] for d in docs.values()}) == 1  # the master's time, in each
        (at,) = {d["last_reload"]["at"] for d in docs.values()}
        wait_until(lambda: _reloads(server, "failed") == 2, what="one attempt counted by each worker")
        gone = min(docs)
        os.kill(gone, signal.SIGKILL)
        new = server.all_workers(lambda d: d["pid"] != gone and d["last_reload"]["ok"] is False,
                                 "a new worker reporting the failure")
        assert all(d["last_reload"]["at"] == at for d in new.values())
        assert _reloads(server, "failed") == 2  # the new worker did not see an attempt happen


def test_a_preloaded_worker_booting_after_a_reload_does_not_count_it_again(
        tmp_path: Path, config_file: Path, runners: tuple[StandinRunner, StandinRunner]) -> None:
    # With preload_app a new worker is forked on the master's first config and catches up at
    # boot: each recycled worker counted (and logged) one more successful reload.
    with gunicorn(tmp_path, config_file, preload=True) as server:
        server.ready()
        config_file.write_text(config_text(runners[1]), encoding="utf-8")
        server.hup()
        docs = server.all_workers(lambda d: d["backend"] == "b" and d["generation"] == 2, "generation 2")
        wait_until(lambda: _reloads(server, "ok") == 2, what="one swap counted by each worker")
        gone = min(docs)
        os.kill(gone, signal.SIGKILL)
        server.all_workers(lambda d: d["pid"] != gone and d["backend"] == "b", "a new worker on b")
        assert _reloads(server, "ok") == 2


def test_a_ca_bundle_broken_after_the_start_does_not_stop_a_worker_from_booting(
        tmp_path: Path, runners: tuple[StandinRunner, StandinRunner]) -> None:
    # A rotated or removed CA bundle must not turn a worker's recycling into "Worker failed
    # to boot" (which stops the whole server): the worker takes the master's checked config.
    ca = tmp_path / "ca.pem"
    ca.write_bytes(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()
                   if Path("/etc/ssl/certs/ca-certificates.crt").exists() else _self_signed(tmp_path))
    config_file = tmp_path / "runner.yaml"
    config_file.write_text(config_text(runners[0]).replace("    kind: docker\n",
                                                           f"    kind: docker\n    ca_bundle: {ca}\n"),
                           encoding="utf-8")
    with gunicorn(tmp_path, config_file) as server:
        docs = server.ready()
        ca.write_text("being rotated\n", encoding="utf-8")
        gone = min(docs)
        os.kill(gone, signal.SIGKILL)
        server.all_workers(lambda d: d["pid"] != gone, "a new worker")
        assert server.alive() and "Worker failed to boot" not in server.text()
        with requests.get(server.base + ASSET, headers=CLOSE, timeout=10) as resp:
            assert resp.status_code == 200  # plain http: the bundle is not even used


def _self_signed(folder: Path) -> bytes:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(folder / "k.pem"), "-out", str(folder / "c.pem"), "-days", "2",
                    "-subj", "/CN=x"], check=True, capture_output=True, timeout=60)
    return (folder / "c.pem").read_bytes()


def test_gunicorns_env_option_is_seen_by_the_worker_timeout(
        tmp_path: Path, runners: tuple[StandinRunner, StandinRunner]) -> None:
    # gunicorn reads the config module before it applies -e: worker_timeout() there saw
    # read_ms 1000 (9 s), the master then validated 20000 (33 s) and raises the timeouts.
    config_file = tmp_path / "runner.yaml"
    config_file.write_text(config_text(runners[0]).replace("read_ms: 30000", "read_ms: ${RMW_T:-1000}"),
                           encoding="utf-8")
    server = Gunicorn(tmp_path, config_file)
    server.env.pop("RMW_T", None)
    server.args[-1:-1] = ["-e", "RMW_T=20000"]
    server.start()
    try:
        server.ready()
        assert log_lines(server, r"runner_mw: timeout raised from 9 s to 33 s")
        assert log_lines(server, r"runner_mw: graceful_timeout raised with it, to 33 s")
    finally:
        server.stop()
    # A timeout of 0 is gunicorn's "off": the user's choice, left alone.
    (tmp_path / "off").mkdir()
    off = Gunicorn(tmp_path / "off", config_file)
    off.env.pop("RMW_T", None)
    off.args[-1:-1] = ["-e", "RMW_T=20000", "--timeout", "0"]
    off.start()
    try:
        off.ready()
        assert log_lines(off, "raised") == []
    finally:
        off.stop()


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_a_broken_file_at_the_first_start_fails_fast_and_clearly(
        preload: bool, tmp_path: Path) -> None:
    file = tmp_path / "runner.yaml"
    file.write_text(BROKEN, encoding="utf-8")
    server = Gunicorn(tmp_path, file, preload=preload)
    proc = server.start()
    try:
        code = proc.wait(T)
    finally:
        server.stop()
    text = server.text()
    assert code != 0
    assert "Error: runner_mw:" in text and "invalid configuration, not starting" in text
    assert f"{file}{BROKEN_LINE}" in text
    assert "Traceback" not in text
    assert "Booting worker" not in text
    assert not server.pidfile.exists()
    assert list(server.tmpdir.iterdir()) == []


@pytest.mark.parametrize("worker_class", ["sync", "gthread", "gevent"])
def test_a_client_that_stops_reading_a_streamed_asset_is_cut_after_read_ms(
        tmp_path: Path, runners: tuple[StandinRunner, StandinRunner], worker_class: str) -> None:
    # gunicorn writes to clients with no timeout: without runner_mw's send deadline this client
    # would hold a worker thread and the runner connection for as long as it keeps its socket.
    a = runners[0]
    total = 256 * 1024 * 1024  # far beyond what the kernel's socket buffers hold
    a.stream_asset("/ext-ui/big/", total)
    file = tmp_path / "runner.yaml"
    file.write_text(config_text(a, read_ms=1000), encoding="utf-8")
    with gunicorn(tmp_path, file, worker_class=worker_class) as server:
        pids = server.workers()
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with client:
            client.connect((HOST, server.port))
            client.sendall(b"GET /runner/ext-ui/big/h/file.bin HTTP/1.1\r\nHost: localhost\r\n"
                           b"X-Request-Id: stalls\r\n\r\n")
            assert client.recv(12) == b"HTTP/1.1 200"
            # ... and reads nothing more, but keeps the connection open.
            cut = wait_until(lambda: log_lines(server, r"status=499 .*request_id=stalls\b"),
                             what="the stalled client's access line (499)")
            assert len(cut) == 1
            client.settimeout(T)
            got = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := client.recv(1 << 20):  # what was in flight, then the end
                    got += len(chunk)
            assert got < total  # the server dropped it; the body never looked whole
        assert server.workers() == pids  # no worker died of it
        assert requests.get(server.base + ASSET, timeout=T).status_code == 200


@pytest.mark.parametrize("worker_class", ["sync", "gthread", "gevent"])
def test_a_silent_runner_is_a_504_at_read_ms_under_each_worker_class(tmp_path: Path,
                                                                     worker_class: str) -> None:
    # A green socket (gevent, eventlet) is non-blocking underneath and waits in its hub: the
    # kernel's receive timeout that bounds a plain socket was never seen there, and a runner
    # that accepts and never answers held the call (and its pool slot) for good.
    with SilentRunner() as runner:
        file = tmp_path / "runner.yaml"
        file.write_text(f"version: 1\nbackend: a\nbackends:\n  a:\n    kind: docker\n    url: {runner.url}\n"
                        "timeouts:\n  connect_ms: 2000\n  read_ms: 1000\n", encoding="utf-8")
        with gunicorn(tmp_path, file, worker_class=worker_class) as server:
            for method, path in (("POST", "/v1/execute"), ("GET", ASSET)):
                started = time.monotonic()
                resp = requests.request(method, server.base + path, json=mwfixtures.envelope(),
                                        headers=CLOSE, timeout=4 * T)
                assert resp.status_code == 504 and resp.json()["error"] == "runner_timeout", resp.text
                assert time.monotonic() - started < T, "cut at read_ms (1 s), not when the runner left"


def test_access_lines_logged_at_once_do_not_freeze_a_gevent_worker(tmp_path: Path) -> None:
    # A worker's first access lines, logged by two green threads at once: the first held a lock
    # made before gevent patched threading (a real one) across Thread.start(), which yields to
    # the hub; the second then blocked the whole worker on it, until gunicorn killed it.
    with StandinRunner(name="a") as runner:
        runner.respond("/ext-ui/slow/", 200, [("Content-Type", "text/css")], b"body{}", delay=1.0)
        file = tmp_path / "runner.yaml"
        file.write_text(config_text(runner) + "upstream:\n  pool_size: 4\n  pool_wait_ms: 500\n",
                        encoding="utf-8")
        server = Gunicorn(tmp_path, file, worker_class="gevent", workers=1)
        server.start()
        try:
            # Ready when the worker answered the host app ("hello": no line of runner_mw's, so
            # the burst below is its first runner_mw request).
            seen: set[int] = set()

            def answered() -> bool:
                with contextlib.suppress(requests.RequestException):
                    seen.add(requests.get(server.base + "/", headers=CLOSE, timeout=T).json()["pid"])
                return len(seen) == 1

            mwfixtures.wait_until(answered, what="the worker to answer")
            statuses: list[int] = []

            def get() -> None:
                resp = requests.get(server.base + "/runner/ext-ui/slow/h/x.css", headers=CLOSE, timeout=4 * T)
                statuses.append(resp.status_code)

            clients = [threading.Thread(target=get) for _ in range(12)]
            for client in clients:
                client.start()
            for client in clients:
                client.join()
            # The pool lets 4 through at a time; the others wait 0.5 s for a slot and get a 503
            # together (their access lines at the same instant). None may go unanswered.
            assert len(statuses) == 12 and set(statuses) <= {200, 503}, statuses
            assert 200 in statuses
            assert "WORKER TIMEOUT" not in server.text()
        finally:
            server.stop()


def test_a_runner_that_breaks_off_an_asset_is_a_warning_not_a_traceback(tmp_path: Path) -> None:
    # Re-raised as runner_mw's BadGateway, gunicorn logged every cut (each runner restart
    # mid-stream) as "[ERROR] Error handling request" with a traceback: alerts for nothing.
    def cutting_runner(listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: 1048576\r\n\r\n" + b"x" * 200_000)  # then gone

    with socket.create_server((HOST, 0)) as listener:
        threading.Thread(target=cutting_runner, args=(listener,), daemon=True).start()
        file = tmp_path / "runner.yaml"
        file.write_text(f"version: 1\nbackend: a\nbackends:\n  a:\n    kind: docker\n"
                        f"    url: http://{HOST}:{listener.getsockname()[1]}\n", encoding="utf-8")
        with gunicorn(tmp_path, file) as server:
            server.ready()
            with socket.create_connection((HOST, server.port), timeout=T) as client:
                client.sendall(b"GET /runner/ext-ui/x/h/file.bin HTTP/1.1\r\nHost: localhost\r\n"
                               b"X-Request-Id: cut-1\r\n\r\n")
                got = b""
                with contextlib.suppress(ConnectionResetError):
                    while chunk := client.recv(65536):
                        got += chunk
            assert got.startswith(b"HTTP/1.1 200") and len(got) < 1048576  # a broken transfer
            wait_until(lambda: log_lines(server, r"status=502 .*request_id=cut-1\b"), what="the access line")
            text = server.text()
            assert "upstream asset body broken off" in text
            assert "Traceback" not in text and "Error handling request" not in text, text[-3000:]


def test_a_state_folder_removed_by_a_tmp_cleaner_is_published_again(
        tmp_path: Path, config_file: Path, runners: tuple[StandinRunner, StandinRunner]) -> None:
    # systemd-tmpfiles ages the files of a PrivateTmp too: after days without a reload the
    # published state (and the metrics folder in it) may be gone. A worker booting then must
    # still start from the last good config, not from a file broken in the meantime.
    with gunicorn(tmp_path, config_file) as server:
        docs = server.ready()
        (state_dir,) = server.tmpdir.iterdir()
        shutil.rmtree(state_dir)
        config_file.write_text(BROKEN, encoding="utf-8")  # an edit in progress, no HUP
        gone = min(docs)
        os.kill(gone, signal.SIGKILL)
        new = server.all_workers(lambda d: d["pid"] != gone, "a new worker")
        assert server.alive() and "Worker failed to boot" not in server.text()
        assert all(d["generation"] == 1 and d["backend"] == "a" for d in new.values())
        assert (state_dir / "state.json").is_file()
        assert log_lines(server, r"was removed \(a cleaner of temporary files\?\); generation 1 published")
        # A HUP now is a failed reload like any other (not "the attempt itself failed")...
        shutil.rmtree(state_dir)
        server.hup()
        docs = server.all_workers(
            lambda d: not d["last_reload"]["ok"] and BROKEN_LINE in d["last_reload"]["error"], "the failure")
        assert not log_lines(server, "the attempt itself failed")
        # Published again after that (a worker died): the same outcome, not a new failure.
        (at,) = {d["last_reload"]["at"] for d in docs.values()}
        wait_until(lambda: _reloads(server, "failed") == 2, what="one failed attempt counted by each worker")
        (state_dir / "state.json").unlink()
        gone = min(docs)
        os.kill(gone, signal.SIGKILL)
        new = server.all_workers(lambda d: d["pid"] != gone, "a new worker")
        assert all(d["last_reload"]["at"] == at and not d["last_reload"]["ok"] for d in new.values())
        assert _reloads(server, "failed") == 2
        # ... and the fixed file is generation 2 everywhere, metrics counted in the folder again.
        config_file.write_text(config_text(runners[1]), encoding="utf-8")
        server.hup()
        server.all_workers(lambda d: d["backend"] == "b" and d["generation"] == 2, "generation 2")
        with requests.get(server.base + "/runner/-/metrics", headers=CLOSE, timeout=10) as resp:
            assert resp.status_code == 200


def test_a_tls_client_that_stops_reading_a_streamed_asset_is_cut_too(
        tmp_path: Path, runners: tuple[StandinRunner, StandinRunner]) -> None:
    # gunicorn's certfile: a blocking SSL write retries the kernel's EAGAIN by itself, so the
    # deadline must be Python's own timeout there (SO_SNDTIMEO alone never ended it).
    a = runners[0]
    a.stream_asset("/ext-ui/big/", 256 * 1024 * 1024)
    file = tmp_path / "runner.yaml"
    file.write_text(config_text(a, read_ms=1000), encoding="utf-8")
    _self_signed(tmp_path)
    server = Gunicorn(tmp_path, file)
    server.args[-1:-1] = ["--certfile", str(tmp_path / "c.pem"), "--keyfile", str(tmp_path / "k.pem")]
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    request = b"GET %s HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: %s\r\nConnection: close\r\n\r\n"

    def answers() -> bool:
        try:
            with socket.create_connection((HOST, server.port), timeout=10) as raw, \
                    ctx.wrap_socket(raw) as tls:
                tls.sendall(request % (b"/runner/-/status", b"probe"))
                return tls.recv(12) == b"HTTP/1.1 200"
        except OSError:
            return False

    server.start()
    try:
        wait_until(answers, what="gunicorn to answer over TLS")
        # A client reading slowly but steadily (16 KB every 0.1 s: on loopback the window
        # opens in 64 KB steps, one every 0.4 s) is not cut: what counts is bytes the client
        # takes, not a third of a multi-MB send buffer freeing up (Python's own SSL timeout).
        with socket.create_connection((HOST, server.port), timeout=10) as raw, \
                ctx.wrap_socket(raw) as slow:
            slow.sendall(request % (b"/runner/ext-ui/big/h/file.bin", b"slow"))
            got, until = 0, time.monotonic() + 4
            while time.monotonic() < until:
                piece = slow.recv(16384)
                assert piece, f"cut after {got} bytes"
                got += len(piece)
                time.sleep(0.1)
        assert not log_lines(server, r"request_id=slow\b")  # still streaming when we left
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect((HOST, server.port))
        with ctx.wrap_socket(raw) as client:
            client.sendall(request % (b"/runner/ext-ui/big/h/file.bin", b"stalls"))
            assert client.recv(12) == b"HTTP/1.1 200"
            wait_until(lambda: log_lines(server, r"status=499 .*request_id=stalls\b"),
                       what="the stalled TLS client's access line (499)")
        assert answers()  # the worker serves on
    finally:
        server.stop()
