"""Metrics: counters move with requests; access rule; multiprocess totals under real gunicorn.

In-process: the counters and the histogram move by exactly the requests made, the in-flight gauge
counts what is in flight, ``metrics.enabled: false`` is a 404, the status access rule applies.
Multiprocess mode is checked in a subprocess (prometheus-client imported and metric objects made
*before* ``setup_multiprocess``, as with gunicorn's ``preload_app``, then forked children) and
under a real gunicorn with two workers: every scrape, whichever worker answers, shows the totals
of both; a worker killed with SIGKILL while a request is in flight leaves no live gauge behind
and loses no count that was written. Recording is batched: the sums equal one observation at a
time, the flusher thread writes without a scrape, an exiting process writes what is left, and a
forked child does not write its parent's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from mwfixtures import INDEX, envelope, reply_envelope, running_gateway, send, wait_until
from prometheus_client.parser import text_string_to_metric_families
from standin import StandinRunner
from testsecrets import TEST_SERVICE_TOKEN, TEST_TOKEN, leaked_in

pytest_plugins = ["mwfixtures"]

REPO = Path(__file__).resolve().parent.parent
T = 60.0


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` with these labels in a metrics page."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def scrape(base: str, **headers: str) -> str:
    resp = send("GET", base + "/runner/-/metrics", headers={"Connection": "close", **headers})
    assert resp.status_code == 200, (resp.status_code, resp.text[:300])
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert resp.headers["Cache-Control"] == "no-store" and resp.headers["X-Request-Id"]
    return resp.text


# --------------------------------------------------------------------------- in-process


def test_counters_and_histogram_move_with_requests() -> None:
    with running_gateway("docker", upstream={"service_token": TEST_SERVICE_TOKEN}) as gw:
        labels = {"route": "execute", "backend": "main"}
        before = scrape(gw.url)
        for _ in range(5):
            assert gw.execute().status_code == 200
        for _ in range(2):
            assert gw.execute(b"{broken").status_code == 400
        assert gw.get(INDEX + "?tenant=t1").status_code == 200
        after = scrape(gw.url)
        delta = {s: value(after, "runner_mw_requests_total", status=s, **labels)
                 - value(before, "runner_mw_requests_total", status=s, **labels) for s in ("200", "400")}
        assert delta == {"200": 5, "400": 2}
        assert (value(after, "runner_mw_upstream_seconds_count", **labels)
                - value(before, "runner_mw_upstream_seconds_count", **labels)) == 7
        assert (value(after, "runner_mw_requests_total", route="asset", status="200", backend="main")
                - value(before, "runner_mw_requests_total", route="asset", status="200", backend="main")) >= 1
        assert value(after, "runner_mw_config_generation") >= 1
        # The gateway's own endpoints: their own route label, counted but not timed.
        for _ in range(3):
            assert gw.get("/runner/-/healthz").status_code == 200
        last = scrape(gw.url)
        assert (value(last, "runner_mw_requests_total", route="asset")
                == value(after, "runner_mw_requests_total", route="asset"))
        assert (value(last, "runner_mw_requests_total", route="gateway", status="200")
                - value(after, "runner_mw_requests_total", route="gateway", status="200")) == 4  # +1 scrape
        assert value(last, "runner_mw_upstream_seconds_count", route="gateway") == 0


def test_inflight_counts_what_is_in_flight() -> None:
    with running_gateway("docker") as gw:
        gw.runner.respond("/v1/execute", 200, [("Content-Type", "application/json")], reply_envelope(),
                          delay=1.0)
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(gw.execute)
            gw.runner.wait_for(1)
            # The scrape itself is in flight while the page is made: 1 + the slow call.
            assert value(scrape(gw.url), "runner_mw_inflight_requests") == 2
            assert slow.result().status_code == 200
        assert value(scrape(gw.url), "runner_mw_inflight_requests") == 1


def test_disabled_metrics_are_404_and_do_not_count() -> None:
    import prometheus_client

    def count() -> float:
        return prometheus_client.REGISTRY.get_sample_value(
            "runner_mw_requests_total", {"route": "execute", "backend": "main", "status": "200"}) or 0.0

    with running_gateway("docker", metrics={"enabled": False}) as gw:
        before = count()
        assert gw.execute().status_code == 200
        resp = gw.get("/runner/-/metrics")
        assert resp.status_code == 404
        assert resp.json()["error"] == "not_found" and resp.headers["X-Request-Id"]
        assert count() == before


def test_without_prometheus_client_metrics_are_off_and_it_says_why(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import json, sys
        sys.modules["prometheus_client"] = None  # as in a plain `pip install runner_mw`
        import logging
        from runner_mw import RunnerMiddleware
        cfg = {"version": 1, "backend": "d", "backends": {"d": {"kind": "docker",
               "url": "http://127.0.0.1:9"}}, "metrics": {"enabled": True}}
        quiet = dict(cfg, metrics={})  # the default, "on if installed": nothing to warn about
        RunnerMiddleware(lambda e, s: [b""], quiet, reload_signal=False)
        print("-- explicit --", file=sys.stderr, flush=True)
        mw = RunnerMiddleware(lambda e, s: [b""], cfg, reload_signal=False)
        RunnerMiddleware(lambda e, s: [b""], cfg, reload_signal=False)  # warned once per process
        out = {}
        body = b"".join(mw({"REQUEST_METHOD": "GET", "PATH_INFO": "/runner/-/metrics",
                            "REMOTE_ADDR": "127.0.0.1"}, lambda s, h, e=None: out.update(s=s)))
        print(json.dumps({"status": out["s"], "body": json.loads(body)}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=T,
                          env={**clean_env(tmp_path), "PYTHONPATH": str(REPO)}, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"].startswith("404") and "runner_mw[metrics]" in out["body"]["detail"]
    default, explicit = proc.stderr.split("-- explicit --")
    assert "prometheus-client is not installed" not in default, proc.stderr
    warnings = [line for line in explicit.splitlines() if "prometheus-client is not installed" in line]
    assert len(warnings) == 1, proc.stderr


@pytest.mark.parametrize("access", [
    {"trusted_proxies": ["127.0.0.1/32"], "networks": ["127.0.0.1/32"], "tokens": [TEST_TOKEN]},
    {"networks": []},
], ids=["forwarded-for-through-a-trusted-proxy", "token-less-and-no-network"])
def test_metrics_follow_the_status_access_rule(access: dict[str, Any]) -> None:
    outside = {"X-Forwarded-For": "203.0.113.7"}
    with running_gateway("docker", access=access) as gw:
        refused = [outside, {**outside, "Authorization": f"Bearer {TEST_TOKEN}x"}]
        if not access.get("tokens"):  # no token is ever accepted, and loopback is not a network
            refused += [{}, {"Authorization": f"Bearer {TEST_TOKEN}"}]
        for headers in refused:
            resp = gw.get("/runner/-/metrics", headers=headers)
            assert resp.status_code == 401, resp.text
            assert resp.json()["error"] == "unauthorized"
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert "runner_mw_" not in resp.text
        if access.get("tokens"):
            resp = gw.get("/runner/-/metrics", headers={**outside, "Authorization": f"Bearer {TEST_TOKEN}"})
            assert resp.status_code == 200 and "runner_mw_requests_total" in resp.text


# --------------------------------------------------------------------------- batching


def test_batched_observations_equal_one_at_a_time() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from runner_mw import metrics

    buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
    seconds = [0.0, 0.005, 0.0050001, 0.01, 0.3, 1.0, 59.9, 60.0, 61.0, 1e6, 0.004] * 3

    def page(batched: bool) -> list[tuple[str, dict[str, str], float]]:
        registry = CollectorRegistry()
        child = Histogram("h", "h", ["r"], buckets=buckets, registry=registry).labels("x")
        if batched:
            metrics._observe_all(child, seconds)
        else:
            for s in seconds:
                child.observe(s)
        return [(s.name, s.labels, s.value) for f in registry.collect() for s in f.samples
                if not s.name.endswith("_created")]

    assert page(batched=True) == page(batched=False)

    class Other:  # a histogram child of another layout: one observe() each
        seen: list[float] = []

        def observe(self, s: float) -> None:
            self.seen.append(s)

    other = Other()
    metrics._observe_all(other, seconds)
    assert other.seen == seconds


def test_the_flusher_writes_without_a_scrape() -> None:
    from prometheus_client import REGISTRY

    from runner_mw import metrics

    labels = {"route": "execute", "backend": "flusher-test", "status": "201"}

    def count() -> float:
        return REGISTRY.get_sample_value("runner_mw_requests_total", labels) or 0.0

    before = count()
    metrics.started()
    metrics.finished("execute", "flusher-test", 201, 0.01)
    wait_until(lambda: count() == before + 1, timeout=10 * metrics.FLUSH_S, what="a flush")


FLAKY = textwrap.dedent("""
    import json, threading
    from prometheus_client import REGISTRY
    from runner_mw import metrics

    labels = {"route": "asset", "backend": "b", "status": "200"}
    real_start = threading.Thread.start

    def no_thread(self):               # a process or thread limit reached
        if self.name == "runner_mw-metrics":
            raise RuntimeError("can't start new thread")
        real_start(self)

    threading.Thread.start = no_thread
    metrics.started()                  # must not raise: written at once instead
    metrics.finished("asset", "b", 200, 0.01)
    threading.Thread.start = real_start
    m = metrics.metrics()
    no_flusher = m.pending.flusher is None
    gauge = lambda: REGISTRY.get_sample_value("runner_mw_inflight_requests")
    first = gauge()

    # One failed write in a flush: the other series are still written, and the gauge is
    # right again at the next flush.
    for _ in range(3):
        metrics.started()
    metrics.finished("asset", "b", 200, 0.01)
    real_set, calls = m.inflight.set, []
    def failing_once(value):
        calls.append(value)
        if len(calls) == 1:
            raise OSError("ENOSPC")
        real_set(value)
    m.inflight.set = failing_once
    metrics.flush()                    # two in flight, but the gauge write fails
    counted, stale = REGISTRY.get_sample_value("runner_mw_requests_total", labels), gauge()
    metrics.flush()                    # nothing new: the gauge is written again all the same
    mended = gauge()
    metrics.finished("asset", "b", 200, 0.01); metrics.finished("asset", "b", 200, 0.01)
    metrics.flush()
    print(json.dumps({"no_flusher": no_flusher, "first": first, "counted": counted, "stale": stale,
                      "mended": mended, "gauge": gauge(),
                      "total": REGISTRY.get_sample_value("runner_mw_requests_total", labels)}))
