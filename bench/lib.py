"""Process plumbing of the benchmark: nginx stand-in, gunicorn targets, wrk, RSS probes.

Everything listens on 127.0.0.1 on free ports, lives in one temporary folder and
is stopped by PID when the run ends (also on Ctrl-C or an error).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
NGINX = os.environ.get("BENCH_NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"
WRK = os.environ.get("BENCH_WRK") or shutil.which("wrk") or "/usr/bin/wrk"
PYTHON = sys.executable

EXT = "com.example.bench"
HASH = "sha256:" + "ab" * 32
ASSET_1K = f"/ext-ui/{EXT}/{HASH}/asset-1k.js"
ASSET_BIG = f"/ext-ui/{EXT}/{HASH}/big-256m.js"
BIG_BYTES = 256 * 1024 * 1024
EXECUTE_REPLY = '{"status":200,"headers":{},"body_b64":"aGk=","error":null}'

# The gunicorn settings every Python target runs under (identical for all).
GUNICORN_WORKERS = 2
GUNICORN_THREADS = 4
GUNICORN_ARGS = ["-k", "gthread", "--workers", str(GUNICORN_WORKERS), "--threads", str(GUNICORN_THREADS),
                 "--keep-alive", "5", "--backlog", "512", "--timeout", "120", "--graceful-timeout", "5",
                 "--log-level", "warning"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        con.request("GET", path)
        resp = con.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        con.close()


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
    """Stop one child we started, by its PID (SIGKILL if it does not go in time)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


# --------------------------------------------------------------------------- nginx


NGINX_CONF = """\
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  types {{ application/javascript js; text/html html; application/json json; }}
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 75s;
  keepalive_requests 1000000;
  server_tokens off;
{runners}
  upstream bench_runner {{ server 127.0.0.1:{port_a}; keepalive 64; }}
  # (d) nginx as a reverse proxy in front of the stand-in runner (keep-alive upstream).
  server {{
    listen 127.0.0.1:{port_proxy};
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_max_temp_file_size 0;
    proxy_buffer_size 64k;
    proxy_buffers 16 64k;
    location /runner/ {{ proxy_pass http://bench_runner/; }}
    location = /v1/execute {{ proxy_pass http://bench_runner; }}
  }}
}}
"""

RUNNER_SERVER = """\
  # stand-in runner "{name}"
  server {{
    listen 127.0.0.1:{port};
    root {tmp}/www;
    location = /v1/execute {{
      default_type application/json;
      add_header Cache-Control "public, max-age=31536000, immutable";
      add_header X-Bench-Backend {name};
      return 200 '{reply}';
    }}
    location /ext-ui/ {{
      add_header Cache-Control "public, max-age=31536000, immutable";
      add_header X-Content-Type-Options nosniff;
      add_header X-Bench-Backend {name};
    }}
    location = /healthz {{ default_type application/json; return 200 '{{"cache_writable":true}}'; }}
    location = /nginx_status {{ stub_status; }}
  }}
"""


@dataclass
class Nginx:
    """nginx as a fast stand-in runner (two server blocks: backends "a" and "b") and as a proxy."""

    tmp: Path
    port_a: int = field(default_factory=free_port)
    port_b: int = field(default_factory=free_port)
    port_proxy: int = field(default_factory=free_port)
    workers: int = 1
    proc: subprocess.Popen[bytes] | None = None

    def write_files(self) -> None:
        # nginx started as root serves as "nobody": the files must be readable by others.
        self.tmp.chmod(0o755)
        root = self.tmp / "www" / ASSET_1K.strip("/").rsplit("/", 1)[0]
        root.mkdir(parents=True, exist_ok=True)
        (self.tmp / "www" / ASSET_1K.lstrip("/")).write_bytes(b"/* 1 KB asset */" + b"x" * 1007 + b"\n")
        big = self.tmp / "www" / ASSET_BIG.lstrip("/")
        with open(big, "wb") as f:
            block = (b"0123456789abcdef" * 4096)  # 64 KiB of non-zero bytes: no sparse file tricks
            for _ in range(BIG_BYTES // len(block)):
                f.write(block)
        runners = "".join(RUNNER_SERVER.format(name=n, port=p, tmp=self.tmp, reply=EXECUTE_REPLY)
                          for n, p in (("a", self.port_a), ("b", self.port_b)))
        conf = NGINX_CONF.format(workers=self.workers, tmp=self.tmp, runners=runners, port_a=self.port_a,
                                 port_proxy=self.port_proxy)
        (self.tmp / "nginx.conf").write_text(conf)

    def start(self) -> None:
        self.write_files()
        log = open(self.tmp / "nginx-stderr.log", "wb")  # noqa: SIM115 - lives as long as nginx
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.tmp), "-c", str(self.tmp / "nginx.conf"), "-g", "daemon off;"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        for port in (self.port_a, self.port_b, self.port_proxy):
            wait_port(port)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGTERM)

    def url(self, which: str = "a") -> str:
        return f"http://127.0.0.1:{self.port_a if which == 'a' else self.port_b}"

    def accepts(self, which: str = "a") -> tuple[int, int]:
        """(connections accepted, requests handled) so far by the whole nginx (stub_status)."""
        port = self.port_a if which == "a" else self.port_b
        _, _, body = http_get(port, "/nginx_status")
        nums = body.decode().split("\n")[2].split()
        return int(nums[0]), int(nums[2])


