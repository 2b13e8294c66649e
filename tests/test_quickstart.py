"""The README's quick start works as written: the demo command starts, serves, and stops cleanly.

The command is read from README.md's "Quick start" code block (so this test breaks when the
README changes) and run in its own process group with free ports, using the venv this suite
runs in (RUNNER_MW_VENV: ``scripts/dev.py`` finds every requirement there and installs
nothing). It must print the URL once both servers answer, serve the host page, an extension
asset through /runner and /v1/execute, stop on SIGINT and on SIGTERM with status 0 leaving
both ports free (so it can run again at once), and refuse clearly a port that is taken.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import importlib.util
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin

import pytest
import requests
from requires import missing

from runner_mw.devrunner import SAMPLE_CONTENT_HASH, SAMPLE_EXTENSION_ID

ROOT = Path(__file__).resolve().parent.parent
START_S = 120.0  # generous: a busy 2-core machine (the URL shows in ~3 s when idle)
STOP_S = 60.0
T = 10.0
URL_LINE = re.compile(r"runner_mw demo: open (http://\S+/)")


def readme_command(name: str) -> list[str]:
    """The command of the README's Quick start block that runs ``scripts/dev.py <name>``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.M | re.S)
    assert section, "README.md has no '## Quick start' section"
    block = re.search(r"^```(?:sh|bash|console)?\n(.*?)^```", section[1], re.M | re.S)
    assert block, "README.md's Quick start has no code block"
    lines = [line for line in block[1].splitlines() if f"scripts/dev.py {name}" in line]
    assert len(lines) == 1, f"expected one 'scripts/dev.py {name}' line in the Quick start: {lines}"
    return shlex.split(lines[0], comments=True)


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid``, from /proc (an empty set where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie is not: without a reaping init, an orphan's zombie can linger)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - reused by another user's process
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Nothing listens there, and a server could bind it right now (as servers do: SO_REUSEADDR)."""
    with socket.socket() as probe:
        probe.settimeout(2)
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def unmet_requirements() -> list[str]:
    """What scripts/dev.py's setup() would install into this venv (nothing, when it is ready)."""
    spec = importlib.util.spec_from_file_location("runner_mw_dev_script", ROOT / "scripts" / "dev.py")
    assert spec is not None and spec.loader is not None
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    stamp = Path(sys.prefix) / ".runner_mw-installed"
    if stamp.exists():  # made by dev.py: it reinstalls when setup.py changed since
        want = hashlib.sha256((ROOT / "setup.py").read_bytes()).hexdigest()
        return [] if stamp.read_text() == want else ["the install of the current setup.py"]
    unmet = []
    for requirement in dev.requirements() or ["(setup.py's requirements)"]:
        try:
            metadata.version(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])
        except metadata.PackageNotFoundError:
            unmet.append(requirement)
    return unmet


@pytest.fixture(scope="module")
def demo_env() -> Iterator[dict[str, str]]:
    if sys.prefix == sys.base_prefix:
        missing("the suite does not run in a venv: RUNNER_MW_VENV would have nothing to reuse")
    command = readme_command("demo")
    if shutil.which(command[0]) is None:
        missing(f"{command[0]} (the README's interpreter) is not on PATH")
    unmet = unmet_requirements()
    if unmet:
        missing(f"this venv lacks {', '.join(unmet)}: the demo would install it "
                    "(pip install -e .[test] first)")
    # Only what the demo reads from the environment is set: none of the runner's variables.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNNER_", "EXT_GATEWAY_"))}
    with tempfile.TemporaryDirectory(prefix="rmw-") as xdg:  # short: gunicorn's control socket
        env.update(RUNNER_MW_VENV=sys.prefix, XDG_RUNTIME_DIR=xdg)
        yield env


