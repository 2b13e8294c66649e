"""In-process reload (werkzeug, waitress): ``reload()`` and a real SIGHUP; ``runner-mw reload``."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import mwfixtures
import pytest
import requests
from standin import StandinRunner
from traffic import ASSET, BROKEN, T, Traffic, config_text
from werkzeug.serving import make_server

from runner_mw import RunnerMiddleware
from runner_mw import reload as reload_mod
from runner_mw.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


@pytest.fixture(autouse=True)
def _whole_files_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests write each file whole before a reload: no settle wait (tests/test_snapshot.py
    has the test of it; the gunicorn tests reload with it)."""
    from runner_mw import loader

    monkeypatch.setattr(loader, "SETTLE_S", 0.0)


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


# The suite's one poll helper, with this module's longer deadline (processes boot here).
wait_until = partial(mwfixtures.wait_until, timeout=T)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def get_status(session: requests.Session, base: str) -> dict[str, Any]:
    resp = session.get(f"{base}/runner/-/status", timeout=10)
    resp.raise_for_status()
    doc: dict[str, Any] = resp.json()
    return doc


@contextlib.contextmanager
def served(app: Any) -> Iterator[str]:
    """``app`` under werkzeug's threaded server in a thread; yields its base URL."""
    server = make_server(HOST, 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="werkzeug", daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(T)
        server.server_close()


@pytest.fixture
def runners() -> Iterator[tuple[StandinRunner, StandinRunner]]:
    with StandinRunner(name="a") as a, StandinRunner(name="b") as b:
        yield a, b


@pytest.fixture
def sighup_restored() -> Iterator[None]:
    """Whatever a test installs for SIGHUP, the previous handler is back afterwards."""
    previous = signal.getsignal(signal.SIGHUP)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


# --------------------------------------------------------------------------- in-process


def test_reload_switches_backends_under_a_threaded_server_without_failing_a_request(
        runners: tuple[StandinRunner, StandinRunner], tmp_path: Path, session: requests.Session) -> None:
    file = tmp_path / "runner.yaml"
    file.write_text(config_text(runners[0]), encoding="utf-8")
    mw = RunnerMiddleware(hello, file, reload_signal=False)
    try:
        with served(mw) as base, Traffic(base) as traffic:
            traffic.wait_for(4)
            for i in range(10):
                runner = runners[(i + 1) % 2]
                file.write_text(config_text(runner), encoding="utf-8")
                outcome = mw.reload()
                assert outcome.ok and outcome.generation == i + 2
                status = get_status(session, base)
                assert status["backend"] == runner.name and status["generation"] == i + 2
                assert status["last_reload"]["ok"] is True
                traffic.wait_for(4)
            assert session.get(base + "/other", timeout=10).text == "hello"
        assert traffic.failures == []
        assert traffic.runners == {"a", "b"}
    finally:
        mw.close()


def test_a_broken_or_missing_file_changes_nothing_and_shows_in_status(
        runners: tuple[StandinRunner, StandinRunner], tmp_path: Path, session: requests.Session) -> None:
    file = tmp_path / "runner.yaml"
    file.write_text(config_text(runners[0]), encoding="utf-8")
    mw = RunnerMiddleware(hello, file, reload_signal=False)
    try:
        with served(mw) as base:
            file.write_text(BROKEN, encoding="utf-8")
            outcome = mw.reload()
            assert not outcome.ok and f"{file}:6: backends.a.url" in (outcome.error or "")
            status = get_status(session, base)
            assert status["backend"] == "a" and status["generation"] == 1
            assert status["last_reload"]["ok"] is False
            assert f"{file}:6:" in status["last_reload"]["error"]
            assert session.get(base + ASSET, timeout=10).headers["x-standin"] == "a"
            file.unlink()
            outcome = mw.reload()
            assert not outcome.ok and str(file) in (outcome.error or "")
            assert get_status(session, base)["backend"] == "a"
            file.write_text(config_text(runners[1]), encoding="utf-8")
            assert mw.reload().ok
            status = get_status(session, base)
            assert status["backend"] == "b" and status["generation"] == 2 and status["last_reload"]["ok"]
            assert session.get(base + ASSET, timeout=10).headers["x-standin"] == "b"
    finally:
        mw.close()


def test_a_real_sighup_reloads_in_process(
        runners: tuple[StandinRunner, StandinRunner], tmp_path: Path, session: requests.Session,
        sighup_restored: None) -> None:
    assert threading.current_thread() is threading.main_thread()
    seen: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: seen.append(signum))  # the host's own handler
    file = tmp_path / "runner.yaml"
    file.write_text(config_text(runners[0]), encoding="utf-8")
    mw = RunnerMiddleware(hello, file)
    try:
        assert signal.getsignal(signal.SIGHUP) is reload_mod._on_sighup
        with served(mw) as base, Traffic(base) as traffic:
            traffic.wait_for(2)
            for i, runner in enumerate([runners[1], runners[0], runners[1]]):
                file.write_text(config_text(runner), encoding="utf-8")
                os.kill(os.getpid(), signal.SIGHUP)
                wait_until(lambda r=runner: get_status(session, base)["backend"] == r.name,
                           what=f"the switch to {runner.name}")
                assert get_status(session, base)["generation"] == i + 2
                traffic.wait_for(2)
        assert traffic.failures == []
        assert traffic.runners == {"a", "b"}
        assert seen == [signal.SIGHUP] * 3  # the handler found before ours still runs
    finally:
        mw.close()


