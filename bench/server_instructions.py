"""Instructions per request of a whole gunicorn worker, counted by valgrind: the server's own
Python included, which ``bench.instructions`` (the app alone) leaves out.

``python -m bench.server_instructions [--requests 200] [--routes asset,execute]``

Each target of ``bench/apps.py`` (the bare app, the Python floor, werkzeug's proxy,
runner_mw) is served by gunicorn under ``valgrind --tool=callgrind --trace-children=yes``
with the settings of ``bench/run`` but one worker, and nginx as the runner. Four keep-alive
connections make ``N`` requests, then ``3N`` in a second server; the worker's count over
``2N`` is what one request costs it, start-up cancelled out. The bare app's row is what
gunicorn itself costs a request: no proxy can be cheaper than that, so it bounds every
ratio (``werkzeug / bare`` is the most any proxy could reach). User space only: werkzeug's
connect and close per request and every syscall's kernel side are not in it, nor the cost
of the GIL between threads (valgrind runs one thread at a time). Counts move by about 2 %
from run to run (nginx's replies read in one piece or two). Slow: about a minute a cell.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import bench, lib

TARGETS = {"bare WSGI (gunicorn alone)": "bare", "Python floor": "floor_proxy",
           "werkzeug ProxyMiddleware": "werkzeug_proxy", "runner_mw": "runner_mw"}
CONNECTIONS = 4
WARM = 40  # requests before the counted ones: connections, caches, the pool


def _args(port: int) -> list[str]:
    """``bench/run``'s gunicorn settings with one worker (its count is the whole server's
    work), a timeout valgrind's pace cannot reach, and the log level that names the worker."""
    args = list(lib.GUNICORN_ARGS)
    for name, value in (("--workers", "1"), ("--timeout", "600"), ("--log-level", "info")):
        args[args.index(name) + 1] = value
    return [*args, "--bind", f"127.0.0.1:{port}", "--chdir", str(lib.REPO)]


def _load(port: int, route: str, body: bytes, n: int) -> None:
    """``n`` requests over ``CONNECTIONS`` keep-alive connections; any failure raises."""
    path = "/v1/execute" if route == "execute" else "/runner" + lib.ASSET_1K
    failures: list[str] = []

    def one(count: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            for _ in range(count):
                if route == "execute":
                    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                else:
                    conn.request("GET", path)
                reply = conn.getresponse()
                data = reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"{route}: {reply.status} {data[:200]!r}")
        except Exception as exc:  # reported below, from the main thread
            failures.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(n // CONNECTIONS,)) for _ in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"requests failed: {failures[:2]}")


def count(app: str, route: str, n: int, nginx: lib.Nginx, tmp: Path) -> int:
    """Instructions of the worker of one gunicorn that served ``WARM + n`` requests."""
    cell = tmp / f"{app}-{route}-{n}"
    cell.mkdir()
    (cell / "prom").mkdir()
    config = cell / "runner.yaml"
    config.write_text(bench.runner_yaml(nginx))
    port = lib.free_port()
    env = {**os.environ, "BENCH_UPSTREAM": nginx.url("a"), "BENCH_RUNNER_CONFIG": str(config),
           "PROMETHEUS_MULTIPROC_DIR": str(cell / "prom"), "PYTHONPATH": str(lib.REPO),
           "PYTHONHASHSEED": "0"}
    args = ["valgrind", "--tool=callgrind", "--trace-children=yes",
            f"--callgrind-out-file={cell}/callgrind.%p", sys.executable, "-m", "gunicorn",
            *_args(port), f"bench.apps:{app}"]
    with open(cell / "gunicorn.log", "wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=lib.REPO)
        try:
            lib.wait_port(port, 300)
            _load(port, route, bench.execute_body(), WARM)
            _load(port, route, bench.execute_body(), n)
        finally:
            lib.stop(proc, signal.SIGTERM, wait=300)
    # One file per process, the master's and the worker's: the worker by the pid gunicorn
    # logged (not the higher pid: pids wrap around), and only one worker ever (none restarted).
    booted = (cell / "gunicorn.log").read_text(errors="replace")
    workers = re.findall(r"Booting worker with pid: (\d+)", booted)
    if len(workers) != 1:
        raise RuntimeError(f"{app} {route}: expected one worker, gunicorn booted {workers}: {cell}")
    data = (cell / f"callgrind.{workers[0]}").read_text(errors="replace")
    found = re.search(r"^(?:summary|totals): (\d+)", data, re.M)
    if found is None:
        raise RuntimeError(f"no instruction count in {cell}/callgrind.{workers[0]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="N: servers of N and 3N requests")
    parser.add_argument("--routes", default="asset,execute", help="comma-separated (default both)")
    parser.add_argument("--jobs", type=int, default=2, help="valgrind runs at once (default 2)")
    args = parser.parse_args(argv)
    routes = args.routes.split(",")
    n = args.requests - args.requests % CONNECTIONS
    tmp = Path(tempfile.mkdtemp(prefix="runner-mw-server-instructions-"))
    tmp.chmod(0o755)  # nginx's workers read the asset files below it
    nginx = lib.Nginx(tmp)
    nginx.start()
    try:
        cells = [(app, route, k) for app in TARGETS.values() for route in routes for k in (n, 3 * n)]
        with ThreadPoolExecutor(args.jobs) as pool:
            counted = pool.map(lambda c: count(c[0], c[1], c[2], nginx, tmp), cells)
            totals = dict(zip(cells, counted, strict=True))
    finally:
        nginx.stop()
    per = {(app, route): (totals[(app, route, 3 * n)] - totals[(app, route, n)]) / (2 * n)
           for app in TARGETS.values() for route in routes}
    print("| route | target | worker instructions/request | beyond gunicorn's own | x werkzeug |")
    print("|---|---|---:|---:|---:|")
    for route in routes:
        ref, server = per[("werkzeug_proxy", route)], per[("bare", route)]
        for name, app in TARGETS.items():
            cost = per[(app, route)]
            beyond = (cost - server) / 1000
            print(f"| {route} | {name} | {cost / 1000:.0f}k | {beyond:.0f}k | {ref / cost:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
