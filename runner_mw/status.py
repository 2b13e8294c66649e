"""``/runner/-/status`` (guarded) and ``/runner/-/healthz`` (open liveness probe).

Use status to see which config each worker serves: generation, checksum, last
reload attempt and the upstream's health (cached briefly so that probes cannot
hammer the runner). It never shows a secret.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner_mw.snapshot import ReloadOutcome, Snapshot

HEALTH_TTL_S = 5.0


class HealthCache:
    """The backend's health, asked at most once per ``HEALTH_TTL_S`` per snapshot, and by
    one caller at a time: the others get the last answer, or wait for the one coming (a
    flood of status requests must not become a flood of probes of the runner)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: int | None = None
        self._at = 0.0
        self._value: dict[str, Any] = {}
        self._probing: tuple[int, threading.Event] | None = None  # whose probe runs, its end

    def get(self, snap: Snapshot) -> dict[str, Any]:
        key = snap.serial  # not id(snap): a retired snapshot's id may be the next one's
        while True:
            with self._lock:
                if self._key == key and time.monotonic() - self._at < HEALTH_TTL_S:
                    return self._value
                probing = self._probing
                if probing is None or probing[0] != key:
                    mine = self._probing = (key, threading.Event())
                    break
                if self._key == key:
                    return self._value  # stale, while the next answer is on its way
            probing[1].wait(PROBE_WAIT_S)  # the first look at this snapshot: wait for it
        value: dict[str, Any] = {}
        try:
            value = snap.backend.health()  # (it never raises: it reports)
        finally:
            with self._lock:  # the answer is in place before anyone waiting wakes up
                if value:
                    self._key, self._at, self._value = key, time.monotonic(), value
                if self._probing is mine:
                    self._probing = None
            mine[1].set()
        return value


#: Longer than a probe can take (its connect and read timeouts, 1 + 2 s).
PROBE_WAIT_S = 5.0


def status_document(snap: Snapshot, last: ReloadOutcome, health: dict[str, Any]) -> dict[str, Any]:
    meta = snap.backend.metadata()
    return {
        "pid": os.getpid(),
        "backend": snap.config.backend,
        "kind": meta.get("kind"),
        "url": meta.get("url"),
        "public_base": meta.get("public_base"),
        "generation": snap.generation,
        "loaded_at": snap.loaded_at,
        "config_sha256": snap.config.sha256,
        "config_source": snap.config.source,
        "inflight": snap.inflight,
        "last_reload": {"ok": last.ok, "at": last.at, "error": last.error,
                        "generation": last.generation},
        "upstream": health,
    }
