"""SnapshotStore: atomic swap, unchanged no-op, failed reload keeps the old one, draining."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from runner_mw.config import Config
from runner_mw.loader import config_from_mapping
from runner_mw.snapshot import NO_SETTING, Snapshot, SnapshotStore, changed_keys

T = 10.0  # seconds: generous deadlines for a busy machine


class FakeBackend:
    """Records what the store does with it; never opens a socket."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.closed = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self.closed += 1


class Builds:
    """A ``build`` callable for SnapshotStore that remembers every backend it made."""

    def __init__(self) -> None:
        self.made: list[FakeBackend] = []
        self.fail_with: Exception | None = None

    def __call__(self, settings: Any) -> FakeBackend:
        if self.fail_with is not None:
            raise self.fail_with
        backend = FakeBackend(settings)
        self.made.append(backend)
        return backend


def config(url: str = "http://127.0.0.1:8085", *, name: str = "a", read_ms: int = 30000) -> Config:
    return config_from_mapping({
        "version": 1,
        "backend": name,
        "backends": {name: {"kind": "docker", "url": url}},
        "timeouts": {"connect_ms": 100, "read_ms": read_ms},
    })


def yaml_text(url: str) -> str:
    return f"version: 1\nbackend: a\nbackends:\n  a:\n    kind: docker\n    url: {url}\n"


