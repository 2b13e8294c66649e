"""Prometheus metrics, exposed at ``/runner/-/metrics`` (same access rule as status).

Use it by installing the extra (``pip install 'runner_mw[metrics]'``); metrics are
then on unless ``metrics.enabled: false``. Under gunicorn with several workers, the
hooks of ``runner_mw.gunicorn`` call ``setup_multiprocess`` in the master (a private
temporary folder in ``PROMETHEUS_MULTIPROC_DIR``, removed at exit) and
``worker_exited`` when a worker dies (its live gauges disappear, its counters, histograms
and max gauges are folded into one ``*_archive.db`` file of each kind (``metricfold``), so recycled workers
leave no such files behind; a host's gauges of other modes keep theirs): every worker then
answers with the totals of all of them. An operator's own
``PROMETHEUS_MULTIPROC_DIR`` is used as is (and never removed).

Metrics (all prefixed ``runner_mw_``): ``requests_total{route,backend,status}`` (route
``asset``, ``execute``, or ``gateway`` for the gateway's own ``/runner/-/`` endpoints),
``upstream_seconds{route,backend}`` (histogram of the asset and execute routes: the gateway's
own endpoints call no runner), ``reloads_total{result}`` (swaps per
process: under gunicorn one HUP counts once per worker), ``config_generation`` and
``inflight_requests``. Recording a metric never fails a request.

Requests are recorded in memory and written to the metric values by a thread of the
worker every ``FLUSH_S``, by every scrape the worker answers, and at exit: a request's
five value writes (each a lock, a ``getpid`` and an mmap write in multiprocess mode)
cost about an eighth of a proxied request's instructions. So another worker's last
second may be missing from a scrape, and a worker killed with SIGKILL loses at most its
last second of counts.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import glob
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from runner_mw import metricfold
from runner_mw.pid import current as current_pid
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

#: Why metrics are off although the config turns them on (logged once, and the 404's detail).
MISSING = "prometheus-client is not installed: pip install 'runner_mw[metrics]'"
_warned = False


def warn_if_missing(enabled: bool) -> None:
    """Log once per process that an explicit ``metrics.enabled: true`` cannot be honoured."""
    global _warned
    if enabled and not AVAILABLE and not _warned:
        _warned = True
        log.warning("runner_mw: metrics.enabled is true but %s; /runner/-/metrics answers 404", MISSING)


FLUSH_S = 1.0


class _Pending:
    """Requests since the last flush. Request threads only append to deques (atomic under
    the GIL: no lock, no file write); ``flush`` adds them up and writes the sums."""

    def __init__(self) -> None:
        self.started: deque[None] = deque()
        self.finished: deque[tuple[str, str, int, float]] = deque()
        self.inflight = 0  # as of the last flush; only flush changes it
        self.failed = False  # the last write of the in-flight gauge failed
        self.lock = threading.Lock()  # one flush at a time
        self.flusher: threading.Thread | None = None


class _Metrics:
    def __init__(self, multiproc: bool) -> None:
        assert prom is not None
        self.pid = os.getpid()
        self.multiprocess = multiproc
        self.reopening = False
        self._make_collectors()
        self.pending = _Pending()

    def _make_collectors(self) -> None:
        assert prom is not None
        # Made unregistered, then registered together: a gauge's value file may fail to open
        # (the folder gone or read-only), and collectors registered before that would make
        # every later attempt fail too (prometheus-client refuses a name twice).
        self.requests = prom.Counter("runner_mw_requests_total", "Requests on the gateway's routes",
                                     ["route", "backend", "status"], registry=None)
        self.upstream = prom.Histogram(
            "runner_mw_upstream_seconds", "Time from request to response headers (execute: whole call)",
            ["route", "backend"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=None)
        self.reloads = prom.Counter("runner_mw_reloads_total", "Config reload attempts", ["result"],
                                    registry=None)
        self.generation = prom.Gauge("runner_mw_config_generation", "Generation of the config in use",
                                     multiprocess_mode="max", registry=None)
        self.inflight = prom.Gauge("runner_mw_inflight_requests", "Requests in flight on the gateway",
                                   multiprocess_mode="livesum", registry=None)
        for collector in self._collectors():
            prom.REGISTRY.register(collector)
        # A file this process always has in multiprocess mode (the in-flight gauge's, made
        # with the gauge): gone means the folder was emptied under us (see ``flush``).
        folder = os.environ.get(MULTIPROC_ENV, "")
        self.own_file = os.path.join(folder, f"gauge_livesum_{os.getpid()}.db") if self.multiprocess else ""

    def _collectors(self) -> tuple[Any, ...]:
        return (self.requests, self.upstream, self.reloads, self.generation, self.inflight)

    def after_fork(self) -> None:
        """A forked child starts with nothing pending (the parent's are the parent's) and
        no flusher (threads do not survive a fork)."""
        if self.pid != os.getpid():
            self.pid = os.getpid()
            self.pending = _Pending()

    def start_flusher(self) -> None:
        """Start this process's flusher. Where no thread can be started (a process or
        thread limit), write now instead: the next request tries again."""
        pending = self.pending
        with pending.lock:  # claimed here, started outside it (see logs._start_writer)
            if pending.flusher is not None:
                return
            thread = pending.flusher = threading.Thread(target=self._flush_every, args=(pending,),
                                                        name="runner_mw-metrics", daemon=True)
        try:
            thread.start()
        except RuntimeError:
            with pending.lock:
                pending.flusher = None
            self.flush()

    def _flush_every(self, pending: _Pending) -> None:
        while _metrics is self and pending is self.pending:  # else replaced: nothing to do
            time.sleep(FLUSH_S)
            _safely(self.flush)

    def flush(self) -> None:
        """Write what requests recorded since the last flush. Each series is written on its
        own: one that fails (a full disk, say) loses its own increment, not the others'."""
        pending = self.pending
        with pending.lock:
            # One stat a second: this process's files removed under it (see _reopen).
            writable = not self.own_file or os.path.exists(self.own_file) or _safely(self._reopen)
            counts: dict[tuple[str, str, int], int] = {}
            timed: dict[tuple[str, str], list[float]] = {}
            ended = 0
            # Finished first, then started: a request that ends in between counts as still
            # in flight until the next flush, never as ended before it began.
            for _ in range(len(pending.finished)):
                route, backend, status, took = pending.finished.popleft()
                counts[(route, backend, status)] = counts.get((route, backend, status), 0) + 1
                if route != LOCAL_ROUTE:
                    timed.setdefault((route, backend), []).append(took)
                ended += 1
            began = len(pending.started)
            for _ in range(began):
                pending.started.popleft()
            # The gauge is set to the whole count, not moved by a delta: a failed write is
            # made good by the next flush that succeeds.
            pending.inflight += began - ended
            if not writable:  # nowhere to write yet: these counts are lost, the gauge is not
                pending.failed = True
                return
            if began or ended or pending.failed:
                pending.failed = not _safely(self.inflight.set, pending.inflight)
            for (route, backend, status), n in counts.items():
                _safely(self._count, route, backend, status, n)
            for (route, backend), seconds in timed.items():
                _safely(self._time, route, backend, seconds)

    def _reopen(self) -> None:
        """This process's value files were removed (a cleaner of temporary files; the master
        makes the folder again): its writes would go to files no scrape reads. Start new
        files; what the removed ones held is lost."""
        assert prom is not None
        if not self.reopening:  # said once per removal, not at every retry
            self.reopening = True
            log.warning("runner_mw: this worker's metric files in %s were removed; counting "
                        "again from zero in new files", os.path.dirname(self.own_file))
        self.unregister()
        prom_values.ValueClass = prom_values.MultiProcessValue()  # type: ignore[no-untyped-call]
        self._make_collectors()  # raises while the folder is missing: tried again next flush
        self.reopening = False
        self.pending.failed = True  # the new in-flight gauge reads 0: written at this flush

    # labels() inside the guard too: a new series makes a value, which may touch the files.
    def _count(self, route: str, backend: str, status: int, n: int) -> None:
        self.requests.labels(route, backend, str(status)).inc(n)

    def _time(self, route: str, backend: str, seconds: list[float]) -> None:
        _observe_all(self.upstream.labels(route, backend), seconds)

    def unregister(self) -> None:
        assert prom is not None
        for collector in self._collectors():
            with contextlib.suppress(KeyError):
                prom.REGISTRY.unregister(collector)