def test_installing_off_the_main_thread_logs_a_warning_and_does_not_raise(
        runners: tuple[StandinRunner, StandinRunner], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        sighup_restored: None) -> None:
    caplog.set_level(logging.WARNING, logger="runner_mw.reload")
    before = signal.getsignal(signal.SIGHUP)
    file = tmp_path / "runner.yaml"
    file.write_text(config_text(runners[0]), encoding="utf-8")
    result: dict[str, Any] = {}

    def build() -> None:
        try:
            result["mw"] = RunnerMiddleware(hello, file)
            result["installed"] = reload_mod.install_handler()
        except BaseException as exc:  # the assertion below shows it
            result["error"] = exc

    thread = threading.Thread(target=build)
    thread.start()
    thread.join(T)
    assert "error" not in result
    assert result["installed"] is False
    assert signal.getsignal(signal.SIGHUP) is before
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "runner_mw.reload"]
    assert warnings and "not on the main thread" in warnings[0].getMessage()
    assert result["mw"].reload().ok  # reload() still works from anywhere
    result["mw"].close()


def test_the_main_thread_is_the_interpreters_word_not_threadings(
        monkeypatch: pytest.MonkeyPatch, sighup_restored: None) -> None:
    # Under eventlet's patched threading, current_thread() is never main_thread(), even on the
    # main thread: the handler was not installed, and the first HUP stopped the server.
    monkeypatch.setattr(threading, "main_thread", lambda: object())
    assert reload_mod.install_handler() is True
    assert signal.getsignal(signal.SIGHUP) is reload_mod._on_sighup


def test_reload_signal_false_is_not_reloaded_by_another_middlewares_sighup(
        tmp_path: Path, sighup_restored: None) -> None:
    # reload_signal=False means reload() by hand only, also when another middleware of the
    # process installed the handler.
    text = "version: 1\nbackend: a\nbackends:\n  a: {{kind: docker, url: 'http://127.0.0.1:{port}'}}\n"
    files = [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    for file in files:
        file.write_text(text.format(port=1), encoding="utf-8")
    by_signal = RunnerMiddleware(hello, str(files[0]))
    by_hand = RunnerMiddleware(hello, str(files[1]), reload_signal=False)
    try:
        for file in files:
            file.write_text(text.format(port=2), encoding="utf-8")
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: by_signal.store.current.generation == 2, what="the SIGHUP reload")
        time.sleep(0.3)  # the watcher's pass is done; nothing else may come
        assert by_hand.store.current.generation == 1
        assert by_hand.reload().generation == 2
    finally:
        by_signal.close()
        by_hand.close()