# --------------------------------------------------------------------------- gunicorn


@dataclass
class Gunicorn:
    """One gunicorn master serving ``bench.apps:<app>`` with ``GUNICORN_ARGS``."""

    name: str
    app: str
    tmp: Path
    env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    #: The tree runner_mw is imported from (another checkout, for a side-by-side comparison).
    code: Path = REPO
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # gunicorn puts its --chdir first on sys.path: runner_mw comes from ``code``, bench from REPO.
        path = [str(self.code), str(REPO), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, **self.env, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
        args = [PYTHON, "-m", "gunicorn", *GUNICORN_ARGS, *self.extra_args,
                "--bind", f"127.0.0.1:{self.port}", "--chdir", str(self.code),
                "--pid", str(self.tmp / f"gunicorn-{self.name}.pid"), f"bench.apps:{self.app}"]
        log = open(self.tmp / f"gunicorn-{self.name}.log", "wb")  # noqa: SIM115 - lives as long as gunicorn
        self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.code)

    def wait_ready(self, path: str = "/ready", timeout: float = 30.0) -> None:
        wait_port(self.port, timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn {self.name} exited; see {self.tmp}/gunicorn-{self.name}.log")
            if len(self.workers()) == GUNICORN_WORKERS:
                with contextlib.suppress(OSError):
                    if http_get(self.port, path)[0] < 500:
                        time.sleep(0.5)  # let the second worker finish importing too
                        return
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn {self.name} not ready; see {self.tmp}/gunicorn-{self.name}.log")

    def workers(self) -> list[int]:
        if self.proc is None:
            return []
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGTERM, wait=15)


# --------------------------------------------------------------------------- wrk


def wrk(url: str, seconds: float, *, connections: int, threads: int = 1, method: str = "GET",
        body_file: Path | None = None, cpus: str | None = None) -> dict[str, Any]:
    """One wrk run; returns the BENCH_RESULT numbers (+ rps, and ``errors`` summed)."""
    env = {**os.environ, "BENCH_METHOD": method, "BENCH_BODY_FILE": str(body_file or "")}
    cmd = [WRK, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
           "--timeout", "5s", "-s", str(BENCH / "wrk.lua"), url]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 30, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            res: dict[str, Any] = json.loads(line[len("BENCH_RESULT "):])
            res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
            res["errors"] = sum(v for k, v in res.items() if k.startswith("err_"))
            return res
    raise RuntimeError(f"wrk gave no result for {url}: {out.stdout[-500:]} {out.stderr[-500:]}")


# --------------------------------------------------------------------------- memory


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by these processes (0 for one that is gone)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, needs permission on the process)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def rss_sampler(pids: list[int], interval: float = 0.01) -> Iterator[dict[int, int]]:
    """Sample VmRSS of ``pids`` every ``interval`` s; yields {pid: peak kB seen}."""
    peaks = {p: status_kb(p, "VmRSS") for p in pids}
    halt = threading.Event()

    def run() -> None:
        while not halt.is_set():
            for p in pids:
                with contextlib.suppress(OSError):
                    peaks[p] = max(peaks[p], status_kb(p, "VmRSS"))
            halt.wait(interval)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield peaks
    finally:
        halt.set()
        t.join()