""")


def test_no_flusher_thread_and_a_failed_write_lose_nothing_else(tmp_path: Path) -> None:
    out = run_python(FLAKY, clean_env(tmp_path))
    assert out["no_flusher"] and out["first"] == 1.0  # written at once, by started() itself
    assert out["counted"] == 2.0 and out["stale"] == 1.0  # the counter written, the gauge not
    assert out["mended"] == 2.0  # the next flush wrote it, with nothing new to write
    assert out["gauge"] == 0.0 and out["total"] == 4.0


BATCHED = textwrap.dedent("""
    import json, os, sys
    from runner_mw import metrics as m
    path = m.setup_multiprocess()
    m.started(); m.finished("execute", "b", 200, 0.01)   # the parent's, not written yet
    pid = os.fork()
    if pid == 0:
        m.started(); m.finished("execute", "b", 200, 0.01)
        m.flush()
        os._exit(0)
    os.waitpid(pid, 0)
    if sys.argv[1] == "exit":
        sys.exit(0)                                       # written by the exit handler
    m.flush()
    print(json.dumps({"path": path}))
""")


@pytest.mark.parametrize("how", ["flush", "exit"])
def test_a_clean_exit_writes_what_is_left_and_a_fork_does_not_write_its_parents(
        tmp_path: Path, how: str) -> None:
    folder = tmp_path / "metrics"
    folder.mkdir()
    env = {**clean_env(tmp_path), "PROMETHEUS_MULTIPROC_DIR": str(folder), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", BATCHED, how], capture_output=True, text=True,
                          timeout=T, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    counts = per_pid(folder, "counter", "runner_mw_requests_total")
    assert sorted(counts.values()) == [1.0, 1.0], counts  # one each: the child's and the parent's


# --------------------------------------------------------------------------- multiprocess, forked


FORKED = textwrap.dedent("""
    import json, os, stat, sys
    import runner_mw.metrics as m          # imports prometheus_client: single-process values now
    from prometheus_client import values
    assert not values.ValueClass._multiprocess and "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    m.started(); m.finished("execute", "b", 200, 0.1)  # objects made before the switch (preload_app)
    path = m.setup_multiprocess()
    assert m.setup_multiprocess() == path  # twice is once
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == path and stat.S_IMODE(os.stat(path).st_mode) == 0o700

    class Snap:
        generation = 3
        class config:
            metrics_enabled = True

    def page():
        out = []
        status, body = m.render(lambda s, h: out.append(s), Snap(), "rid")
        return b"".join(body).decode()

    kids = []
    for n in (3, 4):
        pid = os.fork()
        if pid == 0:
            for _ in range(n):
                m.started(); m.finished("execute", "b", 200, 0.01)
            m.started()                    # and dies with a request in flight,
            m.flush()                      # once its flusher has written it,
            os._exit(0)                    # and with no exit handler
        kids.append(pid)
    for pid in kids:
        os.waitpid(pid, 0)
    before = page()
    for pid in kids:
        m.worker_exited(pid)
    after = page()
    live = sorted(f for f in os.listdir(path) if f.startswith("gauge_livesum"))
    files = sorted(os.listdir(path))
    m.cleanup_multiprocess()
    print(json.dumps({"path": path, "before": before, "after": after, "live": live, "files": files,
                      "kids": kids, "removed": not os.path.exists(path)}))