def wait_until(predicate: Any, timeout: float = T) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def _whole_files_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests write each file whole before a reload: no settle wait (it has its own test)."""
    from runner_mw import loader

    monkeypatch.setattr(loader, "SETTLE_S", 0.0)


@pytest.fixture
def builds() -> Builds:
    return Builds()


def test_apply_swaps_to_a_new_snapshot_and_keeps_the_old_one_whole(builds: Builds) -> None:
    store = SnapshotStore(config("http://127.0.0.1:1001"), build=builds)
    old = store.current
    outcome = store.apply(config("http://127.0.0.1:1002"))
    assert outcome.ok and outcome.generation == 2
    assert outcome.changed == ("backends.a.url",)
    assert store.current is not old and store.current.generation == 2
    assert store.current.config.active.url == "http://127.0.0.1:1002"
    # A request holding the old snapshot still sees the old config and its own backend.
    assert old.config.active.url == "http://127.0.0.1:1001"
    assert old.backend.settings.url == "http://127.0.0.1:1001"
    assert store.last_reload == outcome


def test_readers_never_see_a_mixed_snapshot(builds: Builds) -> None:
    store = SnapshotStore(config("http://127.0.0.1:2000"), build=builds)
    configs = [config(f"http://127.0.0.1:{2001 + i}") for i in range(200)]
    stop = threading.Event()
    mixed: list[str] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            snap = store.current  # read once, as a request does
            if snap.backend.settings is not snap.config.active:
                mixed.append(f"{snap.generation}")
            reads[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for cfg in configs:
            store.apply(cfg)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert mixed == []
    assert reads[0] > 0
    assert store.current.generation == 201


def test_an_unchanged_config_is_a_no_op(builds: Builds) -> None:
    store = SnapshotStore(config(), build=builds)
    snap = store.current
    outcome = store.apply(config())  # same content: same sha256
    assert outcome.ok and outcome.generation == 1 and outcome.changed == ()
    assert store.current is snap
    assert len(builds.made) == 1 and builds.made[0].closed == 0


def test_the_same_config_under_a_newer_generation_keeps_the_backend(builds: Builds) -> None:
    store = SnapshotStore(config(), build=builds)
    snap = store.current
    outcome = store.apply(config(), generation=7)  # a gunicorn worker booting at generation 7
    assert outcome.ok and outcome.generation == 7
    assert store.current is snap and snap.generation == 7
    assert len(builds.made) == 1 and builds.made[0].closed == 0
    outcome = store.apply(config("http://127.0.0.1:9"), generation=8)
    assert outcome.generation == 8 and store.current.generation == 8


def test_an_unchanged_file_is_a_no_op(builds: Builds, tmp_path: Path) -> None:
    file = tmp_path / "runner.yaml"
    file.write_text(yaml_text("http://127.0.0.1:8085"), encoding="utf-8")
    from runner_mw.loader import load_config

    store = SnapshotStore(load_config(file), path=str(file), build=builds)
    snap = store.current
    file.write_text(yaml_text("http://127.0.0.1:8085"), encoding="utf-8")  # rewritten, same bytes
    outcome = store.reload()
    assert outcome.ok and store.current is snap and len(builds.made) == 1


def test_a_loader_that_raises_anything_is_a_failed_reload_not_an_exception(
        builds: Builds, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every known failure is a ConfigError; this is the backstop for the unknown ones (a
    # bug of ours or a plugin's): SIGHUP's reloader and middleware.reload() must not raise.
    from runner_mw import snapshot

    file = tmp_path / "runner.yaml"
    file.write_text(yaml_text("http://127.0.0.1:8085"), encoding="utf-8")
    store = SnapshotStore(snapshot.load_config(file), path=str(file), build=builds)
    snap = store.current

    def broken(path: str, **_: Any) -> Config:
        raise KeyError("surprise")

    monkeypatch.setattr(snapshot, "load_config", broken)
    outcome = store.reload()
    assert not outcome.ok and outcome.error == "KeyError: 'surprise'"
    assert store.current is snap and store.last_reload is outcome


def test_a_reload_waits_for_a_file_still_being_written(builds: Builds, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # An editor (or a tool) writing in place, and a watcher sending HUP on its first write:
    # the prefix on disk parses ("read_ms: 300" of "read_ms: 30000") and must not be applied.
    from runner_mw import loader

    monkeypatch.setattr(loader, "SETTLE_S", 1.0)  # a wide margin on a busy machine
    file = tmp_path / "runner.yaml"
    whole = yaml_text("http://127.0.0.1:8085") + "timeouts:\n  read_ms: 30000\n"
    cut = whole.index("30000") + 3
    file.write_text(whole, encoding="utf-8")
    store = SnapshotStore(loader.load_config(file), path=str(file), build=builds)
    with open(file, "r+", encoding="utf-8") as fh:
        fh.truncate(0)
        fh.write(whole[:cut])  # "read_ms: 300": valid YAML, a tenth of the deadline
        fh.flush()
        finish = threading.Timer(0.05, lambda: (fh.write(whole[cut:]), fh.flush()))
        finish.start()
        started = time.monotonic()
        outcome = store.reload()
        finish.join()
    assert outcome.ok and time.monotonic() - started >= 0.9
    assert store.current.config.active.timeouts.read_ms == 30000


def test_a_failed_reload_keeps_the_old_snapshot(builds: Builds, tmp_path: Path) -> None:
    file = tmp_path / "runner.yaml"
    file.write_text(yaml_text("http://127.0.0.1:8085"), encoding="utf-8")
    from runner_mw.loader import load_config

    store = SnapshotStore(load_config(file), path=str(file), build=builds)
    snap = store.current
    file.write_text(yaml_text("htp://nope"), encoding="utf-8")
    outcome = store.reload()
    assert not outcome.ok
    assert outcome.error is not None and f"{file}:6: backends.a.url" in outcome.error
    assert store.current is snap and snap.generation == 1
    assert store.last_reload == outcome and outcome.generation == 1
    assert builds.made[0].closed == 0
    file.unlink()
    outcome = store.reload()
    assert not outcome.ok and str(file) in (outcome.error or "")
    assert store.current is snap
    file.write_text(yaml_text("http://127.0.0.1:8086"), encoding="utf-8")
    outcome = store.reload()
    assert outcome.ok and outcome.generation == 2 and store.current.config.active.url.endswith(":8086")


def test_a_backend_that_cannot_be_built_keeps_the_old_snapshot(builds: Builds) -> None:
    store = SnapshotStore(config(), build=builds)
    snap = store.current
    builds.fail_with = RuntimeError("no such driver")
    outcome = store.apply(config("http://127.0.0.1:9"))
    assert not outcome.ok and "no such driver" in (outcome.error or "")
    assert store.current is snap


def test_a_failed_build_never_quotes_a_secret_of_the_new_config(
        builds: Builds, caplog: pytest.LogCaptureFixture) -> None:
    # A plugin's error about the config being loaded may quote its token: the log line, the
    # outcome and so status carried it (the process redacts only the current config's).
    store = SnapshotStore(config(), build=builds)
    token = "rotated-8f2c1e9a4b7d6f3e0a1b2c3d4e5f6a7b"
    builds.fail_with = RuntimeError(f"login refused for token {token}")
    new = config_from_mapping({"version": 1, "backend": "a", "upstream": {"service_token": token},
                               "backends": {"a": {"kind": "docker", "url": "http://127.0.0.1:9"}}})
    outcome = store.apply(new)
    assert not outcome.ok and "login refused for token" in (outcome.error or "")
    assert token not in (outcome.error or "") and token not in caplog.text


def test_concurrent_reloads_end_on_the_file_on_disk(builds: Builds, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # An older edit read first but validated slower was applied after a newer one: a HUP
    # and a manual reload() at once could leave the process on a file no longer on disk.
    from runner_mw import snapshot

    file = tmp_path / "runner.yaml"
    file.write_text(yaml_text("http://127.0.0.1:1"), encoding="utf-8")
    store = SnapshotStore(config(), path=str(file), build=builds)
    real_load = snapshot.load_config
    first_read = threading.Event()

    def slow_first(path: str, **kwargs: Any) -> Config:
        loaded = real_load(path, **kwargs)
        if not first_read.is_set():
            first_read.set()
            time.sleep(0.5)  # edit 1 read, still being validated
        return loaded

    monkeypatch.setattr(snapshot, "load_config", slow_first)
    first = threading.Thread(target=store.reload)
    first.start()
    first_read.wait(T)
    file.write_text(yaml_text("http://127.0.0.1:2"), encoding="utf-8")  # edit 2, and its reload
    store.reload()
    first.join(T)
    assert store.current.config.active.url == "http://127.0.0.1:2"


def test_a_reload_nested_in_a_reload_on_the_same_thread_does_not_hang(
        builds: Builds, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A host's SIGHUP handler calling reload() runs on the main thread, also while that
    # thread sleeps in a reload's settle wait: the reload lock must let it through.
    from runner_mw import snapshot

    file = tmp_path / "runner.yaml"
    file.write_text(yaml_text("http://127.0.0.1:1"), encoding="utf-8")
    store = SnapshotStore(config(), path=str(file), build=builds)
    real_load = snapshot.load_config
    nested: list[Any] = []

    def load_with_a_signal_inside(path: str, **kwargs: Any) -> Config:
        if not nested:
            nested.append(None)
            nested[0] = store.reload()  # as the handler would, mid-read
        return real_load(path, **kwargs)

    monkeypatch.setattr(snapshot, "load_config", load_with_a_signal_inside)
    outer = threading.Thread(target=store.reload, daemon=True)
    outer.start()
    outer.join(T)
    assert not outer.is_alive(), "the nested reload deadlocked"
    assert nested[0].ok and store.current.config.active.url == "http://127.0.0.1:1"


def test_mark_failed_reports_the_error_and_keeps_everything(builds: Builds) -> None:
    store = SnapshotStore(config(), build=builds)
    snap = store.current
    outcome = store.mark_failed("runner.yaml:3: backend: nope", at=123.0)
    assert outcome.ok is False and outcome.at == 123.0 and outcome.generation == 1
    assert store.last_reload == outcome and store.current is snap
    assert store.apply(config()).ok  # the same good file again clears it
    assert store.last_reload.ok


def test_the_old_backend_closes_only_after_the_last_request_leaves(builds: Builds) -> None:
    store = SnapshotStore(config("http://127.0.0.1:1"), build=builds)
    old = store.current
    old.enter()
    old.enter()
    store.apply(config("http://127.0.0.1:2"))
    assert builds.made[0].closed == 0 and old.inflight == 2
    old.leave()
    assert builds.made[0].closed == 0
    old.leave()
    assert builds.made[0].closed == 1
    assert builds.made[1].closed == 0  # the new one is untouched


def test_an_idle_old_backend_closes_at_once(builds: Builds) -> None:
    store = SnapshotStore(config("http://127.0.0.1:1"), build=builds)
    store.apply(config("http://127.0.0.1:2"))
    assert builds.made[0].closed == 1


def test_a_snapshot_closed_by_its_last_request_leaves_no_timer_sleeping(builds: Builds) -> None:
    # One Timer thread per reload that overlapped a request slept out the whole grace (37 s
    # with the shipped timeouts), holding its snapshot: 107 threads in a worker at 3 HUP/s.
    def timers() -> int:
        return sum(isinstance(thread, threading.Timer) for thread in threading.enumerate())

    before = timers()
    snaps = [Snapshot(config(), builds(config().active), n) for n in range(50)]
    for snap in snaps:
        snap.enter()
        snap.retire(60.0)
    assert timers() == before + 50
    for snap in snaps:
        snap.leave()
    wait_until(lambda: timers() <= before)
    assert all(snap._closed for snap in snaps)


def test_a_retiring_snapshots_token_stays_redacted_until_it_closes(builds: Builds) -> None:
    from runner_mw.logs import KEEP_CONFIGS, REDACTOR

    token = "retiring-token-0123456789"
    first = config_from_mapping({"version": 1, "backend": "a", "upstream": {"service_token": token},
                                 "backends": {"a": {"kind": "docker", "url": "http://127.0.0.1:9"}}})
    store = SnapshotStore(first, build=builds)
    old = store.current
    old.enter()  # a request still running on it
    for n in range(KEEP_CONFIGS + 2):
        store.apply(config(f"http://127.0.0.1:{n + 1}"))
    assert REDACTOR.redact(token) == "***"
    old.leave()  # its last request: it closes, and its token may go
    assert old._closed
    assert REDACTOR.redact(token) == token


def test_retire_closes_after_the_grace_period_even_with_a_request_stuck(builds: Builds) -> None:
    snap = Snapshot(config(), FakeBackend(None), 1)
    backend = snap.backend
    assert isinstance(backend, FakeBackend)
    snap.enter()
    started = time.monotonic()
    snap.retire(0.2)
    assert backend.closed == 0
    wait_until(lambda: backend.closed == 1)
    assert time.monotonic() - started >= 0.19
    snap.leave()  # the stuck request finally leaves: no second close
    assert backend.closed == 1


def test_changed_keys_names_secrets_without_their_values() -> None:
    old = {"backend": "a", "upstream": {"service_token": "old-secret-value"}, "access": {"tokens": ["x"]}}
    new = {"backend": "b", "upstream": {"service_token": "new-secret-value"}, "access": {"tokens": ["x"]}}
    keys = changed_keys(old, new)
    assert keys == ["backend", "upstream.service_token (secret)"]
    assert not any("secret-value" in k for k in keys)


def test_a_rotated_secret_file_is_a_change_and_the_same_file_again_is_not(
        builds: Builds, tmp_path: Path) -> None:
    # The YAML names the service token's file; rotating the file, then a reload, applies it.
    from runner_mw.loader import load_config

    file = tmp_path / "runner.yaml"
    file.write_text(yaml_text("http://127.0.0.1:8085") + "    service_token: {file: token}\n",
                    encoding="utf-8")
    token = tmp_path / "token"
    token.write_text("old-service-token-0001\n", encoding="utf-8")
    store = SnapshotStore(load_config(file), path=str(file), build=builds)
    snap = store.current
    token.write_text("old-service-token-0001\n", encoding="utf-8")  # rewritten, same bytes
    assert store.reload().ok and store.current is snap
    token.write_text("new-service-token-0002\n", encoding="utf-8")
    outcome = store.reload()
    assert outcome.ok and outcome.generation == 2 and store.current is not snap
    assert store.current.config.active.service_token == "new-service-token-0002"
    assert outcome.changed == ("backends.a.service_token (secret)",)
    # The same text without its newline: the bytes moved, no setting did; it says so.
    token.write_text("new-service-token-0002", encoding="utf-8")
    outcome = store.reload()
    assert outcome.ok and outcome.generation == 3 and outcome.changed == (NO_SETTING,)


def test_a_config_a_client_could_claim_access_in_is_warned_about_when_put_in_place(
        builds: Builds, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="runner_mw")
    proxied = config_from_mapping({"version": 1, "backend": "a",
                                   "backends": {"a": {"kind": "docker", "url": "http://127.0.0.1:8085"}},
                                   "access": {"trusted_proxies": ["127.0.0.1/32"]}})

    def warnings() -> list[str]:
        lines = [r.getMessage() for r in caplog.records]
        return [line for line in lines if "holds loopback addresses that are not trusted" in line]

    store = SnapshotStore(config(), build=builds)
    assert warnings() == []
    store.apply(proxied)  # a reload
    assert len(warnings()) == 1 and "::1/128" in warnings()[0]
    SnapshotStore(proxied, build=builds)  # a start
    assert len(warnings()) == 2