def test_reload_all_skips_middlewares_built_from_a_mapping(
        runners: tuple[StandinRunner, StandinRunner], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runner_mw")
    mw = RunnerMiddleware(hello, {"version": 1, "backend": "a",
                                  "backends": {"a": {"kind": "docker", "url": runners[0].url}}})
    reload_mod.reload_all()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    mw.close()


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live(cls: type) -> int:
    return sum(1 for obj in gc.get_objects() if type(obj) is cls)


def test_memory_stays_flat_over_1000_reloads(tmp_path: Path) -> None:
    from runner_mw.snapshot import Snapshot

    file = tmp_path / "runner.yaml"
    texts = [f"version: 1\nbackend: a\nbackends:\n  a:\n    kind: docker\n    url: http://127.0.0.1:{p}\n"
             for p in (18001, 18002)]
    file.write_text(texts[0], encoding="utf-8")
    mw = RunnerMiddleware(hello, file, reload_signal=False)
    logger = logging.getLogger("runner_mw.reload")
    level = logger.level
    logger.setLevel(logging.WARNING)  # 1000 captured log records would be the growth measured
    try:
        n = 0

        def reload_next() -> None:
            nonlocal n
            n += 1
            file.write_text(texts[n % 2], encoding="utf-8")  # alternate: every reload is a change
            assert mw.reload().ok

        for _ in range(50):  # warm up caches (schemas, validators, imports, allocator arenas)
            reload_next()
        gc.collect()
        rss, snapshots = rss_bytes(), live(Snapshot)
        started = time.monotonic()
        for _ in range(1000):
            reload_next()
        elapsed = time.monotonic() - started
        gc.collect()
        growth, snapshots_after = rss_bytes() - rss, live(Snapshot)
    finally:
        logger.setLevel(level)
        mw.close()
    print(f"\n1000 reloads: {elapsed:.1f} s, RSS growth {growth / 1024:.0f} KiB, "
          f"live snapshots {snapshots} -> {snapshots_after}")
    assert mw.store.current.generation == 1051
    assert snapshots_after <= snapshots  # replaced snapshots are freed, not kept
    assert growth < 5 * 1024 * 1024


# --------------------------------------------------------------------------- waitress


WAITRESS_APP = """\
import sys
from waitress import serve
from runner_mw import RunnerMiddleware

def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]

app = RunnerMiddleware(hello, sys.argv[1])  # main thread: installs the SIGHUP handler
serve(app, host="127.0.0.1", port=int(sys.argv[2]), threads=4, _quiet=True)
"""


@contextlib.contextmanager
def process(args: list[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own process group, always stopped (group TERM, then KILL)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_waitress_reloads_on_sighup(
        runners: tuple[StandinRunner, StandinRunner], tmp_path: Path, session: requests.Session) -> None:
    file = tmp_path / "runner.yaml"
    file.write_text(config_text(runners[0]), encoding="utf-8")
    script = tmp_path / "serve_waitress.py"
    script.write_text(WAITRESS_APP, encoding="utf-8")
    port = free_port()
    base = f"http://{HOST}:{port}"
    log = tmp_path / "waitress.log"
    with process([sys.executable, str(script), str(file), str(port)], log, env=child_env()) as proc:

        def up() -> dict[str, Any] | None:
            assert proc.poll() is None, log.read_text()
            try:
                return get_status(session, base)
            except requests.ConnectionError:
                return None

        first = wait_until(up, what="waitress to answer")
        assert first["pid"] == proc.pid and first["backend"] == "a"
        with Traffic(base) as traffic:
            traffic.wait_for(2)
            file.write_text(config_text(runners[1]), encoding="utf-8")
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: get_status(session, base)["backend"] == "b", what="the switch to b")
            traffic.wait_for(2)
            file.write_text(BROKEN, encoding="utf-8")
            proc.send_signal(signal.SIGHUP)
            status = wait_until(lambda: (s := get_status(session, base))["last_reload"]["ok"] is False and s,
                                what="the failed attempt in status")
            assert status["backend"] == "b" and f"{file}:6:" in status["last_reload"]["error"]
            traffic.wait_for(2)
        assert traffic.failures == []
        assert traffic.runners == {"a", "b"}
        assert proc.poll() is None and get_status(session, base)["pid"] == proc.pid


# --------------------------------------------------------------------------- runner-mw reload


HUP_CHILD = """\
import signal, sys, time
flag = sys.argv[1]

def on_hup(signum, frame):
    with open(flag, "a") as fh:
        fh.write("hup\\n")

signal.signal(signal.SIGHUP, on_hup)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


@pytest.fixture
def hup_child(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A process that appends a line to a file on each SIGHUP."""
    flag = tmp_path / "hups.txt"
    proc = subprocess.Popen([sys.executable, "-c", HUP_CHILD, str(flag)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc, flag
    finally:
        proc.kill()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()


def hups(flag: Path) -> int:
    return len(flag.read_text().splitlines()) if flag.exists() else 0


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    file = tmp_path / "good.yaml"
    file.write_text("version: 1\nbackend: a\nbackends:\n  a:\n    kind: docker\n    url: http://127.0.0.1:8085\n",
                    encoding="utf-8")
    return file


def test_reload_cli_refuses_an_invalid_file_and_sends_nothing(
        hup_child: tuple[subprocess.Popen[str], Path], tmp_path: Path, good_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    proc, flag = hup_child
    bad = tmp_path / "bad.yaml"
    bad.write_text(BROKEN, encoding="utf-8")
    assert cli_main(["reload", "--pid", str(proc.pid), "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "no signal sent" in err and f"{bad}:6: backends.a.url" in err
    # Then a valid one: exactly one HUP arrives, so the invalid call sent none.
    assert cli_main(["reload", "--pid", str(proc.pid), "--config", str(good_file)]) == 0
    assert f"sent SIGHUP to {proc.pid}" in capsys.readouterr().out
    wait_until(lambda: hups(flag) >= 1, what="the HUP")
    assert hups(flag) == 1 and proc.poll() is None


def test_reload_cli_reads_a_pid_file_and_the_config_from_the_environment(
        hup_child: tuple[subprocess.Popen[str], Path], tmp_path: Path, good_file: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    proc, flag = hup_child
    pid_file = tmp_path / "server.pid"
    pid_file.write_text(f"{proc.pid}\n", encoding="utf-8")
    monkeypatch.setenv("RUNNER_MW_CONFIG", str(good_file))
    assert cli_main(["reload", "--pid-file", str(pid_file)]) == 0
    wait_until(lambda: hups(flag) == 1, what="the HUP")


def test_reload_cli_as_a_command(hup_child: tuple[subprocess.Popen[str], Path], good_file: Path) -> None:
    proc, flag = hup_child
    done = subprocess.run([sys.executable, "-m", "runner_mw.cli", "reload", "--pid", str(proc.pid),
                           "--config", str(good_file)], capture_output=True, text=True, env=child_env(),
                          timeout=T)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: hups(flag) == 1, what="the HUP")


def test_reload_cli_reports_a_dead_pid(tmp_path: Path, good_file: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(T)
    assert cli_main(["reload", "--pid", str(gone.pid), "--config", str(good_file)]) == 1
    assert f"no process {gone.pid}" in capsys.readouterr().err
    missing = tmp_path / "missing.pid"
    assert cli_main(["reload", "--pid-file", str(missing), "--config", str(good_file)]) == 1
    assert "cannot read the pid file" in capsys.readouterr().err
    junk = tmp_path / "junk.pid"
    junk.write_text("-1\n", encoding="utf-8")
    assert cli_main(["reload", "--pid-file", str(junk), "--config", str(good_file)]) == 1
    assert "does not hold a process id ('-1')" in capsys.readouterr().err
    junk.write_text("99999999999999999999\n", encoding="utf-8")  # os.kill: OverflowError
    assert cli_main(["reload", "--pid-file", str(junk), "--config", str(good_file)]) == 1
    assert "does not hold a process id" in capsys.readouterr().err
    secret = tmp_path / "token"  # the secret file beside the pid file, given by mistake
    secret.write_text("tok-Zq8v3Lr2Wm9Xc4Np7f0a\n", encoding="utf-8")
    assert cli_main(["reload", "--pid-file", str(secret), "--config", str(good_file)]) == 1
    err = capsys.readouterr().err
    assert "does not hold a process id" in err and "Zq8v" not in err


@pytest.mark.parametrize("argv", [["reload"], ["reload", "--pid", "0"], ["reload", "--pid", "-1"],
                                  ["reload", "--pid", "1", "--pid-file", "x"]])
def test_reload_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    capsys.readouterr()


@pytest.mark.parametrize(("program", "shown"), [("sleep", "uwsgi"), ("sleep", "uWSGI master"),
                                               ("uwsgi", "myapp-master")],
                         ids=["named-uwsgi", "auto-procname", "procname-master"])
def test_reload_cli_refuses_a_uwsgi_process(good_file: Path, tmp_path: Path, program: str, shown: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # uWSGI's SIGHUP restarts its workers (a broken file is then fatal to the app), and without
    # --master it stops the server: "ok, sent SIGHUP" was the worst answer to give. Known by
    # its executable, or by the name it shows (its --procname options change the latter).
    binary = shutil.which("sleep")
    assert binary is not None
    if program == "uwsgi":  # a uWSGI binary that renamed itself
        binary = str(shutil.copy(binary, tmp_path / "uwsgi"))
    proc = subprocess.Popen(["bash", "-c", f'exec -a "{shown}" {binary} 60'])
    try:
        wait_until(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(shown.encode() + b"\0"),
                   what="the process to show its name")
        assert cli_main(["reload", "--pid", str(proc.pid), "--config", str(good_file)]) == 1
        assert "is uWSGI" in capsys.readouterr().err
        assert proc.poll() is None  # no HUP reached it (sleep would have died of one)
    finally:
        proc.kill()
        proc.wait(T)


def test_a_middleware_under_uwsgi_says_sighup_is_uwsgis(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, good_file: Path,
        sighup_restored: None) -> None:
    monkeypatch.setitem(sys.modules, "uwsgi", types.ModuleType("uwsgi"))  # what uWSGI gives its apps
    caplog.set_level(logging.WARNING, logger="runner_mw.reload")
    mw = RunnerMiddleware(hello, good_file)
    try:
        assert any("under uWSGI, SIGHUP is uWSGI's own" in r.getMessage() for r in caplog.records)
    finally:
        mw.close()