""")


def run_python(code: str, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=T,
                          env={**env, "PYTHONPATH": str(REPO)}, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "MULTIPROC" not in k.upper()
           and k != "RUNNER_MW_METRICS_DIR_OWNER"}
    env["TMPDIR"] = str(tmp_path)
    return env


def test_multiprocess_mode_after_an_early_import_and_forks(tmp_path: Path) -> None:
    out = run_python(FORKED, clean_env(tmp_path))
    assert Path(out["path"]).parent == tmp_path
    before, after = out["before"], out["after"]
    # Both children's counts, from the parent: 7, not the 1 made before the switch.
    assert value(before, "runner_mw_requests_total", route="execute", backend="b", status="200") == 7
    assert value(before, "runner_mw_inflight_requests") == 2  # not yet known dead
    assert value(after, "runner_mw_inflight_requests") == 0
    assert value(after, "runner_mw_requests_total", route="execute", backend="b", status="200") == 7
    assert value(after, "runner_mw_config_generation") == 3
    assert not any(str(pid) in name for pid in out["kids"] for name in out["live"])
    # Every file of a dead worker is folded into one of each kind, its counts kept (above).
    assert not any(str(pid) in name for pid in out["kids"] for name in out["files"])
    assert {"counter_archive.db", "histogram_archive.db", "gauge_max_archive.db"} <= set(out["files"])
    assert out["removed"]


RECYCLED = textwrap.dedent("""
    import json, os
    import runner_mw.metrics as m
    path = m.setup_multiprocess()

    class Snap:
        generation = 1
        class config:
            metrics_enabled = True

    def page():
        status, body = m.render(lambda s, h: None, Snap(), "rid")
        return b"".join(body).decode()

    counts = []
    for n in range(40):                     # max_requests recycling: 40 workers in turn
        pid = os.fork()
        if pid == 0:
            for _ in range(n % 5 + 1):
                m.started(); m.finished("asset", "b", 200, 0.03)
            m.reloaded(True, n + 2)
            m.flush()
            os._exit(0)
        os.waitpid(pid, 0)
        m.worker_exited(pid)
        counts.append(len(os.listdir(path)))
    out = {"page": page(), "counts": counts}

    # Scrapes while dead workers are folded see each count once: in its file or the archive.
    import threading
    kids = []
    for n in range(30):
        pid = os.fork()
        if pid == 0:
            m.started(); m.finished("execute", "b", 200, 0.03)
            m.flush()
            os._exit(0)
        kids.append(pid)
    for pid in kids:
        os.waitpid(pid, 0)
    seen, stop = set(), threading.Event()

    def scrape():
        while not stop.is_set():
            key = 'runner_mw_requests_total{backend="b",route="execute",status="200"} '
            seen.add(next((line[len(key):] for line in page().splitlines() if line.startswith(key)), None))

    scraper = threading.Thread(target=scrape)
    scraper.start()
    for pid in kids:
        m.worker_exited(pid)
    stop.set()
    scraper.join()
    out["seen"] = sorted(seen)
    m.cleanup_multiprocess()
    print(json.dumps(out))
