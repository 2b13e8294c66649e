"""gunicorn hooks: ``kill -HUP <master>`` validates the YAML once and every worker swaps in place.

Use them when runner_mw runs under gunicorn: point ``-c`` at the shipped config, or import the
hooks into your own config module::

    gunicorn -c config/gunicorn.conf.py myapp:app
    # or, in your own gunicorn.conf.py:
    from runner_mw.gunicorn import *   # on_starting, post_worker_init, child_exit, on_exit

If your config defines one of these hooks itself, call ours from it
(``runner_mw.gunicorn.on_starting(server)``, and so on). The file is
``$RUNNER_MW_CONFIG`` (default ``config/runner.yaml``, relative to gunicorn's working
directory): the middleware of the app must be given the same file.

How it works. By default HUP makes gunicorn start new workers and stop the old ones, and a
worker that cannot import the app (a broken YAML file) makes the master halt. These hooks
replace the master's HUP handling instead:

- ``on_starting`` (master, before any fork) validates the file (a broken one fails the start:
  ``Error: FILE:LINE: ...``, exit status 1), creates a private state folder (``mkdtemp``, 0700)
  and publishes the validated config there as JSON ``{seq, generation, ok, at, error, source,
  sha256, data}``, written to a temporary file and renamed over ``state.json``.
- On HUP the master alone re-reads and validates the file (one log line per attempt). A valid,
  changed file gets the next generation and is published; an unchanged one is a no-op; a broken
  or missing one is published as ``ok: false`` with the error, keeping the last good ``data``.
- Each worker starts a daemon thread in ``post_worker_init`` (after the fork) that looks at the
  state file every ``POLL_S`` seconds and applies exactly what the master published to every
  ``RunnerMiddleware`` of the process reading that file: same PIDs, no dropped request, and
  every worker's ``/runner/-/status`` reports the outcome of the last attempt, failures included.
- A worker that boots later (``max_requests``, a crash) starts from the published config, not
  from the file, so a broken file can never stop a worker from booting.

What changes: HUP no longer re-reads gunicorn's own settings nor re-imports the app (restart,
or USR2 where no supervisor watches the master; USR1 still reopens the log files). A
``timeout`` below the validated config's deadlines is raised (``graceful_timeout`` with it
when the two were equal; 0, "off", is left alone). This replaces a method of gunicorn's
``Arbiter``: it is tested with gunicorn >= 23, < 28 (the pin in setup.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

from runner_mw import metrics
from runner_mw.backends.registry import trial_build
from runner_mw.config import Config
from runner_mw.errors import ConfigError
from runner_mw.loader import config_dir, config_from_mapping, load_config
from runner_mw.logs import redacted
from runner_mw.snapshot import changes

__all__ = ["child_exit", "on_exit", "on_starting", "post_worker_init"]

CONFIG_ENV = "RUNNER_MW_CONFIG"
DEFAULT_CONFIG = "config/runner.yaml"
STATE_NAME = "state.json"
POLL_S = 0.1  # how often a worker looks at the state file (one stat() call)

log = logging.getLogger("runner_mw.reload")

# Set in the master by on_starting; a worker inherits them through the fork.
_state_file: str | None = None
_master_pid = 0
_master: _Master | None = None
_poller: _Poller | None = None
_poller_lock = threading.Lock()


def config_path() -> str:
    """The absolute path of the config file the hooks manage (``$RUNNER_MW_CONFIG``)."""
    return os.path.abspath(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def worker_timeout(path: str | None = None, *, default: int = 45) -> int:
    """A worker ``timeout`` (seconds) above the slowest request the config allows.

    The longest of any backend's connect + read deadline (plus its retry budget when it
    retries: a HUP may switch to any backend), with 25 % headroom plus 5 s. ``default`` when
    the file cannot be read now (``on_starting`` then reports why and stops the start).
    """
    try:
        config = load_config(path or config_path())
    except ConfigError:
        return default
    return timeout_for(config)


def timeout_for(config: Config) -> int:
    """``worker_timeout`` of a loaded config."""
    longest_ms = 0
    for backend in config.backends.values():
        ms = backend.timeouts.connect_ms + backend.timeouts.read_ms
        if backend.retry.attempts > 1:
            ms += backend.retry.budget_ms
        longest_ms = max(longest_ms, ms)
    return math.ceil(longest_ms / 1000 * 1.25) + 5


def _raise_timeouts(server: Any, config: Config) -> None:
    """gunicorn reads its config file before it applies ``-e``/``raw_env`` and ``--chdir``,
    so ``worker_timeout()`` there may have read other deadlines (or another file) than the
    master validated since: raise ``timeout`` to this config's, and ``graceful_timeout``
    with it where it followed ``timeout`` (the shipped config's ``graceful_timeout =
    timeout``). A timeout of 0 (off) and a graceful_timeout set apart are the user's."""
    needed, timeout, graceful = timeout_for(config), server.cfg.timeout, server.cfg.graceful_timeout
    if timeout == 0 or timeout >= needed:
        return
    server.log.info("runner_mw: timeout raised from %s s to %d s, above the deadlines of %s",
                    timeout, needed, config.source)
    server.cfg.set("timeout", needed)
    server.timeout = needed  # the arbiter's copy, read when it checks on workers
    if graceful == timeout:
        server.log.info("runner_mw: graceful_timeout raised with it, to %d s", needed)
        server.cfg.set("graceful_timeout", needed)


