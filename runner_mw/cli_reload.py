"""``runner-mw reload``: validate the config file, and only then send SIGHUP to a server.

Use it instead of a bare ``kill -HUP`` so that a typo is reported on the terminal (exit 1, the
server is not signalled) rather than only in the server's log::

    runner-mw reload --pid-file /run/myapp.pid --config config/runner.yaml

The target is the gunicorn master (with ``runner_mw.gunicorn``'s hooks) or the single process
of any other server. The server validates the file again when it reloads: the check here runs
with this shell's environment, which may differ from the server's for ``${VAR}`` values.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from typing import Any

from runner_mw.backends.registry import trial_build
from runner_mw.errors import ConfigError
from runner_mw.loader import load_config

CONFIG_ENV = "RUNNER_MW_CONFIG"
DEFAULT_CONFIG = "config/runner.yaml"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``reload`` command to ``runner-mw``'s subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "reload", help="validate the config, then send SIGHUP to the server (exit 1: not sent)",
        description="Validate the config file, and only then send SIGHUP to the server: exit 0 when "
                    "sent; exit 1, errors on stderr and no signal when the file is invalid or the "
                    "process is not there.")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=_pid, help="the server's process id (the gunicorn master)")
    target.add_argument("--pid-file", metavar="FILE", help="a file holding that process id")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help=f"the YAML file to validate (default: ${CONFIG_ENV} or {DEFAULT_CONFIG})")
    parser.set_defaults(func=cmd_reload)
    return parser


def cmd_reload(args: argparse.Namespace) -> int:
    """Exit 0 when the file is valid and the signal was sent, 1 otherwise (nothing sent)."""
    path = args.config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    try:
        config = load_config(path, settle=True)  # as the server will read it
        trial_build(config)  # and check it
    except ConfigError as exc:
        _fail(f"{path}: invalid configuration, no signal sent")
        print(str(exc), file=sys.stderr)
        return 1
    try:
        pid = args.pid if args.pid is not None else _read_pid_file(args.pid_file)
    except ValueError as exc:
        return _fail(str(exc))
    if not hasattr(signal, "SIGHUP"):
        return _fail("this platform has no SIGHUP")
    if _is_uwsgi(pid):
        return _fail(f"process {pid} is uWSGI, whose SIGHUP restarts its workers (and without "
                     f"--master stops the server): runner_mw reloads in place under gunicorn with "
                     f"its hooks or in a single-process server; see the README's 'Other servers'")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return _fail(f"no process {pid} (is the server running? is the pid file stale?)")
    except PermissionError:
        return _fail(f"not allowed to signal process {pid} (run as the server's user)")
    print(f"{path}: ok (backend {config.backend}, sha256 {config.sha256[:12]}); sent SIGHUP to {pid}")
    return 0


def _pid(text: str) -> int:
    # 0 and negative numbers would signal a whole process group (or every process): refuse them.
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}") from None
    if not 0 < value < 2**31:  # beyond a C int: os.kill would raise OverflowError
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}")
    return value


def _read_pid_file(file: str) -> int:
    try:
        with open(file, encoding="utf-8") as fh:
            text = fh.read(64).strip()
    except OSError as exc:
        raise ValueError(f"{file}: cannot read the pid file: {exc.strerror or exc}") from None
    try:
        return _pid(text)
    except argparse.ArgumentTypeError:
        # Its text is shown only when it looks like a number gone wrong: a file given by
        # mistake (the secret file beside the pid file) must not be printed to a terminal.
        shown = f" ({text!r})" if len(text) <= 20 and text.lstrip("+-").isdigit() else ""
        raise ValueError(f"{file}: does not hold a process id{shown}") from None


def _is_uwsgi(pid: int) -> bool:
    """Whether the process is uWSGI, by its executable or the name it shows (Linux's /proc;
    False elsewhere). Its --procname options rename the latter ("uWSGI master", any name)."""
    names = []
    with contextlib.suppress(OSError):
        names.append(os.path.basename(os.readlink(f"/proc/{pid}/exe")))
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as fh:
        names.append(os.path.basename(fh.read(4096).split(b"\0", 1)[0]).decode("utf-8", "replace"))
    return any(name.lower().startswith("uwsgi") for name in names)


def _fail(message: str) -> int:
    print(f"runner-mw reload: {message}", file=sys.stderr)
    return 1
