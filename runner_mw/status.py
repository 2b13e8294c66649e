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
    """The backend's health, asked at most once per ``HEALTH_TTL_S`` per snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: int | None = None
        self._at = 0.0
        self._value: dict[str, Any] = {}

    def get(self, snap: Snapshot) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            if self._key == id(snap) and now - self._at < HEALTH_TTL_S:
                return self._value
        value = snap.backend.health()
        with self._lock:
            self._key, self._at, self._value = id(snap), time.monotonic(), value
        return value


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