_metrics: _Metrics | None = None
_lock = threading.Lock()
_failed_once = False
#: Seconds between two attempts to make the metric objects when making them failed.
RETRY_S = 10.0
_failed_at: float | None = None


def metrics() -> _Metrics | None:
    """The process's metric objects, or None without prometheus-client or while they cannot
    be made (a multiprocess folder that is missing or read-only: tried again every ``RETRY_S``).

    Made on first use; made again when the mode they were made in is not the one wanted now
    (``PROMETHEUS_MULTIPROC_DIR`` set after they were made, e.g. a master that imported the
    app, with ``preload_app``, before its ``on_starting`` hook ran).
    """
    m = _metrics
    if m is not None and m.pid == current_pid():
        return m
    if not AVAILABLE or (_failed_at is not None and time.monotonic() - _failed_at < RETRY_S):
        return None
    return _remake()


def _remake() -> _Metrics | None:
    global _metrics, _failed_at
    with _lock:
        wanted = bool(os.environ.get(MULTIPROC_ENV))
        m = _metrics
        if m is not None and m.multiprocess == wanted:
            m.after_fork()  # multiprocess values switch files by themselves
            return m
        if wanted:
            _use_multiprocess_values()
        if m is not None:
            m.unregister()
            _metrics = None
        try:
            _metrics = _Metrics(wanted)
        except Exception:
            # Recording a metric never fails a request: without them, requests go on uncounted.
            _failed_at = time.monotonic()
            _report_once()
            return None
        _failed_at = None
        return _metrics