""")


def test_recycled_workers_leave_a_bounded_number_of_files(tmp_path: Path) -> None:
    # Each dead worker left three files, and every scrape read them all: with max_requests,
    # 990 files and a 57 ms scrape after 330 recycles. Their values are folded, not lost.
    out = run_python(RECYCLED, clean_env(tmp_path))
    assert len(set(out["counts"][1:])) == 1 and out["counts"][-1] <= 5, out["counts"]
    page = out["page"]
    total = sum(n % 5 + 1 for n in range(40))
    assert value(page, "runner_mw_requests_total", route="asset", backend="b", status="200") == total
    assert value(page, "runner_mw_upstream_seconds_count", route="asset", backend="b") == total
    assert value(page, "runner_mw_upstream_seconds_bucket", route="asset", backend="b", le="0.05") == total
    assert value(page, "runner_mw_reloads_total", result="ok") == 40
    assert value(page, "runner_mw_config_generation") == 41  # the largest any worker had
    assert out["seen"] == ["30.0"], out["seen"]


def test_a_scrape_skips_a_worker_file_that_is_being_created(tmp_path: Path) -> None:
    # prometheus-client creates a worker's file, then sizes it: a scrape in between read
    # 0 bytes and raised struct.error (a 500 for the scrape). Such a file holds no value yet.
    code = textwrap.dedent("""
        import json, os
        import runner_mw.metrics as m
        path = m.setup_multiprocess()
        m.started(); m.finished("execute", "b", 200, 0.1)
        m.flush()

        class Snap:
            generation = 1
            class config:
                metrics_enabled = True

        for kind in ("counter", "histogram", "gauge_livesum"):
            open(os.path.join(path, f"{kind}_424242.db"), "wb").close()  # made, not yet sized
        # A hidden copy of a real file is not a worker's (prometheus-client's glob skips it).
        real = next(f for f in os.listdir(path) if f.startswith("counter_") and "424242" not in f)
        with open(os.path.join(path, real), "rb") as src:
            copy = src.read()
        with open(os.path.join(path, ".counter_1.db"), "wb") as dst:
            dst.write(copy)
        out = []
        status, body = m.render(lambda s, h: out.append(s), Snap(), "rid")
        m.cleanup_multiprocess()
        print(json.dumps({"status": status, "line": out, "page": b"".join(body).decode()}))
    """)
    out = run_python(code, clean_env(tmp_path))
    assert out["status"] == 200 and out["line"] == ["200 OK"]
    assert value(out["page"], "runner_mw_requests_total", route="execute", backend="b", status="200") == 1


def test_an_operators_folder_is_kept_and_an_inherited_private_one_replaced(tmp_path: Path) -> None:
    mine = tmp_path / "operator"
    mine.mkdir()
    code = textwrap.dedent("""
        import json, os
        import runner_mw.metrics as m
        first = m.setup_multiprocess()
        m.cleanup_multiprocess()
        # As after a USR2 re-exec: the variables of another master's private folder.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = "/nonexistent/old"
        os.environ["RUNNER_MW_METRICS_DIR_OWNER"] = "1:/nonexistent/old"
        second = m.setup_multiprocess()
        m.cleanup_multiprocess()
        print(json.dumps({"first": first, "second": second, "second_gone": not os.path.exists(second)}))
    """)
    out = run_python(code, {**clean_env(tmp_path), "PROMETHEUS_MULTIPROC_DIR": str(mine)})
    assert out["first"] == str(mine) and mine.is_dir()  # used as is, never removed
    assert out["second"] != "/nonexistent/old" and Path(out["second"]).parent == tmp_path
    assert out["second_gone"]


# --------------------------------------------------------------------------- real gunicorn

APP = """\
import os
from runner_mw import RunnerMiddleware

