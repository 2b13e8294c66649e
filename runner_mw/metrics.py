"""Prometheus metrics, exposed at ``/runner/-/metrics`` (same access rule as status).

Use it by installing the extra (``pip install 'runner_mw[metrics]'``); metrics are
then on unless ``metrics.enabled: false``. Under gunicorn with several workers, the
hooks of ``runner_mw.gunicorn`` call ``setup_multiprocess`` in the master (a private
temporary folder in ``PROMETHEUS_MULTIPROC_DIR``, removed at exit) and
``worker_exited`` when a worker dies (its live gauges disappear, its counters stay):
every worker then answers with the totals of all of them. An operator's own
``PROMETHEUS_MULTIPROC_DIR`` is used as is (and never removed).

Metrics (all prefixed ``runner_mw_``): ``requests_total{route,backend,status}``,
``upstream_seconds{route,backend}`` (histogram), ``reloads_total{result}`` (swaps per
process: under gunicorn one HUP counts once per worker), ``config_generation`` and
``inflight_requests``. Recording a metric never fails a request.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import tempfile
import threading
from typing import TYPE_CHECKING, Any

from runner_mw.responses import error, status_line

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse

try:
    import prometheus_client as prom
    from prometheus_client import multiprocess
    from prometheus_client import values as prom_values
except ImportError:  # the extra is not installed: metrics are simply off
    prom = None  # type: ignore[assignment]

AVAILABLE = prom is not None
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Marks a folder made by setup_multiprocess: "<pid of the master that made it>:<path>". A
# re-executed master (USR2) inherits both variables but not the folder's lifetime.
_OWNER_ENV = "RUNNER_MW_METRICS_DIR_OWNER"

log = logging.getLogger("runner_mw")


class _Metrics:
    def __init__(self, multiproc: bool) -> None:
        assert prom is not None
        self.pid = os.getpid()
        self.multiprocess = multiproc
        self.requests = prom.Counter("runner_mw_requests_total", "Requests on the gateway's routes",
                                     ["route", "backend", "status"])
        self.upstream = prom.Histogram(
            "runner_mw_upstream_seconds", "Time from request to response headers (execute: whole call)",
            ["route", "backend"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.reloads = prom.Counter("runner_mw_reloads_total", "Config reload attempts", ["result"])
        self.generation = prom.Gauge("runner_mw_config_generation", "Generation of the config in use",
                                     multiprocess_mode="max")
        self.inflight = prom.Gauge("runner_mw_inflight_requests", "Requests in flight on the gateway",
                                   multiprocess_mode="livesum")

        # Labelled children, cached: ``labels()`` validates and locks on every call, which
        # cost about as much as the recording itself on the hot path.
        self._counted: dict[tuple[str, str, int], Any] = {}
        self._timed: dict[tuple[str, str], Any] = {}

    def record(self, route: str, backend: str, status: int, seconds: float) -> None:
        counter = self._counted.get((route, backend, status))
        if counter is None:  # bounded: routes x configured backends x statuses
            counter = self.requests.labels(route, backend, str(status))
            self._counted[(route, backend, status)] = counter
        timer = self._timed.get((route, backend))
        if timer is None:
            timer = self._timed[(route, backend)] = self.upstream.labels(route, backend)
        counter.inc()
        timer.observe(seconds)

    def unregister(self) -> None:
        assert prom is not None
        for collector in (self.requests, self.upstream, self.reloads, self.generation, self.inflight):
            with contextlib.suppress(KeyError):
                prom.REGISTRY.unregister(collector)


_metrics: _Metrics | None = None
_lock = threading.Lock()
_failed_once = False


def metrics() -> _Metrics | None:
    """The process's metric objects, or None without prometheus-client.

    Made on first use; made again when the mode they were made in is not the one wanted now
    (``PROMETHEUS_MULTIPROC_DIR`` set after they were made, e.g. a master that imported the
    app, with ``preload_app``, before its ``on_starting`` hook ran).
    """
    m = _metrics
    if m is not None and m.pid == os.getpid():
        return m
    return _remake() if AVAILABLE else None


def _remake() -> _Metrics:
    global _metrics
    with _lock:
        wanted = bool(os.environ.get(MULTIPROC_ENV))
        m = _metrics
        if m is not None and m.multiprocess == wanted:
            m.pid = os.getpid()  # a fork: multiprocess values switch files by themselves
            return m
        if wanted:
            _use_multiprocess_values()
        if m is not None:
            m.unregister()
        _metrics = _Metrics(wanted)
        return _metrics


def _use_multiprocess_values() -> None:
    """Make metrics created from now on live in ``PROMETHEUS_MULTIPROC_DIR``.

    prometheus-client picks its value class once, when it is first imported; a gunicorn
    config module importing runner_mw (and so prometheus-client) runs before any hook.
    """
    if not getattr(prom_values.ValueClass, "_multiprocess", False):
        prom_values.ValueClass = prom_values.MultiProcessValue()  # type: ignore[no-untyped-call]


def _safely(record: Any, *args: Any) -> None:
    global _failed_once
    try:
        record(*args)
    except Exception:  # e.g. the multiprocess folder was removed under us
        if not _failed_once:
            _failed_once = True
            log.exception("runner_mw: recording a metric failed (reported once per process)")


def observe(route: str, backend: str, status: int, seconds: float) -> None:
    m = metrics()
    if m is not None:
        _safely(m.record, route, backend, status, seconds)


def inflight(delta: int) -> None:
    m = metrics()
    if m is not None:
        _safely(m.inflight.inc, delta)


def reloaded(ok: bool, generation: int) -> None:
    m = metrics()
    if m is not None:
        _safely(m.reloads.labels("ok" if ok else "failed").inc)
        if ok:
            _safely(m.generation.set, generation)


def render(start_response: StartResponse, snap: Any, rid: str) -> tuple[int, list[bytes]]:
    """The metrics page, or 404 when metrics are off or unavailable."""
    if not (AVAILABLE and snap.config.metrics_enabled):
        return 404, error(start_response, 404, "not_found", rid, detail="metrics are not enabled")
    assert prom is not None
    m = metrics()  # make sure this process's series exist even before its first request
    if m is not None:
        _safely(m.generation.set, snap.generation)  # generation 1 is never a "reload"
    if os.environ.get(MULTIPROC_ENV):
        registry = prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = prom.REGISTRY
    body = prom.generate_latest(registry)
    start_response(status_line(200), [
        ("Content-Type", prom.CONTENT_TYPE_LATEST),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("X-Request-Id", rid),
    ])
    return 200, [body]


# --------------------------------------------------------------------------- gunicorn


_owned_dir: str | None = None


def setup_multiprocess(server: Any = None, parent: str | None = None) -> str | None:
    """Master, before any worker forks (gunicorn ``on_starting``; safe to call earlier too,
    e.g. at the top of a gunicorn config module, and more than once): turn on multiprocess
    mode. Returns the folder, or None without prometheus-client.

    Without ``PROMETHEUS_MULTIPROC_DIR`` a private folder is made (``mkdtemp`` in ``parent``
    or the temporary folder: 0700, owned by the workers' user when gunicorn's ``user``/``group``
    differ) and removed at exit
    (``cleanup_multiprocess``, also registered with ``atexit``). Metric objects made before
    this call (``preload_app``) are made again in multiprocess mode; a host app's own metrics
    made before it stay per process (call this at the top of the gunicorn config to avoid that).
    """
    global _owned_dir
    if not AVAILABLE:
        return None
    given = os.environ.get(MULTIPROC_ENV)
    owner = os.environ.get(_OWNER_ENV, "")
    inherited = bool(given) and owner.endswith(f":{given}") and owner.split(":", 1)[0] != str(os.getpid())
    if given and not inherited:
        path = given  # the operator's folder, or the one this process made already
    else:
        # None yet, or one made by another master (USR2 re-exec): it goes when that one exits.
        path = tempfile.mkdtemp(prefix="runner-mw-metrics-", dir=parent)
        uid, gid = _worker_owner(server)
        if uid is not None and gid is not None:
            os.chown(path, uid, gid)
        os.environ[MULTIPROC_ENV] = path
        os.environ[_OWNER_ENV] = f"{os.getpid()}:{path}"
        _owned_dir = path
        atexit.register(cleanup_multiprocess)
    _use_multiprocess_values()
    if _metrics is not None:
        _remake()  # made before (preload_app): made again, in the folder
    return path


def worker_exited(pid: int) -> None:
    """Master, when a worker died (gunicorn ``child_exit``): drop its live gauges
    (``inflight_requests``), keep its counters (totals are not lost)."""
    if AVAILABLE and os.environ.get(MULTIPROC_ENV):
        try:
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        except OSError:
            log.exception("runner_mw: cleaning the metrics of worker %d failed", pid)


def cleanup_multiprocess() -> None:
    """Master, at exit (gunicorn ``on_exit``): remove the folder ``setup_multiprocess`` made.
    A no-op elsewhere (a worker, whose ``atexit`` handlers are the master's too)."""
    global _owned_dir
    path = _owned_dir
    owner = os.environ.get(_OWNER_ENV, "")
    if path is None or owner != f"{os.getpid()}:{path}":
        return
    _owned_dir = None
    shutil.rmtree(path, ignore_errors=True)


def _worker_owner(server: Any) -> tuple[int | None, int | None]:
    cfg = getattr(server, "cfg", None)
    uid, gid = getattr(cfg, "uid", None), getattr(cfg, "gid", None)
    if uid is None or gid is None or (uid, gid) == (os.geteuid(), os.getegid()):
        return None, None
    return int(uid), int(gid)