def _use_multiprocess_values() -> None:
    """Make metrics created from now on live in ``PROMETHEUS_MULTIPROC_DIR``.

    prometheus-client picks its value class once, when it is first imported; a gunicorn
    config module importing runner_mw (and so prometheus-client) runs before any hook.
    """
    if not getattr(prom_values.ValueClass, "_multiprocess", False):
        prom_values.ValueClass = prom_values.MultiProcessValue()  # type: ignore[no-untyped-call]


def _safely(record: Any, *args: Any) -> bool:
    """``record(*args)``; False (logged once per process) when it failed."""
    try:
        record(*args)
    except Exception:  # e.g. the multiprocess folder was removed under us
        _report_once()
        return False
    return True


def _report_once() -> None:
    """Log the exception being handled, the first time in this process."""
    global _failed_once
    if not _failed_once:
        _failed_once = True
        log.exception("runner_mw: recording a metric failed (reported once per process)")


def _observe_all(child: Any, seconds: list[float]) -> None:
    """``child.observe(s)`` for each of ``seconds``, but with one write per bucket used and
    one for the sum, through the histogram's own bucket values when they are there."""
    buckets, total, bounds = (getattr(child, "_buckets", None), getattr(child, "_sum", None),
                              getattr(child, "_upper_bounds", None))
    if buckets is None or total is None or bounds is None:
        for s in seconds:  # another prometheus-client layout: one observation at a time
            child.observe(s)
        return
    per_bucket = [0] * len(bounds)
    for s in seconds:
        per_bucket[bisect.bisect_left(bounds, s)] += 1  # observe(): the first bound >= s
    for i, n in enumerate(per_bucket):
        if n:
            buckets[i].inc(n)
    total.inc(sum(seconds))


def started() -> bool:
    """A request on the gateway's routes began (``inflight_requests``): True when counted
    (then, and only then, call ``finished`` for it). Never raises."""
    m = metrics()
    if m is None:
        return False
    m.pending.started.append(None)
    if m.pending.flusher is None:
        _safely(m.start_flusher)
    return True


#: The route label of the gateway's own endpoints (healthz, status, metrics): counted, not timed.
LOCAL_ROUTE = "gateway"


def finished(route: str, backend: str, status: int, seconds: float) -> None:
    """A request that ``started`` ended: counted in ``requests_total`` and timed."""
    m = metrics()
    if m is not None:
        m.pending.finished.append((route, backend, status, seconds))


def flush() -> None:
    """Write what this process recorded so far (the flusher thread does it every ``FLUSH_S``)."""
    m = _metrics
    if m is not None and m.pid == current_pid():
        _safely(m.flush)


atexit.register(flush)  # a worker that exits cleanly loses nothing


def reloaded(ok: bool, generation: int, *, count: bool = True) -> None:
    """A reload attempt's outcome; ``count=False`` sets the generation only (a worker that
    takes over at boot a config swapped before it existed: no attempt of its own)."""
    m = metrics()
    if m is not None:
        if count:
            _safely(m.reloads.labels("ok" if ok else "failed").inc)
        if ok:
            _safely(m.generation.set, generation)


def render(start_response: StartResponse, snap: Any, rid: str) -> tuple[int, list[bytes]]:
    """The metrics page, or 404 when metrics are off or unavailable."""
    if not (AVAILABLE and snap.config.metrics_enabled):
        detail = "metrics are not enabled" if AVAILABLE else MISSING
        return 404, error(start_response, 404, "not_found", rid, detail=detail)
    assert prom is not None
    m = metrics()  # make sure this process's series exist even before its first request
    if m is not None:
        _safely(m.generation.set, snap.generation)  # generation 1 is never a "reload"
        _safely(m.flush)  # this worker's figures up to now
    folder = os.environ.get(MULTIPROC_ENV)
    if folder:
        registry = prom.CollectorRegistry()
        registry.register(_SizedFiles(folder))
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


class _SizedFiles:
    """prometheus-client's ``MultiProcessCollector`` over the files that hold values.

    A process creates its file, then sizes it; a scrape in that instant read 0 bytes and
    raised ``struct.error`` (the scrape got a 500). A file not yet sized holds no value."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def collect(self) -> Any:
        with metricfold.folder_lock(self.folder, exclusive=False):  # not while a dead worker's are folded
            files = []
            for path in glob.glob(os.path.join(glob.escape(self.folder), "*.db")):  # no dotfiles
                try:
                    if os.stat(path).st_size >= _HEADER_BYTES:
                        files.append(path)
                except FileNotFoundError:  # removed since (a dead worker's live gauge)
                    continue
            return multiprocess.MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]


_HEADER_BYTES = 8  # a sized file starts with its used length (4 bytes) and padding


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
        if not (os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)):
            # Requests still work (nothing is counted): said at start, not only at the first one.
            getattr(server, "log", log).error(
                "runner_mw: %s=%s is not a folder this process can write: no metrics until it is",
                MULTIPROC_ENV, path)
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
    (``inflight_requests``), fold its counters, histograms and max gauges into one file of
    each kind (totals are not lost) and remove its files."""
    folder = os.environ.get(MULTIPROC_ENV)
    if AVAILABLE and folder:
        try:
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
            metricfold.fold(folder, pid)
        except Exception:
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
