"""Immutable config snapshots and the store that swaps them atomically.

Use ``SnapshotStore`` to hold "the config now": a request reads ``store.current``
once and uses that ``Snapshot`` (config + backend) to the end, so a reload in
the middle never mixes old and new settings, and the request path takes no lock
to read it. A replaced snapshot closes its backend's pool once its in-flight
requests have finished (or after a bounded grace period).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from runner_mw import metrics
from runner_mw.access import config_warnings
from runner_mw.backends.base import RunnerBackend
from runner_mw.backends.registry import build_backend
from runner_mw.config import SECRET_KEYS, Config
from runner_mw.errors import ConfigError
from runner_mw.loader import load_config
from runner_mw.logs import REDACTOR, redacted, secrets_of, setup_logging

log = logging.getLogger("runner_mw.reload")


_SERIALS = itertools.count(1)


class Snapshot:
    """One validated config and the backend built from it. Never mutated once built, but for
    ``generation`` (a label: see ``SnapshotStore.apply``)."""

    def __init__(self, config: Config, backend: RunnerBackend, generation: int) -> None:
        self.config = config
        self.backend = backend
        self.generation = generation
        self.serial = next(_SERIALS)  # unique in the process (an id() is reused once freed)
        self.loaded_at = time.time()
        self._inflight = 0
        self._retired = False
        self._closed = False
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        # Its secrets stay redacted while it may log (serving, retiring), whatever else loads;
        # released when it closes, or when it is collected (one never closed: a test's).
        REDACTOR.hold(self.serial, secrets_of(config))
        weakref.finalize(self, REDACTOR.release, self.serial)

    def enter(self) -> None:
        """Count one request in (pair with ``leave``)."""
        with self._lock:
            self._inflight += 1

    def leave(self) -> None:
        with self._lock:
            self._inflight -= 1
            last = self._retired and self._inflight == 0
        if last:
            self._close()

    @property
    def inflight(self) -> int:
        return self._inflight

    def retire(self, grace_s: float) -> None:
        """Close once idle; a request still running after ``grace_s`` loses its connection."""
        with self._lock:
            self._retired = True
            idle = self._inflight == 0
        if idle:
            self._close()
            return
        timer = threading.Timer(grace_s, self._close)
        timer.daemon = True
        with self._lock:
            if self._closed:  # its last request left meanwhile
                return
            self._timer = timer
        timer.start()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            # Closed by its last request: the timer's thread (and this snapshot, which it
            # holds) need not sleep out the grace. Reloads in a row would pile them up.
            timer.cancel()
        try:
            self.backend.close()
        except Exception:  # closing must never take a worker down
            log.exception("closing backend %s failed", self.config.backend)
        finally:
            REDACTOR.release(self.serial)  # nothing of it is logged from here on


@dataclass(frozen=True)
class ReloadOutcome:
    """What the last reload attempt did (shown in status and logs)."""

    ok: bool
    at: float
    generation: int
    changed: tuple[str, ...] = ()
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "at": self.at, "generation": self.generation,
                "changed": list(self.changed), "error": self.error}


class SnapshotStore:
    """Holds the current snapshot; ``reload()`` re-reads the file, ``apply()`` takes a config.

    A failed reload keeps the last good snapshot and records why in ``last_reload``.
    """

    def __init__(self, config: Config, *, path: str | None = None,
                 build: Callable[[Any], RunnerBackend] = build_backend) -> None:
        self.path = path
        self._build = build
        self._lock = threading.Lock()  # serialises swaps; never taken by requests
        # One reload at a time, read to swap: else an older edit read first but validated
        # slower could be applied after a newer one (a HUP and a manual reload() at once).
        # Reentrant: a host's own SIGHUP handler calling reload() runs on the main thread,
        # also while that thread sleeps in a reload's settle wait.
        self._reloading = threading.RLock()
        try:
            backend = build(config.active)
        except Exception as exc:
            # A plugin's text may quote a secret of the file (a login refused for a token):
            # the traceback goes to the redacting log, the exception carries redacted text.
            log.exception("cannot build backend %r", config.backend)
            raise RuntimeError(redacted(f"cannot build backend {config.backend!r}: "
                                        f"{type(exc).__name__}: {exc}", config)) from None
        self.current = Snapshot(config, backend, 1)
        self.last_reload = ReloadOutcome(ok=True, at=self.current.loaded_at, generation=1)
        _warn(config)

    def reload(self) -> ReloadOutcome:
        """Re-read ``path``: swap on success, keep the old snapshot on any error."""
        if self.path is None:
            raise RuntimeError("this store was built from a mapping: use apply()")
        with self._reloading:
            try:
                config = load_config(self.path, settle=True)
            except ConfigError as exc:
                return self.fail(str(exc))
            except Exception as exc:  # a bug (ours, a plugin's): still a failed reload, never a raise
                log.exception("reload: the config could not be loaded")
                return self.fail(redacted(f"{type(exc).__name__}: {exc}", self.current.config))
            return self.apply(config)

    def apply(self, config: Config, generation: int | None = None, *,
              at: float | None = None, count: bool = True) -> ReloadOutcome:
        """Swap to ``config`` (a no-op when its source is unchanged).

        ``generation`` is the number a gunicorn master gave this config, ``at`` when it did
        (every worker then reports the same time). The same source under a newer number (a
        worker booting from the master's state, or A -> B -> A seen only as A) keeps the
        snapshot and its backend and only takes the new number. ``count=False``: a worker
        catching up at boot (``preload_app`` forks it on the master's first config), not
        a reload it saw happen: not counted, logged at debug level.
        """
        with self._lock:
            old = self.current
            if config.sha256 == old.config.sha256:
                if generation is not None and generation != old.generation:
                    old.generation = generation  # the one field a snapshot may change: its label
                outcome = ReloadOutcome(ok=True, at=time.time() if at is None else at,
                                        generation=old.generation)
                self.last_reload = outcome
                log.info("reload result=unchanged generation=%d", old.generation)
                return outcome
            try:
                backend = self._build(config.active)
            except Exception as exc:
                # A plugin's text may quote a secret, the new config's too: not in the log,
                # the outcome or status as it is.
                return self._fail_locked(redacted(f"cannot build backend {config.backend!r}: {exc}",
                                                  old.config, config))
            setup_logging(config)
            new_gen = generation if generation is not None else old.generation + 1
            snapshot = Snapshot(config, backend, new_gen)
            self.current = snapshot  # one attribute store: atomic for readers
            changed = changes(old.config, config)
            outcome = ReloadOutcome(ok=True, at=snapshot.loaded_at if at is None else at,
                                    generation=new_gen, changed=changed)
            self.last_reload = outcome
        grace = (old.config.active.timeouts.connect_ms + old.config.active.timeouts.read_ms) / 1000 + 5
        old.retire(grace)
        metrics.reloaded(True, new_gen, count=count)
        log.log(logging.INFO if count else logging.DEBUG, "reload result=ok generation=%d backend=%s "
                "changed=%s", new_gen, config.backend, ",".join(changed) or "-")
        _warn(config)
        return outcome

    def fail(self, error: str) -> ReloadOutcome:
        """Record a failed attempt (the current snapshot stays)."""
        with self._lock:
            return self._fail_locked(error)

    def mark_failed(self, error: str, *, at: float | None = None, count: bool = True) -> ReloadOutcome:
        """Record a failed attempt decided and logged elsewhere (a gunicorn master): the
        snapshot stays, ``last_reload`` shows the error; logged here at debug level only.
        ``count=False``: a worker taking over an outcome it did not see happen (at boot)."""
        with self._lock:
            outcome = ReloadOutcome(ok=False, at=time.time() if at is None else at,
                                    generation=self.current.generation, error=error)
            self.last_reload = outcome
        if count:
            metrics.reloaded(False, outcome.generation)
        log.debug("reload result=failed (decided by the master) generation=%d", outcome.generation)
        return outcome

    def _fail_locked(self, error: str) -> ReloadOutcome:
        outcome = ReloadOutcome(ok=False, at=time.time(), generation=self.current.generation, error=error)
        self.last_reload = outcome
        metrics.reloaded(False, self.current.generation)
        log.error("reload result=failed generation=%d kept=%s error=%s", self.current.generation,
                  self.current.config.backend, error.replace("\n", " | "))
        return outcome


#: What ``changed`` says when the digest moved but no setting did: a comment in the YAML, a
#: rotated CA bundle, a secret file rewritten with the same text (the digest covers them).
#: One word: it goes into ``changed=...`` of a key=value log line.
NO_SETTING = "file-contents-only"


def changes(old: Config, new: Config) -> tuple[str, ...]:
    """The dotted keys that differ between two configs, or ``NO_SETTING`` (names only: safe
    to log even for secrets)."""
    keys = changed_keys(old.data, new.data)
    return tuple(keys) if keys or old.sha256 == new.sha256 else (NO_SETTING,)


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose value differs (names only: safe to log even for secrets)."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(changed_keys(a, b, name + "."))
        elif a != b:
            out.append(name + (" (secret)" if key in SECRET_KEYS else ""))
    return out


def _warn(config: Config) -> None:
    """Log what ``runner-mw check`` warns about, for a config just put in place."""
    for warning in config_warnings(config.access):
        log.warning("runner_mw: %s: %s", config.source or "config", warning)