# --------------------------------------------------------------------------- hooks


def on_starting(server: Any) -> None:
    """Master, before the listeners and the workers: validate, publish generation 1, own HUP."""
    global _state_file, _master_pid, _master
    path = config_path()
    state_dir = tempfile.mkdtemp(prefix="runner-mw-")
    try:
        owner = _worker_owner(server)
        if owner:
            os.chown(state_dir, *owner)
        master = _Master(server, path, os.path.join(state_dir, STATE_NAME), owner)
        master.first_load()
        assert master.good is not None
        _raise_timeouts(server, master.good)
    except BaseException as exc:
        shutil.rmtree(state_dir, ignore_errors=True)
        if getattr(server, "pidfile", None) is not None:
            server.pidfile.unlink()
        # gunicorn prints a RuntimeError as "Error: <message>" and exits with status 1.
        if isinstance(exc, ConfigError):
            raise RuntimeError(f"runner_mw: {path}: invalid configuration, not starting:\n{exc}") from None
        if isinstance(exc, Exception):
            raise RuntimeError(f"runner_mw: {path}: cannot start: {type(exc).__name__}: {exc}") from exc
        raise
    _state_file, _master_pid, _master = master.state_file, os.getpid(), master
    # Metrics: every worker writes to one private folder (inside the state folder, removed with
    # it), so any worker's scrape shows the totals of all; set before the first fork.
    metrics.setup_multiprocess(server, parent=state_dir)
    # The Arbiter dispatches a queued signal as getattr(self, "handle_" + name)(): an instance
    # attribute replaces the method that would restart every worker.
    server.handle_hup = master.handle_hup
    # And a worker ignores HUP from its init_signals on, not only from post_worker_init: a HUP
    # sent to the process group while it imports the app would kill it (SIG_DFL until then).
    server.worker_class = _ignoring_hup(server.worker_class)


def post_worker_init(worker: Any) -> None:
    """Worker, after the app is loaded: ignore a stray HUP, apply the state, start polling."""
    if _state_file is None or os.getpid() == _master_pid:
        worker.log.warning("runner_mw: on_starting did not run in the master: SIGHUP reloads "
                           "are off in this worker (import every hook of runner_mw.gunicorn)")
        return
    # gunicorn leaves HUP at SIG_DFL in a worker, which would kill it (pkill -HUP, a HUP sent
    # to the process group). A Python handler (not SIG_IGN) is reset by exec in child processes.
    signal.signal(signal.SIGHUP, _ignore_hup)
    if hasattr(worker, "tpool"):
        # gthread's INT/QUIT handler calls tpool.shutdown() inside the signal handler: if the
        # signal lands while the main thread holds the pool's lock (in submit()), the worker
        # deadlocks until the master kills it after graceful_timeout (Ctrl-C hung ~60 s).
        # Stop the way TERM does instead: leave the loop, let requests in flight finish.
        signal.signal(signal.SIGINT, worker.handle_exit)
        signal.signal(signal.SIGQUIT, worker.handle_exit)
    poller = worker_poller()
    if poller is None:
        return
    poller.glog = worker.log
    try:
        poller.refresh()  # before the first request: with preload_app the app was built pre-fork
    except Exception:
        worker.log.exception("runner_mw: reading the master's state failed; the poll thread retries")
    poller.start()


