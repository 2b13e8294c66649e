#!/usr/bin/env python3
"""Set up and run runner_mw: ``python3 scripts/dev.py demo`` or ``python3 scripts/dev.py test``.

Use it on a fresh machine with only Python >= 3.10. It makes ``.venv`` in the
checkout (reused on the next run, re-installed when setup.py changes; set
RUNNER_MW_VENV to use another venv: one not made by this script that already has every
requirement of setup.py is used as it is), installs runner_mw with its test extras, then:

- ``demo``: starts the development stand-in runner on 127.0.0.1:8085 and gunicorn
  serving examples/wsgi_app.py on 127.0.0.1:8000 (ports from RUNNER_MW_RUNNER_PORT
  and RUNNER_MW_PORT, address from RUNNER_MW_HOST), waits until both answer, prints
  the URL, and stops both on Ctrl-C (SIGINT) or SIGTERM;
- ``test``: runs ruff and the whole test suite (extra arguments go to pytest).
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import venv
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("RUNNER_MW_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
START_TIMEOUT_S = 90.0  # gunicorn boots in ~2 s; a busy machine may need much longer
STOP_TIMEOUT_S = 30.0

# Run by the venv's Python: exit 0 when every requirement given (JSON list) is installed.
PROBE = """\
import json, re, sys
from importlib.metadata import PackageNotFoundError, version
try:
    from packaging.requirements import Requirement
except ImportError:
    try:
        from pip._vendor.packaging.requirements import Requirement
    except ImportError:
        Requirement = None
missing = []
for text in json.loads(sys.argv[1]):
    try:
        have = version(re.split(r"[<>=!~;\\[ ]", text, maxsplit=1)[0])
    except PackageNotFoundError:
        missing.append(text)
        continue
    if Requirement is not None and not Requirement(text).specifier.contains(have, prereleases=True):
        missing.append(text)
sys.exit(1 if missing else 0)
"""


def setup() -> None:
    """Create the venv and install runner_mw[test] unless already done for this setup.py."""
    stamp = VENV / ".runner_mw-installed"
    want = hashlib.sha256((ROOT / "setup.py").read_bytes()).hexdigest()
    if PY.exists() and stamp.exists() and stamp.read_text() == want:
        return
    if PY.exists() and not stamp.exists() and requirements_met():
        return  # a venv set up some other way (e.g. RUNNER_MW_VENV): used as it is
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    # setuptools < 81: Pyramid still imports pkg_resources, which 81 deprecates loudly.
    run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools>=64,<81", "wheel"])
    run([str(PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]"])
    stamp.write_text(want)


def requirements() -> list[str] | None:
    """``install_requires`` + ``TEST_REQUIRES`` as written in setup.py (None if not found)."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    found: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        targets = getattr(node, "targets", [])
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "TEST_REQUIRES" for t in targets):
            found["test"] = ast.literal_eval(node.value)
        elif isinstance(node, ast.keyword) and node.arg == "install_requires":
            found["install"] = ast.literal_eval(node.value)
    return found["install"] + found["test"] if len(found) == 2 else None


