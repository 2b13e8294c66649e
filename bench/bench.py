"""runner_mw benchmark: throughput, streaming, pass-through cost and reload under load.

Run it through ``bench/run`` (see ``bench/README.md``). Everything runs on
127.0.0.1 in one temporary folder; every process started here is stopped by PID
at the end, also after an error or Ctrl-C. Numbers that matter are ratios
measured side by side in the same run: the machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import lib
from bench.reload import reload_under_load

RUNNER_YAML = """\
version: 1
backend: {backend}
backends:
  a: {{kind: docker, url: "http://127.0.0.1:{port_a}", public_base: /runner}}
  b: {{kind: docker, url: "http://127.0.0.1:{port_b}", public_base: /runner}}
timeouts: {{connect_ms: 2000, read_ms: 30000}}
limits: {{max_body_bytes: 2097152}}
upstream: {{service_token: "bench-service-token-0123456789", pool_size: 16}}
access:
  networks: [127.0.0.1/32, "::1/128"]
  tokens: ["bench-bearer-token-0123456789abcdef"]
  trusted_proxies: []
metrics: {{enabled: {metrics}}}
logging: {{format: text, access_log: {access_log}}}
"""


def runner_yaml(nginx: lib.Nginx, *, backend: str = "a", metrics: bool = True,
                access_log: bool = True) -> str:
    return RUNNER_YAML.format(backend=backend, port_a=nginx.port_a, port_b=nginx.port_b,
                              metrics=str(metrics).lower(), access_log=str(access_log).lower())


def execute_body(size: int = 1024) -> bytes:
    """A valid execute envelope of exactly ``size`` bytes (padded in http.body_b64)."""
    env: dict[str, Any] = {
        "context": {"tenant_id": "tenant-1", "extension_id": lib.EXT, "content_hash": lib.HASH,
                    "install_id": "install-1", "config": {"greeting": "hello"}},
        "http": {"method": "POST", "path": "/api/echo", "query": {}, "headers": {"accept": "*/*"},
                 "body_b64": ""},
        "limits": {"timeout_ms": 5000},
    }
    base = len(json.dumps(env, separators=(",", ":")))
    env["http"]["body_b64"] = "A" * (size - base)
    data = json.dumps(env, separators=(",", ":")).encode()
    assert len(data) == size, len(data)
    return data


@dataclass
class Target:
    name: str
    port: int
    asset_path: str = "/runner" + lib.ASSET_1K
    execute_path: str = "/v1/execute"
    gunicorn: lib.Gunicorn | None = None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="runner-mw-bench-"))
        self.nginx = lib.Nginx(self.tmp, workers=args.nginx_workers)
        self.servers: list[lib.Gunicorn] = []
        self.body = self.tmp / "execute-1k.json"
        self.body.write_bytes(execute_body())
        self.results: dict[str, Any] = {}
        self.started = time.monotonic()
        self.load = (f"{os.getloadavg()[0]:.2f}",)

    # ------------------------------------------------------------------ helpers

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)

    def write_config(self, name: str, **kw: Any) -> Path:
        path = self.tmp / name
        path.write_text(runner_yaml(self.nginx, **kw))
        return path

    def gunicorn(self, name: str, app: str, env: dict[str, str] | None = None,
                 extra: list[str] | None = None, code: Path | None = None) -> lib.Gunicorn:
        g = lib.Gunicorn(name, app, self.tmp, env=env or {}, extra_args=extra or [], code=code or lib.REPO)
        self.servers.append(g)
        g.start()
        return g

    def runner_env(self, config: Path, prom_name: str) -> dict[str, str]:
        prom = self.tmp / f"prom-{prom_name}"
        prom.mkdir(exist_ok=True)
        # What the shipped gunicorn hooks do with several workers: multiprocess metrics.
        return {"BENCH_RUNNER_CONFIG": str(config), "PROMETHEUS_MULTIPROC_DIR": str(prom)}

    def wrk(self, url: str, seconds: float, *, post: bool = False) -> dict[str, Any]:
        return lib.wrk(url, seconds, connections=self.args.connections, threads=self.args.wrk_threads,
                       method="POST" if post else "GET", body_file=self.body if post else None,
                       cpus=self.args.wrk_cpu)

    def measured_wrk(self, url: str, server: lib.Gunicorn | None, *, post: bool = False) -> dict[str, Any]:
        """One measured wrk run (``--seconds``), plus the workers' CPU per request (``cpu_us``)
        and whether both workers took part (``balanced``) when ``server`` is gunicorn."""
        pids = server.workers() if server is not None else []
        cpu0 = [lib.cpu_seconds([p]) for p in pids]
        res = self.wrk(url, self.args.seconds, post=post)
        used = [lib.cpu_seconds([p]) - c for p, c in zip(pids, cpu0, strict=True)]
        if pids and res["requests"]:
            res["cpu_us"] = sum(used) / res["requests"] * 1e6
            # gunicorn does not balance keep-alive connections: now and then one worker
            # accepts all of wrk's, the other idles, and req/s halves.
            res["balanced"] = min(used) >= BALANCED_SHARE * sum(used)
        return res

    def close(self) -> None:
        for g in self.servers:
            g.stop()
        self.nginx.stop()
        if not self.args.keep_tmp:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ 1. throughput

    def targets(self) -> list[Target]:
        up = {"BENCH_UPSTREAM": self.nginx.url("a")}
        specs: list[tuple[str, str, dict[str, str]]] = [
            ("bare WSGI (ceiling)", "bare", {}),
            (WERKZEUG, "werkzeug_proxy", up),
            ("Python floor (forwards, checks nothing)", "floor_proxy", up),
            ("runner_mw", "runner_mw", self.runner_env(self.write_config("runner.yaml"), "main")),
        ]
        if not self.args.quick:
            specs += [
                ("runner_mw, metrics off", "runner_mw",
                 self.runner_env(self.write_config("runner-nometrics.yaml", metrics=False), "nometrics")),
                ("runner_mw, metrics+access log off", "runner_mw",
                 self.runner_env(self.write_config("runner-quiet.yaml", metrics=False, access_log=False),
                                 "quiet")),
            ]
        codes: list[Path | None] = [None] * len(specs)
        if self.args.compare:
            specs.append((f"runner_mw @ {self.args.compare.name}", "runner_mw",
                          self.runner_env(self.tmp / "runner.yaml", "compare")))
            codes.append(self.args.compare)
        out = []
        for i, ((label, app, env), code) in enumerate(zip(specs, codes, strict=True)):
            out.append(Target(label, 0, gunicorn=self.gunicorn(f"t{i}", app, env, code=code)))
        for t in out:
            assert t.gunicorn is not None
            t.gunicorn.wait_ready()
            t.port = t.gunicorn.port
        out.append(Target("nginx reverse proxy", self.nginx.port_proxy))
        out.append(Target("direct to upstream (nginx)", self.nginx.port_a, asset_path=lib.ASSET_1K))
        return out

    def check_target(self, t: Target) -> None:
        import http.client

        status, _, body = lib.http_get(t.port, t.asset_path)
        if status != 200 or len(body) != 1024:
            raise RuntimeError(f"{t.name}: GET {t.asset_path} -> {status}, {len(body)} bytes")
        con = http.client.HTTPConnection("127.0.0.1", t.port, timeout=5)
        con.request("POST", t.execute_path, body=self.body.read_bytes(),
                    headers={"Content-Type": "application/json"})
        resp = con.getresponse()
        data = resp.read()
        con.close()
        if resp.status != 200 or json.loads(data).get("status") != 200:
            raise RuntimeError(f"{t.name}: POST {t.execute_path} -> {resp.status} {data[:200]!r}")

    def throughput(self) -> None:
        a = self.args
        targets = self.targets()
        for t in targets:
            self.check_target(t)
        self.say(f"throughput: {len(targets)} targets x 2 routes, {a.rounds} round(s) of {a.seconds}s each")
        for t in targets:  # warm-up (pools, imports, caches)
            self.wrk(f"http://127.0.0.1:{t.port}{t.asset_path}", a.warmup)
            self.wrk(f"http://127.0.0.1:{t.port}{t.execute_path}", a.warmup, post=True)
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        conns: dict[tuple[str, str], tuple[int, int]] = {}
        routes = (("asset", False), ("execute", True))
        for r in range(a.rounds):
            # A route's cells of a round run back to back, the order rotating between rounds:
            # each target's ratio to werkzeug is taken within a round (seconds apart), where
            # this shared machine's speed has changed least (it drifts by 1.5x over tens of
            # seconds, visible even in a direct connection to nginx).
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for route, post in routes:
                for t in order:
                    path = t.execute_path if post else t.asset_path
                    before = self.nginx.accepts()
                    res = self.measured_wrk(f"http://127.0.0.1:{t.port}{path}", t.gunicorn, post=post)
                    after = self.nginx.accepts()
                    runs.setdefault((t.name, route), []).append(res)
                    acc, req = conns.get((t.name, route), (0, 0))
                    conns[(t.name, route)] = (acc + after[0] - before[0] - 1, req + after[1] - before[1] - 1)
            self.say(f"throughput round {r + 1}/{a.rounds} done")
        table = []
        for t in targets:
            for route, _ in routes:
                every = runs[(t.name, route)]
                rs = _balanced(every)
                acc, req = conns[(t.name, route)]
                ref = runs[(WERKZEUG, route)]
                pairs = _paired(every, ref)
                table.append({
                    "target": t.name, "route": route,
                    "rps": statistics.median(x["rps"] for x in rs),
                    "p50_ms": statistics.median(x["p50_us"] for x in rs) / 1000,
                    "p99_ms": statistics.median(x["p99_us"] for x in rs) / 1000,
                    "errors": sum(x["errors"] for x in rs),
                    "upstream_conns": acc, "upstream_reqs": req,
                    "rounds_rps": [round(x["rps"]) for x in every],
                    "rounds_used": f"{len(rs)}/{len(every)}",
                    "rounds_paired": len(pairs),
                    # Worker CPU per request: far steadier than req/s on a shared machine,
                    # since time the CPUs spend elsewhere is not in it.
                    "cpu_us": _median_or_none([x["cpu_us"] for x in rs if "cpu_us" in x]),
                    # Paired: the median of the rounds' own ratios (target / werkzeug, same round).
                    "rounds_x_werkzeug": [round(x["rps"] / w["rps"], 3) for x, w in pairs],
                    "x_werkzeug": _median_or_none([x["rps"] / w["rps"] for x, w in pairs]),
                    "cpu_x_werkzeug": _median_or_none([w["cpu_us"] / x["cpu_us"] for x, w in pairs
                                                       if x.get("cpu_us") and "cpu_us" in w]),
                })
        self.results["throughput"] = table
        for t in targets:
            if t.gunicorn is not None:
                t.gunicorn.stop()
        self.servers = [g for g in self.servers if g.proc is not None and g.proc.poll() is None]

    # ------------------------------------------------------------------ 2. streaming

    def streaming(self) -> None:
        up = {"BENCH_UPSTREAM": self.nginx.url("a")}
        wz = self.gunicorn("s-werkzeug", "werkzeug_proxy", up)
        mw = self.gunicorn("s-runner_mw", "runner_mw",
                           self.runner_env(self.write_config("runner-stream.yaml"), "stream"))
        cases: list[tuple[str, int, str, lib.Gunicorn | None]] = [
            ("direct to upstream (nginx)", self.nginx.port_a, lib.ASSET_BIG, None),
            ("nginx reverse proxy", self.nginx.port_proxy, "/runner" + lib.ASSET_BIG, None),
            ("werkzeug ProxyMiddleware", wz.port, "/runner" + lib.ASSET_BIG, wz),
            ("runner_mw", mw.port, "/runner" + lib.ASSET_BIG, mw),
        ]
        if self.args.compare:
            env = self.runner_env(self.tmp / "runner-stream.yaml", "stream-compare")
            cmp = self.gunicorn("s-compare", "runner_mw", env, code=self.args.compare)
            cases.append((f"runner_mw @ {self.args.compare.name}", cmp.port, "/runner" + lib.ASSET_BIG, cmp))
        for case in cases:
            if case[3] is not None:
                case[3].wait_ready()
        self.say(f"streaming: 256 MB x {self.args.stream_reps} through {len(cases)} paths")
        rows: list[dict[str, Any]] = []
        for label, port, path, g in cases:
            walls, growth = [], 0
            for _ in range(self.args.stream_reps):
                pids = g.workers() if g else []
                base = {p: lib.status_kb(p, "VmRSS") for p in pids}
                for p in pids:
                    lib.reset_peak(p)
                with lib.rss_sampler(pids) as peaks:
                    t0 = time.perf_counter()
                    out = subprocess.run(
                        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                         f"http://127.0.0.1:{port}{path}"],
                        capture_output=True, text=True, timeout=120, check=False)
                    walls.append(time.perf_counter() - t0)
                code, size = out.stdout.split()
                if code != "200" or int(size) != lib.BIG_BYTES:
                    raise RuntimeError(f"streaming {label}: HTTP {code}, {size} bytes ({out.stderr})")
                for p in pids:
                    hwm = lib.status_kb(p, "VmHWM")
                    growth = max(growth, max(hwm, peaks[p]) - base[p])
            rows.append({"target": label, "wall_s": min(walls),
                         "rss_growth_mb": growth / 1024 if g else None})
        direct = rows[0]["wall_s"]
        for row in rows:
            row["x_direct"] = row["wall_s"] / direct
            row["mb_s"] = lib.BIG_BYTES / 2**20 / row["wall_s"]
        self.results["streaming"] = rows
        for case in cases:
            if case[3] is not None:
                case[3].stop()

    # ------------------------------------------------------------------ 3. pass-through

    def passthrough(self) -> None:
        self.say("pass-through: in-process timeit, then Flask hello bare vs wrapped under gunicorn")
        cfg = self.write_config("runner-pass.yaml")
        env = {**os.environ, "PYTHONPATH": str(lib.REPO)}
        number = 100_000 if self.args.quick else 200_000
        repeat = 7 if self.args.quick else 15
        out = subprocess.run([lib.PYTHON, "-m", "bench.passthrough", str(cfg), "--number", str(number),
                              "--repeat", str(repeat)], env=env, cwd=lib.REPO, capture_output=True,
                             text=True, timeout=180, check=True)
        inproc = json.loads(out.stdout.strip().splitlines()[-1])
        bare = self.gunicorn("p-flask", "flask_bare")
        wrapped = self.gunicorn("p-flask-mw", "flask_wrapped",
                                self.runner_env(self.write_config("runner-flask.yaml"), "flask"))
        bare.wait_ready("/hello")
        wrapped.wait_ready("/hello")
        for g in (bare, wrapped):
            self.wrk(f"http://127.0.0.1:{g.port}/hello", self.args.warmup)
        runs: dict[str, list[dict[str, Any]]] = {"bare": [], "wrapped": []}
        for r in range(self.args.rounds):
            pair = [("bare", bare), ("wrapped", wrapped)]
            for name, g in pair if r % 2 == 0 else reversed(pair):
                runs[name].append(self.measured_wrk(f"http://127.0.0.1:{g.port}/hello", g))
        med = {name: statistics.median(x["rps"] for x in _balanced(every)) for name, every in runs.items()}
        # Worker CPU per request, over every round: it does not depend on how gunicorn happened
        # to spread wrk's connections over its two workers, which moves req/s by up to 2x.
        cpu = {name: _median_or_none([x["cpu_us"] for x in every if "cpu_us" in x])
               for name, every in runs.items()}
        self.results["passthrough"] = {
            **inproc,
            "flask_bare_rps": med["bare"],
            "flask_wrapped_rps": med["wrapped"],
            "flask_ratio": med["wrapped"] / med["bare"],
            "flask_bare_cpu_us": cpu["bare"],
            "flask_wrapped_cpu_us": cpu["wrapped"],
            "flask_cpu_ratio": (cpu["bare"] / cpu["wrapped"]) if cpu["bare"] and cpu["wrapped"] else None,
            "rounds": {name: [round(x["rps"]) for x in every] for name, every in runs.items()},
            "rounds_used": {name: f"{len(_balanced(every))}/{len(every)}" for name, every in runs.items()},
        }
        bare.stop()
        wrapped.stop()

    # ------------------------------------------------------------------ 4. reload

    def reload(self) -> None:
        self.results["reload"] = reload_under_load(self)

    # ------------------------------------------------------------------ report

    def report(self) -> str:
        lines = []
        a = self.args
        lines.append(f"# runner_mw benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
        lines.append("")
        lines.append(f"- machine: {machine()}")
        lines.append(f"- load average (1 min) at start / end: {self.load[0]} / {os.getloadavg()[0]:.2f} "
                     f"(other work on the machine competes for the same {os.cpu_count()} CPUs)")
        lines.append(f"- gunicorn: {' '.join(lib.GUNICORN_ARGS)}; wrk -t{a.wrk_threads} -c{a.connections}, "
                     f"{a.rounds} round(s) x {a.seconds}s per cell (median; x werkzeug: the median of "
                     f"each round's own ratio), "
                     f"wrk CPU pin: {a.wrk_cpu or 'none'}; "
                     f"nginx worker_processes {a.nginx_workers}")
        lines.append("")
        if "throughput" in self.results:
            lines.append("| target | route | req/s | p50 ms | p99 ms | x werkzeug | worker CPU us/req "
                         "| CPU x werkzeug | rounds | errors | upstream conns / reqs |")
            lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
            for row in self.results["throughput"]:
                cpu = "-" if row["cpu_us"] is None else f"{row['cpu_us']:.0f}"
                cpu_x = "-" if row["cpu_x_werkzeug"] is None else f"{row['cpu_x_werkzeug']:.2f}"
                ratio = "-" if row["x_werkzeug"] is None else f"{row['x_werkzeug']:.2f}"
                lines.append(
                    f"| {row['target']} | {row['route']} | {row['rps']:.0f} | {row['p50_ms']:.2f} | "
                    f"{row['p99_ms']:.2f} | {ratio} | {cpu} | {cpu_x} | "
                    f"{row['rounds_used']} ({row['rounds_paired']} paired) | {row['errors']} | "
                    f"{row['upstream_conns']} / {row['upstream_reqs']} |")
            lines.append("")
        if "streaming" in self.results:
            lines.append("| 256 MB asset via | wall s | x direct | MB/s | worker peak RSS growth MB |")
            lines.append("|---|---:|---:|---:|---:|")
            for row in self.results["streaming"]:
                rss = "-" if row["rss_growth_mb"] is None else f"{row['rss_growth_mb']:.1f}"
                lines.append(f"| {row['target']} | {row['wall_s']:.2f} | {row['x_direct']:.2f} | "
                             f"{row['mb_s']:.0f} | {rss} |")
            lines.append("")
        if "passthrough" in self.results:
            p = self.results["passthrough"]
            lines.append(f"- pass-through in-process: app {p['bare_ns']:.0f} ns, "
                         f"wrapped {p['wrapped_ns']:.0f} ns,"
                         f" added {p['added_ns']:.0f} ns (min of {p['repeat']} x {p['number']} calls)")
            lines.append(f"- pass-through under gunicorn, Flask hello: bare {p['flask_bare_rps']:.0f} req/s, "
                         f"wrapped {p['flask_wrapped_rps']:.0f} req/s, ratio {p['flask_ratio']:.3f} "
                         f"(medians of the rounds both workers took part in: bare "
                         f"{p['rounds_used']['bare']}, wrapped {p['rounds_used']['wrapped']})")
            if p["flask_cpu_ratio"] is not None:
                lines.append(f"- pass-through under gunicorn, worker CPU per request: bare "
                             f"{p['flask_bare_cpu_us']:.0f} us, wrapped {p['flask_wrapped_cpu_us']:.0f} us, "
                             f"ratio {p['flask_cpu_ratio']:.3f} (median of every round)")
            lines.append("")
        if "reload" in self.results:
            r = self.results["reload"]
            if r.get("skipped"):
                lines.append(f"- reload under load: SKIPPED: {r['skipped']}")
            else:
                lines.append(
                    f"- reload under load: {r['hups']} HUPs in {r['seconds']:.0f}s, failed requests "
                    f"{r['failed']} (of {r['requests']}), p99 before {r['p99_before_ms']:.2f} ms, during "
                    f"{r['p99_during_ms']:.2f} ms (x{r['p99_ratio']:.2f}); switch time HUP -> every worker "
                    f"on the new backend: median {fmt_s(r['switch_median_s'])}, max "
                    f"{fmt_s(r['switch_max_s'])} (spaced HUPs); {r['windows_switched']}/{r['hups']} "
                    f"0.5 s windows fully switched; worker PIDs unchanged: {r['same_pids']}")
            lines.append("")
        return "\n".join(lines)


def fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nginx = subprocess.run([lib.NGINX, "-v"], capture_output=True, text=True, check=False).stderr.strip()
    import gunicorn

    wrk = subprocess.run([lib.WRK, "-v"], capture_output=True, text=True, check=False).stdout.split()
    return (f"{os.cpu_count()} CPUs, {cpu}; Linux {platform.release()}; Python {platform.python_version()}; "
            f"gunicorn {gunicorn.__version__}; {nginx.replace('nginx version: ', '')}; "
            f"wrk {wrk[1] if len(wrk) > 1 else '?'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description="runner_mw benchmark (loopback only).")
    p.add_argument("--quick", action="store_true", help="about 2 minutes: 1 round, short runs, fewer rows")
    p.add_argument("--only", default="throughput,streaming,passthrough,reload",
                   help="comma-separated parts to run (default: all)")
    p.add_argument("--seconds", type=float, help="wrk duration of one measured cell (default 3)")
    p.add_argument("--rounds", type=int, help="interleaved rounds, median reported (default 5, quick 1)")
    p.add_argument("--warmup", type=float, help="wrk warm-up per target and route (default 2, quick 1)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--wrk-cpu", default=None, help="pin wrk with taskset to this CPU list (default: no pin)")
    p.add_argument("--nginx-workers", type=int, default=1, help="nginx worker_processes (default 1)")
    p.add_argument("--stream-reps", type=int, help="256 MB downloads per path, min reported (default 2)")
    p.add_argument("--reload-seconds", type=float, help="HUP every 0.5 s this long (default 20, quick 10)")
    p.add_argument("--compare", type=Path, metavar="TREE",
                   help="add runner_mw imported from another source tree (e.g. a patched copy) as a "
                        "target of the throughput and streaming parts")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    p.add_argument("--max-seconds", type=int, default=900, help="abort the run after this (default 900)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder (configs, logs)")
    a = p.parse_args(argv)
    q = a.quick
    a.seconds = a.seconds or 3.0
    a.rounds = a.rounds or (1 if q else 5)
    a.warmup = a.warmup or (1.0 if q else 2.0)
    a.stream_reps = a.stream_reps or (1 if q else 2)
    a.reload_seconds = a.reload_seconds or (10.0 if q else 20.0)
    return a


WERKZEUG = "werkzeug ProxyMiddleware"  # the reference of every ratio

# A round counts when each gunicorn worker did at least this share of the CPU work.
BALANCED_SHARE = 0.2


def _balanced(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounds in which both gunicorn workers worked (all of them if none did): a round
    where one worker had every connection measures half a server."""
    return [x for x in runs if x.get("balanced", True)] or runs


Cell = dict[str, Any]


def _paired(runs: list[Cell], ref: list[Cell]) -> list[tuple[Cell, Cell]]:
    """(target, werkzeug) cells of the same round, where both servers' workers took part
    (every round if there is no such one)."""
    pairs = [(x, w) for x, w in zip(runs, ref, strict=True) if w["rps"] > 0]  # (a round wrk got none)
    return [(x, w) for x, w in pairs if x.get("balanced", True) and w.get("balanced", True)] or pairs


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"bench/run exceeded --max-seconds={args.max_seconds}")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(143))
    signal.alarm(args.max_seconds)
    bench = Bench(args)
    steps: dict[str, Callable[[], None]] = {"throughput": bench.throughput, "streaming": bench.streaming,
                                            "passthrough": bench.passthrough, "reload": bench.reload}
    try:
        bench.nginx.start()
        bench.say(f"nginx stand-in on :{bench.nginx.port_a} / :{bench.nginx.port_b}, "
                  f"proxy :{bench.nginx.port_proxy}; temp {bench.tmp}")
        for part in parts:
            steps[part]()
    finally:
        signal.alarm(0)
        bench.close()
    report = bench.report()
    print(report)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "machine": machine(), **bench.results}, indent=2))
    bench.say("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