def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]

application = RunnerMiddleware(hello, os.environ["RUNNER_MW_CONFIG"])
"""

# The shipped gunicorn config; when runner_mw.gunicorn does not call the metrics hooks yet, they
# are added here the way runner_mw/gunicorn.py is meant to call them.
CONF = f"""\
exec(compile(open({str(REPO / "config" / "gunicorn.conf.py")!r}).read(), "gunicorn.conf.py", "exec"))
import runner_mw.gunicorn as _hooks
from runner_mw import metrics as _metrics

if not hasattr(_hooks, "child_exit"):
    def on_starting(server):
        _metrics.setup_multiprocess(server)
        _hooks.on_starting(server)

    def child_exit(server, worker):
        _metrics.worker_exited(worker.pid)

    def on_exit(server):
        _hooks.on_exit(server)
        _metrics.cleanup_multiprocess()

workers = 2
threads = 4
"""

CONFIG = """\
version: 1
backend: docker
backends:
  docker:
    kind: docker
    url: {url}
timeouts: {{connect_ms: 2000, read_ms: 10000}}
upstream:
  service_token: ${{RUNNER_SERVICE_TOKEN}}
access:
  networks: [127.0.0.1/32]
  tokens: [{{file: token.txt}}]
logging:
  format: json
"""


class Server:
    def __init__(self, tmp_path: Path, runner_url: str, preload: bool) -> None:
        self.dir = tmp_path
        self.tmpdir = tmp_path / "tmp"
        self.tmpdir.mkdir()
        (tmp_path / "app_mod.py").write_text(APP, encoding="utf-8")
        (tmp_path / "gconf.py").write_text(CONF, encoding="utf-8")
        (tmp_path / "token.txt").write_text(TEST_TOKEN + "\n", encoding="utf-8")
        self.config = tmp_path / "runner.yaml"
        self.config.write_text(CONFIG.format(url=runner_url), encoding="utf-8")
        self.log = tmp_path / "gunicorn.log"
        args = [sys.executable, "-m", "gunicorn", "-c", str(tmp_path / "gconf.py"),
                "--bind", "127.0.0.1:0", "--log-level", "info", "app_mod:application"]
        if preload:
            args.insert(-1, "--preload")
        env = {k: v for k, v in os.environ.items() if "MULTIPROC" not in k.upper()}
        env.update({"RUNNER_MW_CONFIG": str(self.config), "TMPDIR": str(self.tmpdir),
                    "XDG_RUNTIME_DIR": str(self.tmpdir), "RUNNER_SERVICE_TOKEN": TEST_SERVICE_TOKEN,
                    "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])})
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        found = wait_until(lambda: re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.text())
                           or self.proc.poll() is not None, timeout=T, what="gunicorn to listen")
        assert self.proc.poll() is None, self.text()
        self.base = f"http://127.0.0.1:{found.group(1)}"

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def workers(self) -> set[int]:
        kids = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.proc.pid:
                    kids.add(int(stat.parent.name))
        return kids

    def metrics_dir(self) -> Path:
        found = list(self.tmpdir.glob("**/runner-mw-metrics-*"))
        assert len(found) == 1, found
        return found[0]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(T)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(T)


@contextlib.contextmanager
def gunicorn(tmp_path: Path, runner_url: str, preload: bool) -> Iterator[Server]:
    server = Server(tmp_path, runner_url, preload)
    try:
        wait_until(lambda: len(server.workers()) == 2, timeout=T, what="two workers")
        wait_until(lambda: _ok(server.base + "/runner/-/healthz"), timeout=T, what="a worker to answer")
        yield server
    finally:
        server.stop()


def _ok(url: str) -> bool:
    with contextlib.suppress(requests.RequestException):
        return send("GET", url, headers={"Connection": "close"}).status_code == 200
    return False


def per_pid(folder: Path, prefix: str, name: str) -> dict[int, float]:
    """A metric's value in each process's file of the multiprocess folder."""
    from prometheus_client.mmap_dict import MmapedDict

    out: dict[int, float] = {}
    for file in folder.glob(f"{prefix}_*.db"):
        if file.stat().st_size < 4:
            # prometheus-client creates the file, then sizes it: a worker making its file
            # right now has no value in it yet (reading it would raise struct.error).
            continue
        if not file.stem.rsplit("_", 1)[1].isdigit():
            continue  # the dead workers' values, folded into one file
        pid = int(file.stem.rsplit("_", 1)[1])
        for key, val, _ts, _pos in MmapedDict.read_all_values_from_file(str(file)):
            if json.loads(key)[1] == name:
                out[pid] = out.get(pid, 0.0) + val
    return out


def post_ignoring_errors(base: str) -> None:
    with contextlib.suppress(requests.RequestException):  # its worker is killed under it
        send("POST", base + "/v1/execute", json=envelope(), timeout=T)


def execute_ok(base: str) -> None:
    resp = send("POST", base + "/v1/execute", json=envelope(), headers={"Connection": "close"})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("preload", [False, True], ids=["app-per-worker", "preload_app"])
def test_totals_across_gunicorn_workers_and_a_killed_one(tmp_path: Path, preload: bool) -> None:
    labels = {"route": "execute", "backend": "docker", "status": "200"}
    with StandinRunner(name="metrics") as runner, gunicorn(tmp_path, runner.url, preload) as server:
        folder = server.metrics_dir()
        n = 0
        # New connections, some concurrent, until both workers have served executes.
        with ThreadPoolExecutor(6) as pool:
            deadline = time.monotonic() + T
            while True:
                list(pool.map(lambda _: execute_ok(server.base), range(12)))
                n += 12
                served = per_pid(folder, "counter", "runner_mw_requests_total")
                if len([p for p, v in served.items() if v > 0]) >= 2 or time.monotonic() > deadline:
                    break
        assert len([p for p, v in served.items() if v > 0]) >= 2, served
        # Each worker writes what it recorded within FLUSH_S: then every scrape, answered by
        # either worker, has the same totals.
        wait_until(lambda: value(scrape(server.base), "runner_mw_requests_total", **labels) == n,
                   timeout=T, what="every worker's counts written")
        for _ in range(6):
            assert value(scrape(server.base), "runner_mw_requests_total", **labels) == n

        # A request in flight on one worker, then SIGKILL that worker. First, no worker may
        # still show one of the scrapes above in flight (its end is written within FLUSH_S).
        wait_until(lambda: not any(per_pid(folder, "gauge_livesum", "runner_mw_inflight_requests").values()),
                   timeout=T, what="nothing in flight")
        runner.respond("/v1/execute", 200, [("Content-Type", "application/json")], reply_envelope(),
                       delay=30)
        stuck = threading.Thread(target=post_ignoring_errors, args=(server.base,), daemon=True)
        stuck.start()
        busy = wait_until(lambda: [p for p, v in per_pid(folder, "gauge_livesum",
                                                          "runner_mw_inflight_requests").items() if v > 0],
                          timeout=T, what="the slow request in flight")
        assert value(scrape(server.base), "runner_mw_inflight_requests") == 2  # it + the scrape
        victim = busy[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in server.workers() and len(server.workers()) == 2, timeout=T,
                   what="the killed worker to be replaced")
        runner.reset()
        wait_until(lambda: _ok(server.base + "/runner/-/healthz"), timeout=T, what="workers to answer")
        assert not (folder / f"gauge_livesum_{victim}.db").exists()  # its live gauge is gone
        assert not (folder / f"counter_{victim}.db").exists()  # its counts are folded (kept below)
        assert (folder / "counter_archive.db").exists()
        # Only the scrape itself in flight, once the other worker's last scrape ended is written.
        wait_until(lambda: value(scrape(server.base), "runner_mw_inflight_requests") == 1, timeout=T,
                   what="no request in flight but the scrape")
        for _ in range(6):
            page = scrape(server.base)
            assert value(page, "runner_mw_inflight_requests") in (1, 2)  # (a scrape < FLUSH_S ago)
            assert value(page, "runner_mw_requests_total", **labels) == n  # nothing lost
        stuck.join(T)
    assert not folder.exists(), "the private metrics folder is removed at exit"
    log = server.text()
    assert not leaked_in(log), "a test secret in gunicorn's output"
    json_lines = [line for line in log.splitlines() if line.startswith("{")]
    assert json_lines, "logging.format json: runner_mw's lines are JSON"
    for line in json_lines:
        doc = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(doc)


def test_a_metrics_folder_that_cannot_be_written_fails_no_request(tmp_path: Path) -> None:
    # An operator's PROMETHEUS_MULTIPROC_DIR that is missing (or read-only, or a full disk):
    # requests go on uncounted, said once; once the folder is there, counting starts.
    folder = tmp_path / "missing"
    code = textwrap.dedent(f"""
        import io, json, logging, os
        import runner_mw.metrics as m
        from runner_mw import RunnerMiddleware
        logging.basicConfig(level=logging.ERROR)
        m.RETRY_S = 0.0
        m.setup_multiprocess()
        open({str(tmp_path / "runner.yaml")!r}, "w").write(
            "version: 1\\nbackend: d\\nbackends:\\n  d: {{kind: docker, url: 'http://127.0.0.1:9'}}\\n")
        def hook(environ, envelope):  # the folder comes back while this request runs
            os.mkdir({str(folder)!r})
            return envelope
        mw = RunnerMiddleware(lambda e, s: [], {str(tmp_path / "runner.yaml")!r}, reload_signal=False,
                              execute_hook=hook)
        def get(path, method="GET", body=b""):
            env = {{"REQUEST_METHOD": method, "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
                   "REMOTE_ADDR": "127.0.0.1", "wsgi.input": io.BytesIO(body), "SERVER_NAME": "x",
                   "SERVER_PORT": "80", "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1",
                   "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body))}}
            out = []
            body = b"".join(mw(env, lambda s, h, e=None: out.append(s)))
            return out[0], body
        before = [get(p)[0] for p in ("/runner/-/healthz", "/runner/-/healthz", "/runner/-/status")]
        ctx = {{"tenant_id": "t", "extension_id": "e", "content_hash": "sha256:" + "a" * 64}}
        envelope = {{"context": ctx, "http": {{"method": "GET", "path": "/"}}}}
        before.append(get("/v1/execute", "POST", json.dumps(envelope).encode())[0])  # no runner: 502
        after = [get("/runner/-/healthz")[0] for _ in range(2)]
        page = get("/runner/-/metrics")[1].decode()
        print(json.dumps({{"before": before, "after": after, "page": page}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=T,
                          env={**clean_env(tmp_path), "PROMETHEUS_MULTIPROC_DIR": str(folder),
                               "PYTHONPATH": str(REPO)}, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] == ["200 OK", "200 OK", "200 OK", "502 Bad Gateway"]
    assert out["after"] == ["200 OK", "200 OK"]
    assert value(out["page"], "runner_mw_requests_total", route="gateway", backend="d", status="200") >= 1
    # The execute began uncounted and ended counted: its end is not counted either (1: the
    # scrape itself is in flight while it is written).
    assert value(out["page"], "runner_mw_inflight_requests") == 1
    assert proc.stderr.count(f"{folder} is not a folder this process can write") == 1  # at start
    assert proc.stderr.count("recording a metric failed") == 1  # once, with the cause
    assert "FileNotFoundError" in proc.stderr


def test_a_worker_whose_files_were_removed_counts_again_in_new_ones(tmp_path: Path) -> None:
    # A cleaner of temporary files emptied the folder; the master made it again. A live
    # worker kept writing into its removed (still mapped) files, which no scrape reads.
    code = textwrap.dedent("""
        import json, os, shutil
        import runner_mw.metrics as m
        from prometheus_client import CollectorRegistry
        path = m.setup_multiprocess()
        def scrape():
            registry = CollectorRegistry()
            registry.register(m._SizedFiles(path))
            labels = {"route": "asset", "backend": "a", "status": "200"}
            return registry.get_sample_value("runner_mw_requests_total", labels)
        m.started(); m.finished("asset", "a", 200, 0.01); m.flush()
        before = scrape()
        shutil.rmtree(path)
        m.started(); m.finished("asset", "a", 200, 0.01); m.flush()  # nowhere to write: lost
        os.makedirs(path, mode=0o700)
        for _ in range(5):
            m.started(); m.finished("asset", "a", 200, 0.01)
        m.started(); m.started()  # two long requests in flight
        m.flush()
        after = scrape()
        shutil.rmtree(path); os.makedirs(path, mode=0o700)
        m.flush()  # nothing began or ended since: the new gauge still says 2
        registry = CollectorRegistry()
        registry.register(m._SizedFiles(path))
        inflight = registry.get_sample_value("runner_mw_inflight_requests")
        m.cleanup_multiprocess()
        print(json.dumps({"before": before, "after": after, "inflight": inflight}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=T,
                          env={**clean_env(tmp_path), "PYTHONPATH": str(REPO)}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"before": 1.0, "after": 5.0, "inflight": 2.0}
    assert proc.stderr.count("were removed; counting again") >= 1
    assert proc.stderr.count("recording a metric failed") == 1  # the missing folder, once
