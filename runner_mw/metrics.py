"""Prometheus metrics, exposed at ``/runner/-/metrics`` (same access rule as status).

Use it by installing the extra (``pip install 'runner_mw[metrics]'``); metrics are
then on unless ``metrics.enabled: false``. Under gunicorn with several workers,
set ``PROMETHEUS_MULTIPROC_DIR`` (the shipped gunicorn hooks do, in a private
temporary folder, and mark dead workers so their live gauges disappear): every
worker then answers with the totals of all of them.

Metrics (all prefixed ``runner_mw_``): ``requests_total{route,backend,status}``,
``upstream_seconds{route,backend}`` (histogram), ``reloads_total{result}``,
``config_generation`` and ``inflight_requests``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from runner_mw.responses import error, status_line

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse

try:
    import prometheus_client as prom
    from prometheus_client import multiprocess
except ImportError:  # the extra is not installed: metrics are simply off
    prom = None  # type: ignore[assignment]

AVAILABLE = prom is not None


class _Metrics:
    def __init__(self) -> None:
        assert prom is not None
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


_metrics: _Metrics | None = None


def metrics() -> _Metrics | None:
    """The process's metric objects (made once), or None without prometheus-client."""
    global _metrics
    if _metrics is None and AVAILABLE:
        _metrics = _Metrics()
    return _metrics


def observe(route: str, backend: str, status: int, seconds: float) -> None:
    m = metrics()
    if m is not None:
        m.requests.labels(route, backend, str(status)).inc()
        m.upstream.labels(route, backend).observe(seconds)


def inflight(delta: int) -> None:
    m = metrics()
    if m is not None:
        m.inflight.inc(delta)


def reloaded(ok: bool, generation: int) -> None:
    m = metrics()
    if m is not None:
        m.reloads.labels("ok" if ok else "failed").inc()
        if ok:
            m.generation.set(generation)


def render(start_response: StartResponse, snap: Any, rid: str) -> tuple[int, list[bytes]]:
    """The metrics page, or 404 when metrics are off or unavailable."""
    if not (AVAILABLE and snap.config.metrics_enabled):
        return 404, error(start_response, 404, "not_found", rid, detail="metrics are not enabled")
    assert prom is not None
    metrics()  # make sure this process's series exist even before its first request
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
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