def child_exit(server: Any, worker: Any) -> None:
    """Master, when a worker died (any way, SIGKILL included): drop its live metric gauges;
    make sure the worker that replaces it finds the published state."""
    metrics.worker_exited(worker.pid)
    if _master is not None and os.getpid() == _master_pid:
        try:
            _master.republish_if_gone()
        except Exception:
            server.log.exception("runner_mw: publishing the state again failed")


def on_exit(server: Any) -> None:
    """Master, at shutdown: remove the state folder (and the metrics folder)."""
    if _state_file is not None and os.getpid() == _master_pid:
        shutil.rmtree(os.path.dirname(_state_file), ignore_errors=True)
    metrics.cleanup_multiprocess()  # a no-op unless setup_multiprocess made the folder here


def _ignoring_hup(worker_class: Any) -> Any:
    """A subclass of ``worker_class`` whose ``init_signals`` also ignores HUP (a class made
    here is returned as it is)."""
    if getattr(worker_class, "_runner_mw_ignores_hup", False):
        return worker_class

    class Worker(worker_class):  # type: ignore[misc]
        _runner_mw_ignores_hup = True

        def init_signals(self) -> None:
            super().init_signals()
            signal.signal(signal.SIGHUP, _ignore_hup)

    Worker.__name__ = Worker.__qualname__ = worker_class.__name__
    return Worker


def _ignore_hup(signum: int, frame: Any) -> None:
    """A HUP sent to a worker changes nothing: the master decides, the poll thread applies."""


# --------------------------------------------------------------------------- master


class _Master:
    """The master's side: the single validator; publishes each outcome to the state file."""

    def __init__(self, server: Any, path: str, state_file: str, owner: tuple[int, int] | None) -> None:
        self.server = server
        self.path = path
        self.state_file = state_file
        self.owner = owner
        self.seq = 0
        self.generation = 0
        self.good: Config | None = None  # the last config published as good
        self.ok = True  # whether the last attempt succeeded
        self.text = ""  # the state file's text as last written

    def first_load(self) -> None:
        config = load_config(self.path)
        trial_build(config)
        self._publish(config, 1, ok=True, error=None)
        self.server.log.info("runner_mw reload result=ok generation=1 backend=%s sha256=%s source=%s "
                             "(first start; HUP re-reads it, workers kept)",
                             config.backend, config.sha256[:12], self.path)

    def handle_hup(self) -> None:
        """Replaces ``Arbiter.handle_hup``: nothing may escape into gunicorn's main loop."""
        try:
            self.republish_if_gone()
            self.reload()
        except Exception:
            self.server.log.exception("runner_mw reload result=error: the attempt itself failed; "
                                      "workers keep generation %d", self.generation)
        if getattr(self.server, "dirty_arbiter_pid", 0):  # gunicorn >= 25 forwards HUP there
            try:
                self.server.kill_dirty_arbiter(signal.SIGHUP)
            except Exception:
                self.server.log.exception("runner_mw: forwarding HUP to the dirty arbiter failed")

    def reload(self) -> None:
        """One attempt: validate the file; publish the new config, or the error."""
        config = None
        try:
            config = load_config(self.path, settle=True)
            trial_build(config)
        except Exception as exc:
            # ConfigError says FILE:LINE: key: problem; anything else is still only a failed attempt,
            # whose text (a plugin's exception) may quote a secret: it goes to the journal and status.
            error = str(exc) if isinstance(exc, ConfigError) else redacted(
                f"{self.path}: {type(exc).__name__}: {exc}", self.good, config)
            assert self.good is not None
            self._publish(self.good, self.generation, ok=False, error=error)  # keeps the last good data
            self.server.log.error("runner_mw reload result=failed generation=%d kept=%s error=%s",
                                  self.generation, self.good.backend if self.good else "-",
                                  error.replace("\n", " | "))
            return
        assert self.good is not None
        if config.sha256 == self.good.sha256:
            if self.ok:
                self.server.log.info("runner_mw reload result=unchanged generation=%d sha256=%s",
                                     self.generation, config.sha256[:12])
                return
            # Back to the last good content after a failed attempt: clear the error everywhere.
            self._publish(config, self.generation, ok=True, error=None)
            self.server.log.info("runner_mw reload result=ok generation=%d backend=%s sha256=%s "
                                 "changed=- (the last good file again)",
                                 self.generation, config.backend, config.sha256[:12])
            return
        changed = changes(self.good, config)  # names only: safe for secrets
        self._publish(config, self.generation + 1, ok=True, error=None)
        self.server.log.info("runner_mw reload result=ok generation=%d backend=%s sha256=%s changed=%s",
                             self.generation, config.backend, config.sha256[:12],
                             ",".join(changed) or "-")

    def republish_if_gone(self) -> None:
        """Publish the last outcome again if its file is gone. The state lives in the
        temporary folder, and a cleaner of old files there (systemd-tmpfiles ages the files
        of a ``PrivateTmp`` too) removes it after days without a reload: a worker booting then
        would read the YAML itself, and a broken one would stop it and the whole server."""
        if self.good is None or os.path.exists(self.state_file):
            return
        self.server.log.warning("runner_mw: %s was removed (a cleaner of temporary files?); "
                                "generation %d published again", self.state_file, self.generation)
        # Byte for byte (same seq and time): a worker that read it already sees nothing new,
        # and a failed attempt is not counted again.
        self._write(self.text)

    def _publish(self, good: Config, generation: int, *, ok: bool, error: str | None) -> None:
        """Write one outcome for the workers; what the master remembers changes only once written."""
        state = {
            "seq": self.seq + 1,
            "generation": generation,
            "ok": ok,
            "at": time.time(),
            "error": error,
            "source": self.path,
            "sha256": good.sha256,
            "data": dict(good.data),  # the last good data, also after a failed attempt
        }
        text = json.dumps(state, separators=(",", ":"))
        self._write(text)
        self.seq, self.generation, self.good, self.ok, self.text = self.seq + 1, generation, good, ok, text

    def _write(self, text: str) -> None:
        self._make_folders()
        # The data holds interpolated secrets: 0600 file (mkstemp) in a 0700 folder (mkdtemp).
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.state_file), prefix=".state-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            if self.owner:
                os.chown(tmp, *self.owner)
            os.replace(tmp, self.state_file)  # readers see the old file or the new one, whole
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _make_folders(self) -> None:
        """The state folder, and the metrics folder made in it, again if they were removed."""
        folder = os.path.dirname(self.state_file)
        inside = os.environ.get(metrics.MULTIPROC_ENV, "")
        for path in (folder, inside if os.path.dirname(inside) == folder else ""):
            if path and not os.path.isdir(path):
                os.makedirs(path, mode=0o700, exist_ok=True)
                if self.owner:
                    os.chown(path, *self.owner)