class Demo:
    """One run of the README's demo command, its output collected by a thread."""

    def __init__(self, env: dict[str, str], port: int, runner_port: int, log: IO[str]) -> None:
        self.port, self.runner_port, self.log = port, runner_port, log
        self.proc = subprocess.Popen(
            readme_command("demo"), cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
            env={**env, "RUNNER_MW_PORT": str(port), "RUNNER_MW_RUNNER_PORT": str(runner_port)},
            start_new_session=True,  # its own process group: killed as a whole in stop()
        )
        self.children: set[int] = set()
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return f"stdout:\n{''.join(self.stdout)}\nstderr (end):\n{self.log.read()[-6000:]}"

    def url(self) -> str:
        deadline = time.monotonic() + START_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no URL printed within {START_S:.0f} s\n{self.output()}")
            if line is None:
                self.proc.wait(T)
                pytest.fail(f"the demo exited ({self.proc.returncode}) without a URL\n{self.output()}")
            match = URL_LINE.search(line)
            if match:
                return match[1]

    def stop(self, sig: signal.Signals) -> int:
        """Send ``sig`` to the demo command alone (as ``kill`` would) and wait for its exit."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not stop within {STOP_S:.0f} s of {sig.name}\n{self.output()}")

    def servers(self) -> set[int]:
        """Remember the processes the demo started (its servers run in sessions of their own)."""
        self.children = descendants(self.proc.pid)
        return self.children

    def all_gone(self) -> bool:
        """True once the demo and every process it started have exited."""
        return self.proc.poll() is not None and not any(alive(pid) for pid in self.children)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.children | descendants(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait()
        self.reader.join(T)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@contextlib.contextmanager
def demo(env: dict[str, str], port: int, runner_port: int, tmp: Path) -> Iterator[Demo]:
    with (tmp / f"demo-{port}-{time.monotonic_ns()}.log").open("w+") as log:
        run = Demo(env, port, runner_port, log)
        try:
            yield run
        finally:
            run.kill()


def check_serving(base: str) -> None:
    with requests.Session() as http:
        http.trust_env = False  # loopback: never through a proxy from the environment
        page = http.get(base, timeout=T)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        # Not frameable by another site (it could navigate the extension's iframe to its own page).
        assert page.headers["content-security-policy"] == "frame-ancestors 'self'"
        match = re.search(r'<iframe\b[^>]*\ssrc="([^"]+)"', page.text)
        assert match, page.text
        src = html.unescape(match[1])
        assert src.startswith("/runner/ext-ui/"), src  # same origin, through the middleware

        index = http.get(urljoin(base, src), timeout=T)
        assert index.status_code == 200 and 'id="loaded"' in index.text
        assert "text/html" in index.headers["content-type"]
        script = http.get(urljoin(urljoin(base, src), "app.js"), timeout=T)  # relative, as the page
        assert script.status_code == 200 and "runner_mw.execute" in script.text

        envelope: dict[str, Any] = {
            "context": {"tenant_id": "demo-tenant", "extension_id": SAMPLE_EXTENSION_ID,
                        "content_hash": SAMPLE_CONTENT_HASH},
            "http": {"method": "POST", "path": "/hello", "body_b64": base64.b64encode(b"quick").decode()},
        }
        reply = http.post(urljoin(base, "/v1/execute"), json=envelope, timeout=T)
        assert reply.status_code == 200, reply.text
        assert reply.json()["status"] == 200
        echo = json.loads(base64.b64decode(reply.json()["body_b64"]))
        assert (echo["tenant"], echo["path"], echo["body"]) == ("demo-tenant", "/hello", "quick")


def wait_until(predicate: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_readme_demo_serves_and_stops_cleanly_twice(demo_env: dict[str, str], tmp_path: Path) -> None:
    port, runner_port = free_port(), free_port()
    while runner_port == port:
        runner_port = free_port()
    # Ctrl-C, then SIGTERM (a service manager) on the same ports: the second run must start at once.
    for sig in (signal.SIGINT, signal.SIGTERM):
        with demo(demo_env, port, runner_port, tmp_path) as run:
            base = run.url()
            assert base == f"http://127.0.0.1:{port}/"
            if Path("/proc/self/stat").exists():  # the devrunner, gunicorn and its workers
                assert len(run.servers()) >= 3, run.children
            check_serving(base)
            assert run.stop(sig) == 0, run.output()
            assert wait_until(run.all_gone, STOP_S), f"processes left after {sig.name}\n{run.output()}"
            for p in (port, runner_port):
                assert wait_until(lambda p=p: port_is_free(p), T), f"port {p} still taken after {sig.name}"


RELOAD_LINE = re.compile(r"reload after editing (\S+): kill -HUP (\d+)")


def test_the_printed_reload_command_reloads_the_demo_in_place(demo_env: dict[str, str],
                                                              tmp_path: Path) -> None:
    # The README's reload, on a copy of the config (the repository's file stays as it is).
    config = tmp_path / "runner.yaml"
    config.write_text((ROOT / "config" / "runner.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    with demo({**demo_env, "RUNNER_MW_CONFIG": str(config)}, free_port(), free_port(), tmp_path) as run, \
            requests.Session() as http:
        http.trust_env = False
        base = run.url()
        assert wait_until(lambda: RELOAD_LINE.search("".join(run.stdout)), T), run.output()
        match = RELOAD_LINE.search("".join(run.stdout))
        assert match and match[1] == str(config), run.output()
        master = int(match[2])

        def generations() -> set[int]:  # a new connection each: both workers answer in time
            return {http.get(urljoin(base, "/runner/-/status"), headers={"Connection": "close"},
                             timeout=T).json()["generation"] for _ in range(8)}

        assert generations() == {1}
        servers = run.servers()
        assert master in servers or not Path("/proc/self/stat").exists()
        text = config.read_text(encoding="utf-8")
        config.write_text(text.replace("read_ms: ${EXT_GATEWAY_TIMEOUT_MS:-30000}", "read_ms: 25000"),
                          encoding="utf-8")
        os.kill(master, signal.SIGHUP)
        assert wait_until(lambda: generations() == {2}, T), run.output()
        assert run.servers() == servers  # reloaded in place: no process restarted
        assert run.proc.poll() is None


def test_readme_demo_reports_a_taken_port(demo_env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with demo(demo_env, port, free_port(), tmp_path) as run:
            try:
                code = run.proc.wait(timeout=START_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the demo did not give up on a taken port\n{run.output()}")
            out = run.output()
            assert code == 1, out
            assert f"cannot listen on 127.0.0.1:{port}" in out and "RUNNER_MW_PORT=" in out, out
            assert "runner_mw demo: open" not in out


# scripts/dev.py asks the kernel for PR_SET_PDEATHSIG only on Linux: elsewhere there is no such behaviour.
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_servers_stop_when_the_demo_is_killed(demo_env: dict[str, str], tmp_path: Path) -> None:
    port, runner_port = free_port(), free_port()
    while runner_port == port:
        runner_port = free_port()
    with demo(demo_env, port, runner_port, tmp_path) as run:
        run.url()
        servers = run.servers()
        assert servers, "the demo's servers are its children"
        run.proc.kill()  # no chance to clean up: its servers must notice by themselves
        run.proc.wait(T)
        assert wait_until(lambda: not any(alive(pid) for pid in servers), STOP_S), run.output()
        for p in (port, runner_port):
            assert wait_until(lambda p=p: port_is_free(p), T), f"port {p} still taken"