def requirements_met() -> bool:
    try:
        wanted = requirements()
    except (SyntaxError, ValueError):
        return False
    if wanted is None:
        return False
    probe = subprocess.run([str(PY), "-c", PROBE, json.dumps(wanted)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return probe.returncode == 0


def run(cmd: list[str], **kw: object) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)  # type: ignore[call-overload]


def test(extra: list[str]) -> int:
    setup()
    run([str(BIN / "ruff"), "check", "runner_mw", "tests", "examples", "scripts", "bench", "setup.py"])
    return subprocess.call([str(PY), "-m", "pytest", *extra], cwd=ROOT)


# --------------------------------------------------------------------------- demo


def fail(message: str) -> int:
    print(f"dev.py demo: {message}", file=sys.stderr, flush=True)
    return 1


def port_from_env(name: str, default: int) -> int:
    text = os.environ.get(name, "") or str(default)
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise SystemExit(f"dev.py demo: {name}={text!r} is not a port number (1-65535)")
    return int(text)


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (None if it can), checked the way servers bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn: TIME_WAIT is fine
        try:
            sock.bind((host, port))
        except OSError as exc:
            return "something is already listening there" if exc.errno == errno.EADDRINUSE else str(exc)
    return None


def answers(url: str) -> bool:
    """True when ``url`` answers 200 (no proxy from the environment: this is loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def demo() -> int:
    setup()
    host = os.environ.get("RUNNER_MW_HOST", "127.0.0.1")
    port = port_from_env("RUNNER_MW_PORT", 8000)
    runner_port = port_from_env("RUNNER_MW_RUNNER_PORT", 8085)
    if port == runner_port:
        return fail(f"RUNNER_MW_PORT and RUNNER_MW_RUNNER_PORT are both {port}")
    for h, p, var in ((host, port, "RUNNER_MW_PORT"), ("127.0.0.1", runner_port, "RUNNER_MW_RUNNER_PORT")):
        problem = port_in_use(h, p)
        if problem:
            return fail(f"cannot listen on {h}:{p}: {problem}. Stop it (an earlier demo?), or pick "
                        f"another port: {var}=<port> python3 scripts/dev.py demo")
    local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    base = f"http://[{local}]:{port}" if ":" in local else f"http://{local}:{port}"
    runner_url = f"http://127.0.0.1:{runner_port}"
    env = {**os.environ, "RUNNER_DOCKER_HOST": runner_url, "RUNNER_BACKEND": "docker"}
    env.setdefault("RUNNER_MW_CONFIG", str(ROOT / "config" / "runner.yaml"))

    # Ctrl-C and SIGTERM only set a flag: the loop below stops both servers in order.
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    # `python -m` from the checkout: works whether or not the venv's scripts are installed.
    # Each server in its own session: Ctrl-C reaches this script only, which stops them with
    # TERM (gunicorn's quick stop on INT can hang a gthread worker: see shut_down).
    names: dict[int, str] = {}
    procs: list[subprocess.Popen[bytes]] = []
    spawn = {"cwd": ROOT, "env": env, "start_new_session": True, "preexec_fn": stop_with_parent()}
    try:
        runner = subprocess.Popen([str(PY), "-m", "runner_mw.cli", "devrunner", "--host", "127.0.0.1",
                                   "--port", str(runner_port)], **spawn)  # type: ignore[call-overload]
        procs.append(runner)
        names[runner.pid] = f"the devrunner (127.0.0.1:{runner_port})"
        problem = wait_until(f"{runner_url}/healthz", procs, names, stop)
        if problem is None:
            conf = ROOT / "config" / "gunicorn.conf.py"
            gunicorn = subprocess.Popen([str(PY), "-m", "gunicorn", "-c", str(conf),
                                         "--bind", f"{host}:{port}", "examples.wsgi_app:application"],
                                        **spawn)  # type: ignore[call-overload]
            procs.append(gunicorn)
            names[gunicorn.pid] = f"gunicorn ({host}:{port})"
            problem = wait_until(f"{base}/runner/-/healthz", procs, names, stop)
        if problem is None and not stop.is_set():
            config = Path(env["RUNNER_MW_CONFIG"])
            shown = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
            # The master's own PID: a pattern (pkill -f) could match another user's gunicorn.
            print(f"\n  runner_mw demo: open {base}/   (Ctrl-C stops it)\n"
                  f"  reload after editing {shown}: kill -HUP {gunicorn.pid}\n", flush=True)
            while not stop.wait(0.5):
                problem = exited(procs, names)
                if problem is not None:
                    break
        if problem is not None and not stop.is_set():
            fail(problem)
    finally:
        clean = shut_down(procs, names)
    if problem is not None and not stop.is_set():
        return 1
    return 0 if clean else 1


def wait_until(url: str, procs: list[subprocess.Popen[bytes]], names: dict[int, str],
               stop: threading.Event) -> str | None:
    """Poll ``url`` until it answers 200; why not (a process died, too slow), or None."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not stop.is_set():
        problem = exited(procs, names)
        if problem is not None:
            return problem
        if answers(url):
            return None
        if time.monotonic() > deadline:
            return f"{url} did not answer within {START_TIMEOUT_S:.0f} s"
        stop.wait(0.1)
    return None


def exited(procs: list[subprocess.Popen[bytes]], names: dict[int, str]) -> str | None:
    for proc in procs:
        if proc.poll() is not None:
            return f"{names[proc.pid]} exited with status {proc.returncode} (its error is above)"
    return None


def stop_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` (Linux): the child gets SIGTERM when this script dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def arrange() -> None:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the script died before prctl: stop at once
            os.kill(os.getpid(), signal.SIGTERM)

    return arrange


def shut_down(procs: list[subprocess.Popen[bytes]], names: dict[int, str]) -> bool:
    """TERM every process still running (gunicorn first), wait, kill what hangs; True if clean.

    Always TERM, a graceful stop, never INT/QUIT: gunicorn's quick stop runs
    ``ThreadPoolExecutor.shutdown`` in a gthread worker's signal handler, which deadlocks
    when the signal lands inside ``submit`` (seen with gunicorn 27); the master then waits
    ``graceful_timeout`` before killing the worker.
    """
    clean = True
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"dev.py demo: {names[proc.pid]} did not stop in {STOP_TIMEOUT_S:.0f} s: killed",
                  file=sys.stderr, flush=True)
            proc.kill()
            proc.wait()
            clean = False
        if proc.returncode not in (0, -signal.SIGINT, -signal.SIGTERM):
            print(f"dev.py demo: {names[proc.pid]} stopped with status {proc.returncode}",
                  file=sys.stderr, flush=True)
            clean = False
    return clean


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    if argv[0] == "setup":
        setup()
        return 0
    return demo() if argv[0] == "demo" else test(argv[1:])


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # Ctrl-C while setting up (the demo itself handles it)
        sys.exit(130)
