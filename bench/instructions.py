"""Instructions per request, counted by valgrind: werkzeug's ProxyMiddleware vs runner_mw.

``python -m bench.instructions [--requests 150] [--jobs 2] [--runner memory]``

Each target of ``bench.inprocess`` is called ``N`` and ``3N`` times in a fresh Python under
``valgrind --tool=callgrind`` (one thread, nginx as the runner, no WSGI server); the
difference divided by ``2N`` is the user-space instructions one request costs, start-up
and imports cancelled out. Counts do not depend on what else the machine is doing (two
runs agree within about 2 %), so a change of a few percent shows, where CPU time on a
shared machine moves by 10-30 % between runs. What they leave out: kernel work (werkzeug's
connect and close per request, every syscall) and the cost of the GIL between threads.
Use it beside ``bench/run`` and ``bench.inprocess``, not instead of them.
``--runner memory`` replays nginx's replies from memory (``bench.memory``): no syscall, and
the same count to within a few hundred instructions on every run, where nginx over loopback
moves it by up to 10 % (a reply read in one piece or two): the figure to compare two
versions of the hot path by.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import bench, inprocess, lib, memory

ROUTES = ("asset", "execute")


def child(name: str, route: str, n: int, port: int, runner: str = "nginx") -> None:
    """Inside valgrind: build ``name`` and make ``n`` requests on ``route``."""
    tmp = Path(tempfile.mkdtemp(prefix="runner-mw-instructions-"))
    (tmp / "prom").mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(tmp / "prom")
    os.environ["BENCH_UPSTREAM"] = f"http://127.0.0.1:{port}"

    class Upstream:  # the nginx the parent started: both runner names on its "a" port
        port_a = port_b = port

    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the access log, as in bench.inprocess
    from runner_mw import metrics

    # The flusher thread writes the metrics once a second of wall time: under valgrind that
    # is every few hundred requests, a count that moves with the machine's load (±5 % per
    # request). A worker serving a thousand requests a second spends a few hundred
    # instructions per request on it; left out here, written once after the run instead.
    metrics.FLUSH_S = 3600.0
    # So do the access-log writer and the reload watcher, which wake every 0.1 s of wall time:
    # on a busy machine valgrind is slower, so they woke more often per request (a count that
    # moved by 10 % from run to run). The queued access lines are written at exit, all counted.
    from runner_mw import logs
    from runner_mw import reload as reloading

    logs.WRITE_S = reloading.POLL_S = 3600.0
    app = inprocess.build(name, Upstream, tmp)
    body = bench.execute_body()
    replay = (memory.replaying(memory.record(Upstream, body)) if runner == "memory"  # type: ignore[arg-type]
              else contextlib.nullcontext())
    with replay:
        for _ in range(20):  # connections, caches: one-time costs out of the way
            inprocess.call(app, route, body)
        # A full collection scans every object the imports made: when one happens to fall
        # into a run, it adds millions of instructions (±10 % per request). Frozen, the
        # collector only sees what requests allocate, as in a long-running worker.
        gc.collect()
        gc.freeze()
        for _ in range(n):
            inprocess.call(app, route, body)


def count(name: str, route: str, n: int, port: int, runner: str = "nginx") -> int:
    """Instructions of a whole child run (valgrind's "Collected" total)."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         "-m", "bench.instructions", "--child", name, route, str(n), str(port), runner],
        capture_output=True, text=True, timeout=900, cwd=lib.REPO, check=True,
        env={**os.environ, "PYTHONPATH": str(lib.REPO), "PYTHONHASHSEED": "0"})
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--child"]:
        name, route, n, port, runner = sys.argv[2:7]
        child(name, route, int(n), int(port), runner)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=150, help="N: runs of N and 3N requests")
    parser.add_argument("--jobs", type=int, default=2, help="valgrind runs at once (default 2)")
    parser.add_argument("--runner", choices=("nginx", "memory"), default="nginx",
                        help="nginx over loopback (default), or its replies replayed from memory")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="runner-mw-instructions-"))
    nginx = lib.Nginx(tmp)
    nginx.start()
    try:
        n = args.requests
        cells = [(name, route, k) for name in inprocess.TARGETS for route in ROUTES for k in (n, 3 * n)]
        with ThreadPoolExecutor(args.jobs) as pool:
            counts = pool.map(lambda c: count(c[0], c[1], c[2], nginx.port_a, args.runner), cells)
            totals = dict(zip(cells, counts, strict=True))
    finally:
        nginx.stop()
    per = {(name, route): (totals[(name, route, 3 * n)] - totals[(name, route, n)]) / (2 * n)
           for name in inprocess.TARGETS for route in ROUTES}
    print("| route | target | instructions/request | x werkzeug |")
    print("|---|---|---:|---:|")
    for route in ROUTES:
        ref = per[("werkzeug ProxyMiddleware", route)]
        for name in inprocess.TARGETS:
            print(f"| {route} | {name} | {per[(name, route)] / 1000:.0f}k | {ref / per[(name, route)]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
