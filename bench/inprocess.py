"""In-process cost per request: werkzeug's ProxyMiddleware vs runner_mw, no WSGI server.

``python -m bench.inprocess [--threads 1,4] [--requests 1500] [--rounds 3] [--runner memory]``

Each target is called as ``app(environ, start_response)`` against nginx as the runner
(the same stand-in as ``bench/run``), from 1 thread and from 4 at once (the contention a
gthread worker's threads see: every syscall that releases the GIL is a hand-off). The
figure is the process's CPU time per request (``time.process_time``), the minimum of
the rounds: nginx's work is not in it, and neither is time the CPUs spent elsewhere.
Use it to see what a change to the hot path costs or saves, beside ``bench/run``.
``--runner memory`` replays nginx's recorded replies from memory (``bench.memory``): no
syscall at all, each proxy's own Python alone.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import bench, lib, memory


def environ(route: str, body: bytes) -> dict[str, Any]:
    env: dict[str, Any] = {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr, "HTTP_HOST": "127.0.0.1:8000", "HTTP_USER_AGENT": "bench",
        "QUERY_STRING": "", "wsgi.input": io.BytesIO(b""),
    }
    if route == "asset":
        path = "/runner" + lib.ASSET_1K
        env.update(PATH_INFO=path, RAW_URI=path)
    else:
        env.update(REQUEST_METHOD="POST", PATH_INFO="/v1/execute", RAW_URI="/v1/execute",
                   CONTENT_TYPE="application/json", CONTENT_LENGTH=str(len(body)))
        env["wsgi.input"] = io.BytesIO(body)
    return env


def call(app: Callable[..., Any], route: str, body: bytes) -> None:
    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if not status.startswith("200"):
            raise RuntimeError(f"{route}: {status}")
        return None

    result = app(environ(route, body), start_response)
    try:
        for _ in result:
            pass
    finally:
        if hasattr(result, "close"):
            result.close()


def cpu_per_request(app: Callable[..., Any], route: str, body: bytes, threads: int,
                    requests: int) -> tuple[float, float]:
    """CPU microseconds and context switches per request (a switch is mostly a GIL hand-off
    between the threads: it counts where CPU time is too noisy to show a change)."""
    def work() -> None:
        for _ in range(requests):
            call(app, route, body)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.process_time()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    cpu = time.process_time() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    switches = (after.ru_nvcsw - before.ru_nvcsw) + (after.ru_nivcsw - before.ru_nivcsw)
    n = threads * requests
    return cpu / n * 1e6, switches / n


TARGETS = ("werkzeug ProxyMiddleware", "Python floor (forwards, checks nothing)", "runner_mw",
           "runner_mw, metrics off", "runner_mw, metrics+access log off")


def build(name: str, nginx: Any, tmp: Path) -> Callable[..., Any]:
    """One of ``TARGETS`` as a WSGI app, against ``nginx`` as the runner (``BENCH_UPSTREAM``
    must name it before the werkzeug target is built)."""
    from bench import apps
    from runner_mw import RunnerMiddleware

    if name == "werkzeug ProxyMiddleware":
        return apps.werkzeug_proxy  # type: ignore[no-any-return]
    if name.startswith("Python floor"):
        return apps.floor_proxy  # type: ignore[no-any-return]
    kw = {"runner_mw": {}, "runner_mw, metrics off": {"metrics": False},
          "runner_mw, metrics+access log off": {"metrics": False, "access_log": False}}[name]
    path = tmp / f"{len(kw)}.yaml"
    path.write_text(bench.runner_yaml(nginx, **kw))
    return RunnerMiddleware(apps._fallback, str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,4", help="thread counts to run (default 1,4)")
    parser.add_argument("--requests", type=int, default=1500, help="requests per thread and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per cell; the minimum is shown")
    parser.add_argument("--runner", choices=("nginx", "memory"), default="nginx",
                        help="nginx over loopback (default), or its replies replayed from memory")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="runner-mw-inprocess-"))
    prom = tmp / "prom"
    prom.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom)  # as the shipped gunicorn hooks set it
    nginx = lib.Nginx(tmp)
    nginx.start()
    real_stderr = sys.stderr
    stack = contextlib.ExitStack()  # the memory runner, when asked for
    try:
        os.environ["BENCH_UPSTREAM"] = nginx.url("a")
        # The access log goes to a stderr handler, as under gunicorn; here to /dev/null.
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - restored in finally
        targets = {name: build(name, nginx, tmp) for name in TARGETS}
        body = bench.execute_body()
        replay = (memory.replaying(memory.record(nginx, body)) if args.runner == "memory"
                  else contextlib.nullcontext())
        stack.enter_context(replay)
        rows = []
        for threads in (int(t) for t in args.threads.split(",")):
            for route in ("asset", "execute"):
                best = dict.fromkeys(targets, (float("inf"), float("inf")))
                for _ in range(args.rounds):  # interleaved: drift hits every target alike
                    for name, app in targets.items():
                        cpu_per_request(app, route, body, 1, 100)  # warm
                        us, sw = cpu_per_request(app, route, body, threads, args.requests)
                        best[name] = (min(best[name][0], us), min(best[name][1], sw))
                ref = best["werkzeug ProxyMiddleware"][0]
                rows += [(threads, route, name, us, ref / us, sw) for name, (us, sw) in best.items()]
        print("| threads | route | target | CPU us/request | x werkzeug | switches/request |",
              file=sys.__stdout__)
        print("|---:|---|---|---:|---:|---:|", file=sys.__stdout__)
        for threads, route, name, us, ratio, sw in rows:
            print(f"| {threads} | {route} | {name} | {us:.0f} | {ratio:.2f} | {sw:.1f} |",
                  file=sys.__stdout__)
    finally:
        stack.close()
        sys.stderr = real_stderr
        nginx.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
