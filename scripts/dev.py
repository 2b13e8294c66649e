#!/usr/bin/env python3
"""Set up and run runner_mw: ``python3 scripts/dev.py demo`` or ``python3 scripts/dev.py test``.

Use it on a fresh machine with only Python >= 3.10. It makes ``.venv`` in the
checkout (reused on the next run, re-installed when setup.py changes), installs
runner_mw with its test extras, then:

- ``demo``: starts the development stand-in runner on 127.0.0.1:8085 and gunicorn
  serving examples/wsgi_app.py on 127.0.0.1:8000 (ports from RUNNER_MW_RUNNER_PORT
  and RUNNER_MW_PORT), prints the URL, and stops both on Ctrl-C;
- ``test``: runs ruff and the whole test suite (extra arguments go to pytest).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("RUNNER_MW_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def setup() -> None:
    """Create the venv and install runner_mw[test] unless already done for this setup.py."""
    stamp = VENV / ".runner_mw-installed"
    want = hashlib.sha256((ROOT / "setup.py").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == want and PY.exists():
        return
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools", "wheel"])
    run([str(PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]"])
    stamp.write_text(want)


def run(cmd: list[str], **kw: object) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)  # type: ignore[call-overload]


def test(extra: list[str]) -> int:
    setup()
    run([str(BIN / "ruff"), "check", "runner_mw", "tests", "examples", "scripts", "bench", "setup.py"])
    return subprocess.call([str(PY), "-m", "pytest", *extra], cwd=ROOT)


def demo() -> int:
    setup()
    host = os.environ.get("RUNNER_MW_HOST", "127.0.0.1")
    port = os.environ.get("RUNNER_MW_PORT", "8000")
    runner_port = os.environ.get("RUNNER_MW_RUNNER_PORT", "8085")
    env = {**os.environ, "RUNNER_DOCKER_HOST": f"http://127.0.0.1:{runner_port}",
           "RUNNER_BACKEND": "docker"}
    env.setdefault("RUNNER_MW_CONFIG", str(ROOT / "config" / "runner.yaml"))
    procs = [
        subprocess.Popen([str(BIN / "runner-mw"), "devrunner", "--host", "127.0.0.1",
                          "--port", runner_port], cwd=ROOT, env=env),
        subprocess.Popen([str(BIN / "gunicorn"), "-c", str(ROOT / "config" / "gunicorn.conf.py"),
                          "--bind", f"{host}:{port}", "examples.wsgi_app:application"],
                         cwd=ROOT, env=env),
    ]
    print(f"\n  runner_mw demo: open http://{host}:{port}/   (Ctrl-C stops it)\n", flush=True)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    failed = [p.args[0] for p in procs if p.returncode not in (0, -signal.SIGTERM, None)]
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    if argv[0] == "setup":
        setup()
        return 0
    return demo() if argv[0] == "demo" else test(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
