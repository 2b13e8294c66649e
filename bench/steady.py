"""Steady load, one target at a time: req/s and worker CPU per request in short windows.

``python -m bench.steady [--seconds 25] [--window 3] [--route asset|execute] [--targets ...]``

Each target (a gunicorn app of ``bench/apps.py`` under ``lib.GUNICORN_ARGS``, against
nginx as the runner) gets one long wrk run of its own; every ``--window`` seconds the
script reads nginx's handled requests (one upstream request per proxied request) and the
workers' CPU time. Use it to see how steady the machine is: within one wrk run the
connections and their split between gunicorn's workers stay the same, so what moves
from window to window is the machine. ``bench/run`` is the reference; this is the
quiet-machine cross-check quoted in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import bench, lib

PROXIES = ("floor_proxy", "runner_mw", "werkzeug_proxy")


def windows(nginx: lib.Nginx, server: lib.Gunicorn, url: str, seconds: float, window: float,
            body: Path | None) -> list[tuple[float, float]]:
    """(req/s, worker CPU us per request) for each full window of one wrk run."""
    pids = server.workers()
    result: dict[str, Any] = {}
    load = threading.Thread(target=lambda: result.update(lib.wrk(
        url, seconds, connections=16, method="POST" if body else "GET", body_file=body)))
    load.start()
    time.sleep(min(1.0, window))  # connections made, threads busy
    out = []
    cpu0, req0, t0 = lib.cpu_seconds(pids), nginx.accepts()[1], time.monotonic()
    while True:
        time.sleep(window)
        if not load.is_alive():
            break  # the window wrk ended in is not a full one
        cpu1, req1, t1 = lib.cpu_seconds(pids), nginx.accepts()[1], time.monotonic()
        done = req1 - req0 - 1  # minus the stub_status request itself
        if done > 0:
            out.append((done / (t1 - t0), (cpu1 - cpu0) / done * 1e6))
        cpu0, req0, t0 = cpu1, req1, t1
    load.join()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=25.0, help="one wrk run per target (default 25)")
    parser.add_argument("--window", type=float, default=3.0, help="seconds per window (default 3)")
    parser.add_argument("--route", choices=("asset", "execute"), default="asset")
    parser.add_argument("--targets", default=",".join(PROXIES),
                        help=f"comma-separated apps, one at a time (default {','.join(PROXIES)})")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="runner-mw-steady-"))
    tmp.chmod(0o755)  # nginx's worker reads the files in it
    nginx = lib.Nginx(tmp)
    nginx.start()
    body: Path | None = None
    if args.route == "execute":
        body = tmp / "execute.json"
        body.write_bytes(bench.execute_body())
    path = "/v1/execute" if body else "/runner" + lib.ASSET_1K
    config = tmp / "runner.yaml"
    config.write_text(bench.runner_yaml(nginx))
    prom = tmp / "prom"
    prom.mkdir()
    medians: dict[str, tuple[float, float]] = {}
    try:
        for app in args.targets.split(","):
            server = lib.Gunicorn(app, app, tmp, env={
                "BENCH_UPSTREAM": nginx.url("a"), "BENCH_RUNNER_CONFIG": str(config),
                "PROMETHEUS_MULTIPROC_DIR": str(prom)})
            server.start()
            try:
                server.wait_ready()
                rows = windows(nginx, server, f"http://127.0.0.1:{server.port}{path}", args.seconds,
                               args.window, body)
            finally:
                server.stop()
            for rps, cpu in rows:
                print(f"{app} {args.route}: {rps:.0f} req/s, {cpu:.0f} us/req", file=sys.stderr)
            if rows:
                medians[app] = (statistics.median(r for r, _ in rows), statistics.median(c for _, c in rows))
    finally:
        nginx.stop()
    ref = medians.get("werkzeug_proxy")
    print("| target | route | req/s (median of windows) | worker CPU us/req | x werkzeug | CPU x werkzeug |")
    print("|---|---|---:|---:|---:|---:|")
    for app, (rps, cpu) in medians.items():
        ratio = f"{rps / ref[0]:.2f} | {ref[1] / cpu:.2f}" if ref else "- | -"
        print(f"| {app} | {args.route} | {rps:.0f} | {cpu:.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