def _worker_owner(server: Any) -> tuple[int, int] | None:
    """(uid, gid) of the workers when gunicorn's ``user``/``group`` make them differ from us."""
    uid, gid = getattr(server.cfg, "uid", None), getattr(server.cfg, "gid", None)
    if uid is None or gid is None or (uid, gid) == (os.geteuid(), os.getegid()):
        return None
    return int(uid), int(gid)


# --------------------------------------------------------------------------- worker


def managed_worker() -> bool:
    """True in a gunicorn worker whose master runs these hooks."""
    return _state_file is not None and os.getpid() != _master_pid


def worker_poller() -> _Poller | None:
    """This worker's poller (made on first use, never started here), or None outside one."""
    global _poller
    if not managed_worker():
        return None
    with _poller_lock:
        if _poller is None or _poller.pid != os.getpid():
            assert _state_file is not None
            _poller = _Poller(_state_file)
        return _poller


def published_config(path: str) -> Config | None:
    """The config the master last validated, for a middleware reading ``path`` in a managed
    worker (``runner_mw.reload.initial_config``); None elsewhere."""
    poller = worker_poller()
    if poller is None:
        return None
    try:
        poller.refresh()
    except Exception:
        log.exception("runner_mw: cannot read the master's state; reading %s", path)
        return None
    if poller.config is None or poller.state is None:
        log.warning("runner_mw: the master's state %s is missing; reading %s", poller.state_file, path)
        return None
    if not _same_file(path, poller.state["source"]):
        log.warning("runner_mw: %s is not the file the gunicorn master reloads (%s=%s): "
                    "HUP will not reload this middleware", path, CONFIG_ENV, poller.state["source"])
        return None
    return poller.config


