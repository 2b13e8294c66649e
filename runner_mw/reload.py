"""Reload on SIGHUP in-process: the handler only records the signal, a thread reloads.

Use nothing here directly: ``RunnerMiddleware`` attaches itself. Outside gunicorn
(werkzeug's server, waitress, any single process) SIGHUP sets a flag and a
daemon watcher thread (started in this process, polling the flag every
``POLL_S``) calls ``reload()`` on every live middleware, so the reload runs
promptly even with no traffic and never inside the signal handler (no I/O,
logging or locks there). Under gunicorn the master receives HUP: the hooks in
``runner_mw.gunicorn`` validate there and make each worker swap in place, so
nothing is installed in a gunicorn process here.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import weakref
from typing import Any

from runner_mw.errors import ConfigError

log = logging.getLogger("runner_mw.reload")
POLL_S = 0.1

_middlewares: weakref.WeakSet[Any] = weakref.WeakSet()
# Those a SIGHUP reloads: built with reload_signal (the default) where a handler could be
# installed. reload_signal=False, or built off the main thread, means reload() by hand only.
_on_signal: weakref.WeakSet[Any] = weakref.WeakSet()
_pending = False
_watcher_pid = 0
_start_lock = threading.Lock()
_previous: Any = None  # the SIGHUP handler found when ours was installed


class StartupConfigError(ConfigError, RuntimeError):
    """A broken file when a gunicorn process builds the app without the master's state (first
    start with ``preload_app``, or no hooks). Also a ``RuntimeError``, so that gunicorn prints
    ``Error: <every FILE:LINE problem>`` and exits with status 1 instead of a traceback."""

    def __str__(self) -> str:
        return "runner_mw: invalid configuration, not starting:\n" + super().__str__()


def initial_config(path: str) -> Any:
    """The config a new middleware starts with: the file, or (in a gunicorn worker run
    with runner_mw's hooks) exactly what the master last validated."""
    from runner_mw.loader import load_config

    hooks = sys.modules.get("runner_mw.gunicorn")
    if hooks is not None:
        config = hooks.published_config(path)
        if config is not None:
            return config
    try:
        return load_config(path)
    except ConfigError as exc:
        if under_gunicorn():
            raise StartupConfigError(exc.issues) from None
        raise


def live_middlewares() -> list[Any]:
    """Every live ``RunnerMiddleware`` of this process."""
    return list(_middlewares)


def _on_sighup(signum: int, frame: Any) -> None:
    # Runs between two bytecodes of whatever the main thread was doing: only set a flag.
    global _pending
    _pending = True
    if callable(_previous):
        _previous(signum, frame)  # a Python handler installed before ours keeps working


def under_gunicorn() -> bool:
    """True in a gunicorn master or worker (its hooks own HUP there)."""
    return "gunicorn.arbiter" in sys.modules


def attach(middleware: Any, *, signal_handler: bool) -> None:
    """Register a middleware for SIGHUP reloads (called by its constructor).

    Under gunicorn nothing is installed: with runner_mw's hooks the middleware is handed to
    the worker's poll thread (see ``runner_mw.gunicorn``); without them HUP is gunicorn's.
    """
    _middlewares.add(middleware)
    hooks = sys.modules.get("runner_mw.gunicorn")
    if hooks is not None:
        hooks.register(middleware)  # a no-op outside a managed gunicorn worker
    if not signal_handler or under_gunicorn():
        return
    if "uwsgi" in sys.modules:  # only there: the module uWSGI gives its Python apps
        _warn_uwsgi()
    if install_handler():
        _on_signal.add(middleware)
    ensure_watcher()


def _warn_uwsgi() -> None:
    log.warning("runner_mw: under uWSGI, SIGHUP is uWSGI's own: it restarts the workers (a "
                "broken file is then fatal to the app), or stops a server without --master. "
                "Restart after 'runner-mw check' to apply a new file; see the README's 'Other servers'")


def install_handler() -> bool:
    """Install the SIGHUP handler; never raises (a warning is logged off the main thread)."""
    if not hasattr(signal, "SIGHUP"):
        return False
    global _previous
    try:
        # The interpreter says whether this is the main thread (a ValueError if not): under
        # eventlet's patched threading, current_thread() is never main_thread(), even there.
        previous = signal.signal(signal.SIGHUP, _on_sighup)
    except ValueError:
        log.warning("runner_mw: not on the main thread, SIGHUP reload not installed; "
                    "call middleware.reload() instead")
        return False
    except OSError as exc:
        log.warning("runner_mw: SIGHUP reload not installed: %s", exc)
        return False
    if previous is not _on_sighup:
        _previous = previous
    return True


def ensure_watcher() -> None:
    """Start this process's watcher thread once (again after a fork: threads do not survive one)."""
    global _watcher_pid
    pid = os.getpid()
    if _watcher_pid == pid:
        return
    with _start_lock:  # claimed here, started outside it (see logs._start_writer)
        if _watcher_pid == pid:
            return
        _watcher_pid = pid
    try:
        threading.Thread(target=_watch, name="runner_mw-reload", daemon=True).start()
    except BaseException:
        with _start_lock:
            _watcher_pid = 0
        raise


def _watch() -> None:
    global _pending
    while True:
        time.sleep(POLL_S)
        if not _pending:
            continue
        _pending = False
        reload_all()


def reload_all() -> None:
    """Reload every live middleware of this process that SIGHUP reloads (errors are
    logged, never raised)."""
    for mw in list(_on_signal):
        if getattr(getattr(mw, "store", None), "path", None) is None:
            continue  # built from a mapping or a Config: nothing to re-read
        try:
            mw.reload()
        except Exception:
            log.exception("runner_mw: reload failed")
