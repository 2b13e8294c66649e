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