def register(middleware: Any) -> None:
    """Called by ``runner_mw.reload.attach``: in a managed worker, bring a new middleware to
    the published state now (the poll thread keeps it there)."""
    poller = worker_poller()
    if poller is not None:
        poller.adopt(middleware)


def _same_file(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    return os.path.abspath(a) == os.path.abspath(b) or os.path.realpath(a) == os.path.realpath(b)


class _Poller:
    """A worker's view of the state file; its thread applies each new publication."""

    def __init__(self, state_file: str) -> None:
        self.pid = os.getpid()
        self.state_file = state_file
        self.glog: Any = None  # gunicorn's logger, once post_worker_init gave it
        self.state: dict[str, Any] | None = None
        self.config: Config | None = None
        self._lock = threading.RLock()
        # The file last read stays open: its inode cannot be reused by a later state file,
        # so "same inode as the path now" reliably means "nothing new" (one stat per poll).
        self._held: Any = None
        self._held_id: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._last_problem = ""

    def start(self) -> None:
        with self._lock:  # claimed here, started outside it (see logs._start_writer)
            if self._thread is not None:
                return
            thread = self._thread = threading.Thread(target=self._run, name="runner_mw-reload", daemon=True)
        thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(POLL_S)
            try:
                self.refresh()
                self._last_problem = ""
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
                if problem != self._last_problem:  # once, not ten times a second
                    self._last_problem = problem
                    self._log().exception("runner_mw: reading the master's state failed")

    def refresh(self) -> bool:
        """Read the state file if it was replaced since the last look; apply what is new."""
        with self._lock:
            try:
                st = os.stat(self.state_file)
            except FileNotFoundError:
                return False  # the master is shutting down
            if self._held_id == (st.st_dev, st.st_ino):
                return False
            fh = open(self.state_file, "rb")  # noqa: SIM115 - kept open on purpose (see _held)
            try:
                fst = os.fstat(fh.fileno())
                raw = fh.read()
            except BaseException:
                fh.close()
                raise
            if self._held is not None:
                self._held.close()
            self._held, self._held_id = fh, (fst.st_dev, fst.st_ino)
            state = json.loads(raw)
            if self.state is not None and state["seq"] <= self.state["seq"]:
                return False
            self._take(state)
            return True

    def _take(self, state: dict[str, Any]) -> None:
        from runner_mw.reload import live_middlewares

        config = self.config
        if config is None or config.sha256 != state["sha256"]:
            source = state["source"]
            try:
                config = config_from_mapping(state["data"], source=source,
                                             base_dir=config_dir(source), sha256=state["sha256"])
            except Exception as exc:
                # Cannot happen with the same code on both sides; if it does, keep serving.
                if self.state is None:
                    raise
                self._log().exception("runner_mw: cannot rebuild generation %d", state["generation"])
                state = {**self.state, "seq": state["seq"], "ok": False, "at": time.time(),
                         "error": redacted(f"worker {os.getpid()} could not rebuild generation "
                                           f"{state['generation']}: {exc}", self.config)}
                config = self.config
        seen_before = self.state is not None  # else a booting worker takes over the master's word
        self.state, self.config = state, config
        for mw in live_middlewares():
            self._apply(mw, count=seen_before)
        self._log().debug("runner_mw: worker %d on generation %d (seq %d, ok=%s)", os.getpid(),
                          state["generation"], state["seq"], state["ok"])

    def adopt(self, middleware: Any) -> None:
        with self._lock:
            if self.state is None:
                self.refresh()
            else:
                self._apply(middleware, count=False)

    def _apply(self, mw: Any, *, count: bool) -> None:
        """Bring ``mw`` to the published state; ``count``: a reload this worker saw happen
        (a worker booting after it, or a middleware made later, did not)."""
        state, config = self.state, self.config
        store = getattr(mw, "store", None)
        if state is None or config is None or store is None or not _same_file(store.path, state["source"]):
            return
        try:
            current = store.current
            behind = (current.config.sha256, current.generation) != (config.sha256, state["generation"])
            if behind or (state["ok"] and not store.last_reload.ok):  # the latter clears an error
                store.apply(config, generation=state["generation"], at=state["at"], count=count)
            if not state["ok"]:
                store.mark_failed(state["error"], at=state["at"], count=count)
        except Exception:
            self._log().exception("runner_mw: applying generation %d failed", state["generation"])

    def _log(self) -> Any:
        return self.glog if self.glog is not None else log
