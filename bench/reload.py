"""Reload under load: HUP to the gunicorn master while wrk runs, the YAML alternating backends.

Needs runner_mw's gunicorn hooks (``runner_mw/gunicorn.py``, ``config/gunicorn.conf.py``):
without them a HUP restarts every worker, which is not what is measured here, so the
part is skipped with a message. The two stand-in backends are the nginx server blocks
"a" and "b"; each answers with ``X-Bench-Backend: a|b``, and the target adds
``X-Bench-Pid``, so a probe thread (a new connection per request, so that both workers
are hit) sees which worker serves which backend after each HUP.
"""

from __future__ import annotations

import http.client
import os
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import lib

if TYPE_CHECKING:
    from bench.bench import Bench

HOOKS = lib.REPO / "runner_mw" / "gunicorn.py"
CONF = lib.REPO / "config" / "gunicorn.conf.py"
PERIOD_S = 0.5  # HUP period of the fast phase
SPACED_S = 1.5  # HUP period of the phase that measures the switch time
SPACED_HUPS = 4


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Probe:
    """Sequential GETs of the 1 KB asset on new connections: (start, end, pid, backend, ok)."""

    def __init__(self, port: int, path: str) -> None:
        self.port, self.path = port, path
        self.seen: list[tuple[float, float, str, str, bool]] = []
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._halt.is_set():
            t0 = time.monotonic()
            pid = backend = ""
            ok = False
            con = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                con.request("GET", self.path)
                resp = con.getresponse()
                resp.read()
                pid = resp.getheader("X-Bench-Pid") or ""
                backend = resp.getheader("X-Bench-Backend") or ""
                ok = resp.status == 200
            except OSError:
                ok = False
            finally:
                con.close()
            self.seen.append((t0, time.monotonic(), pid, backend, ok))
            time.sleep(0.002)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join(10)


def switch_time(seen: list[tuple[float, float, str, str, bool]], start: float, end: float, new: str,
                workers: list[str]) -> float | None:
    """Seconds from ``start`` (the HUP) until every worker answers with backend ``new``, judged
    from the probes that started in [start, end); None if that did not happen before ``end``."""
    window = [s for s in seen if start <= s[0] < end and s[4]]
    first_new: dict[str, float] = {}
    last_old = start
    for _t0, t1, pid, backend, _ in window:
        if backend == new:
            first_new.setdefault(pid, t1)
        else:
            last_old = max(last_old, t1)
    if any(w not in first_new for w in workers):
        return None
    return max(last_old, *first_new.values()) - start


def reload_under_load(b: Bench) -> dict[str, Any]:
    missing = [str(p.relative_to(lib.REPO)) for p in (HOOKS, CONF) if not p.exists()]
    if missing:
        msg = f"{', '.join(missing)} not found: needs runner_mw's gunicorn HUP hooks"
        b.say(f"reload under load: SKIPPED ({msg})")
        return {"skipped": msg}
    cfg = b.tmp / "reload.yaml"
    from bench.bench import runner_yaml

    texts = {name: runner_yaml(b.nginx, backend=name) for name in ("a", "b")}
    _write_atomic(cfg, texts["a"])
    env = {**b.runner_env(cfg, "reload"), "RUNNER_MW_CONFIG": str(cfg)}
    # The hooks come from the shipped config module; every other setting is the same CLI as all targets.
    g = b.gunicorn("r-runner_mw", "runner_mw_pid", env, extra=["-c", str(CONF)])
    g.wait_ready()
    master = g.proc.pid if g.proc else 0
    pids = sorted(g.workers())
    asset = f"http://127.0.0.1:{g.port}/runner{lib.ASSET_1K}"
    execute = f"http://127.0.0.1:{g.port}/v1/execute"
    conns = max(2, b.args.connections // 2)

    def load(seconds: float) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(lib.wrk, asset, seconds, connections=conns, cpus=b.args.wrk_cpu),
                    pool.submit(lib.wrk, execute, seconds, connections=conns, method="POST",
                                body_file=b.body, cpus=b.args.wrk_cpu)]
            return [j.result() for j in jobs]

    fast = b.args.reload_seconds
    b.say(f"reload under load: {b.args.seconds:.0f}s before, then HUP every {PERIOD_S}s for {fast:.0f}s "
          f"and {SPACED_HUPS} HUPs {SPACED_S}s apart, workers {pids}")
    load(b.args.warmup)
    before = load(max(5.0, b.args.seconds))
    hups: list[tuple[float, str, str]] = []  # (time, new backend, phase)
    during_s = 1 + fast + SPACED_HUPS * SPACED_S + 1
    with Probe(g.port, f"/runner{lib.ASSET_1K}") as probe, ThreadPoolExecutor(1) as pool:
        job = pool.submit(load, during_s)
        time.sleep(1)
        current = "a"
        t0 = time.monotonic()
        n_fast = int(fast / PERIOD_S)
        schedule = [(i * PERIOD_S, "fast") for i in range(n_fast)]
        schedule += [(n_fast * PERIOD_S + i * SPACED_S, "spaced") for i in range(SPACED_HUPS)]
        for offset, phase in schedule:
            delay = t0 + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            current = "b" if current == "a" else "a"
            _write_atomic(cfg, texts[current])
            hups.append((time.monotonic(), current, phase))
            os.kill(master, signal.SIGHUP)
        during = job.result()
    same_pids = sorted(g.workers()) == pids
    g.stop()

    workers = [str(p) for p in pids]
    ends = [h[0] for h in hups[1:]] + [hups[-1][0] + SPACED_S]
    switches = [(switch_time(probe.seen, t, end, new, workers), phase)
                for (t, new, phase), end in zip(hups, ends, strict=True)]
    spaced = [s for s, phase in switches if phase == "spaced"]
    fast_sw = [s for s, phase in switches if phase == "fast"]
    measured = [s for s in spaced if s is not None]
    probe_fail = sum(1 for s in probe.seen if not s[4])
    p99 = {"before": [r["p99_us"] / 1000 for r in before], "during": [r["p99_us"] / 1000 for r in during]}
    ratios = [d / bf for d, bf in zip(p99["during"], p99["before"], strict=True)]
    shown = [None if s is None else round(s, 3) for s, _ in switches]
    b.say(f"reload: {len(hups)} HUPs, switch times {shown}")
    return {
        "hups": len(hups),
        "seconds": hups[-1][0] - hups[0][0],
        "failed": sum(r["errors"] for r in during) + probe_fail,
        "failed_before": sum(r["errors"] for r in before),
        "probe_failed": probe_fail,
        "requests": sum(r["requests"] for r in during) + len(probe.seen),
        "p99_before_ms": max(p99["before"]),
        "p99_during_ms": max(p99["during"]),
        "p99_by_route_ms": {"asset": [p99["before"][0], p99["during"][0]],
                            "execute": [p99["before"][1], p99["during"][1]]},
        "p99_ratio": max(ratios),
        "rps_before": [r["rps"] for r in before],
        "rps_during": [r["rps"] for r in during],
        "switch_median_s": statistics.median(measured) if measured else None,
        "switch_max_s": max(measured) if len(measured) == len(spaced) and measured else None,
        "switch_spaced_s": spaced,
        "windows_switched": sum(1 for s in fast_sw if s is not None) + len(measured),
        "fast_switch_s": fast_sw,
        "same_pids": same_pids,
        "workers": pids,
    }
