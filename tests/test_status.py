"""``/runner/-/status``'s upstream health: cached, and asked by one caller at a time."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from mwfixtures import running_gateway

from runner_mw.status import HealthCache

pytest_plugins = ["mwfixtures"]


def test_a_flood_of_status_requests_is_one_probe_of_the_runner() -> None:
    with running_gateway() as gw:
        gw.runner.respond("/healthz", 200, [("Content-Type", "application/json")], b'{"ok":true}', delay=0.5)
        cache, snap = HealthCache(), gw.middleware.store.current
        start = threading.Barrier(8)

        def ask() -> dict[str, object]:
            start.wait()
            return cache.get(snap)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: ask(), range(8)))
        assert all(a["ok"] is True for a in answers)
        probes = [r for r in gw.runner.received if r.raw_path == "/healthz"]
        assert len(probes) == 1, len(probes)
        assert cache.get(snap)["ok"] is True and len(
            [r for r in gw.runner.received if r.raw_path == "/healthz"]) == 1  # cached


def test_status_health_is_never_another_snapshots() -> None:
    # Keyed on id(snap), a retired, collected snapshot's cached health (5 s) was the next
    # one's when it got the same address: a dead runner reported ok.
    from types import SimpleNamespace

    from mwfixtures import config_for

    from runner_mw.loader import config_from_mapping
    from runner_mw.snapshot import Snapshot
    from runner_mw.status import HealthCache

    config = config_from_mapping(config_for("http://127.0.0.1:9"))
    cache = HealthCache()
    live = SimpleNamespace(health=lambda: {"ok": True})
    dead = SimpleNamespace(health=lambda: {"ok": False, "error": "NotSent: refused"})
    reused = 0
    for _ in range(50):
        old = Snapshot(config, live, 1)  # type: ignore[arg-type]
        assert cache.get(old)["ok"] is True
        old_id = id(old)
        del old
        new = Snapshot(config, dead, 2)  # type: ignore[arg-type]
        reused += id(new) == old_id
        assert cache.get(new)["ok"] is False
    assert reused, "no address was reused: the case this guards did not happen"
