"""``RunnerMiddleware``: the extension-runner gateway inside any WSGI app.

Use it to wrap a Flask, Pyramid or plain WSGI app::

    from runner_mw import RunnerMiddleware
    app.wsgi_app = RunnerMiddleware(app.wsgi_app, "config/runner.yaml")   # Flask

``/runner/*`` and ``/v1/execute`` go to the active backend of the YAML file;
every other request reaches ``app`` with its environ unchanged but for two added
keys: ``runner_mw.ui_url`` (builds extension iframe URLs) and ``runner_mw.execute_url``
(where pages post execute calls: the middleware's own mount point, which may not be the
app's when a dispatcher sits between them). SIGHUP, or
``middleware.reload()``, swaps in an edited file without a restart.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from runner_mw import access as acc
from runner_mw import metrics
from runner_mw.assets import handle_asset
from runner_mw.backends.base import script_path
from runner_mw.config import Config
from runner_mw.execute import ExecuteHook, handle_execute
from runner_mw.loader import config_from_mapping
from runner_mw.logs import bind_request, log_checked, setup_logging
from runner_mw.paths import InvalidPath, canonical_tail, encode
from runner_mw.responses import error, json_response, request_id
from runner_mw.snapshot import ReloadOutcome, SnapshotStore
from runner_mw.status import HealthCache, status_document

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication

log = logging.getLogger("runner_mw")
access_log = logging.getLogger("runner_mw.access")

EXECUTE_PATH = "/v1/execute"
PREFIX = "/runner"


class RunnerMiddleware:
    """Route ``/runner/*`` and ``/v1/execute`` to the configured runner backend.

    Parameters:
        app: the wrapped WSGI app; gets every other request.
        config: path of the YAML file (reloadable), or a mapping / ``Config`` kept in code.
        authorize: ``authorize(environ) -> bool`` decides access to /v1/execute and
            status instead of ``access.networks``/``tokens`` (e.g. from the app's session).
        execute_hook: ``execute_hook(environ, envelope) -> envelope`` binds tenant, user and
            install to the caller; raise ``PermissionError`` for a 403.
        reload_signal: install a SIGHUP handler that reloads the file (main thread only).

    Raises ``runner_mw.ConfigError`` when the first config is invalid: a server must not
    start with a broken file (later reloads keep the last good one instead); ``RuntimeError``
    when its backend cannot be built (a plugin's text, redacted; the traceback is logged).
    """

    def __init__(
        self,
        app: WSGIApplication,
        config: str | os.PathLike[str] | Mapping[str, Any] | Config,
        *,
        authorize: acc.Authorize | None = None,
        execute_hook: ExecuteHook | None = None,
        reload_signal: bool = True,
    ) -> None:
        self.app = app
        self.authorize = authorize
        self.execute_hook = execute_hook
        from runner_mw import reload as _reload

        path: str | None = None
        if isinstance(config, Config):
            cfg = config
        elif isinstance(config, Mapping):
            cfg = config_from_mapping(config)
        else:
            path = os.fspath(config)
            cfg = _reload.initial_config(path)
        setup_logging(cfg)
        # Said only when the file asks for metrics: the default is "on if installed".
        metrics.warn_if_missing(cfg.data.get("metrics", {}).get("enabled") is True)
        self.store = SnapshotStore(cfg, path=path)
        self._health = HealthCache()
        self._mounts: dict[str, tuple[Callable[..., str], str]] = {}
        _reload.attach(self, signal_handler=reload_signal and path is not None)

    # ------------------------------------------------------------------ WSGI

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == EXECUTE_PATH or (path[:7] == PREFIX and (len(path) == 7 or path[7] == "/")):
            return self._ours(environ, start_response, path)
        script = environ.get("SCRIPT_NAME", "")
        mount = self._mounts.get(script)
        if mount is None:
            mount = self._mount(script)
        environ["runner_mw.ui_url"], environ["runner_mw.execute_url"] = mount
        return self.app(environ, start_response)

    def _mount(self, script_name: str) -> tuple[Callable[..., str], str]:
        # Made once per mount point: the pass-through path stays allocation-free.
        # Encoded as ui_url encodes it: a mount may come from a proxy's header (X-Script-Name,
        # X-Forwarded-Prefix), and "//host" must not make the URL another origin's.
        mount = (partial(self.ui_url, script_name=script_name), script_path(script_name) + EXECUTE_PATH)
        if len(self._mounts) < 64:
            self._mounts[script_name] = mount
        return mount

    def _ours(self, environ: dict[str, Any], start_response: StartResponse, path: str) -> Iterable[bytes]:
        started = time.monotonic()
        bind_request(environ)  # this request's cookies and tokens are redacted from its log lines
        rid = request_id(environ)
        snap = self.store.current
        snap.enter()
        route = ("execute" if path == EXECUTE_PATH
                 else metrics.LOCAL_ROUTE if path[:9] == "/runner/-" and (len(path) == 9 or path[9] == "/")
                 else "asset")  # the label of metrics and access lines
        finished = False
        # Only a request whose start was counted counts its end (metrics may come back between).
        measure = snap.config.metrics_enabled and metrics.AVAILABLE and metrics.started()

        def done(status: int) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            snap.leave()
            seconds = time.monotonic() - started
            if measure:
                metrics.finished(route, snap.config.backend, status, seconds)
            if snap.config.access_log:
                _log_request(route, snap.config.backend, status, seconds, rid, environ)

        try:
            if route == "execute":
                # "POST /v1/execute" as sent, at the root, no query (nearly every call): nothing
                # there for canonical_tail to refuse, and it would cost a request 3 %.
                if ((environ.get("RAW_URI") or environ.get("REQUEST_URI") or path) != path
                        or environ.get("SCRIPT_NAME") or environ.get("QUERY_STRING")):
                    try:
                        canonical_tail(environ, path, 2)
                    except InvalidPath:
                        done(400)
                        return error(start_response, 400, "invalid_path", rid)
                status, body = handle_execute(environ, start_response, snap, rid,
                                              self.authorize, self.execute_hook)
                done(status)
                return body
            result: Iterable[bytes] = self._runner_route(environ, start_response, snap, rid, path, done)
            return result
        except Exception:
            # Nothing may take a worker down; the client gets no exception text.
            log.exception("internal error on %s (request %s)", route, rid)
            done(500)
            return error(start_response, 500, "internal_error", rid)

    def _runner_route(self, environ: dict[str, Any], start_response: StartResponse, snap: Any,
                      rid: str, path: str, done: Any) -> Any:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            done(405)
            return error(start_response, 405, "method_not_allowed", rid, headers=[("Allow", "GET, HEAD")])
        try:
            segments = canonical_tail(environ, path, 1)
        except InvalidPath as exc:
            log.info("refused path (request %s): %s", rid, exc)
            done(400)
            return error(start_response, 400, "invalid_path", rid)
        if segments and segments[0] == "-":
            return self._local(environ, start_response, snap, rid, segments[1:], done)
        tail = encode(segments)
        if not tail or not tail.startswith(snap.config.asset_prefixes):  # a tuple: one C call
            done(404)
            return error(start_response, 404, "not_found", rid)
        return handle_asset(environ, start_response, snap, rid, tail, done)

    def _local(self, environ: dict[str, Any], start_response: StartResponse, snap: Any, rid: str,
               rest: list[str], done: Any) -> Any:
        """The gateway's own endpoints under ``/runner/-/``."""
        if rest == ["healthz"]:
            done(200)
            return json_response(start_response, 200, {"ok": True}, rid)
        if rest in (["status"], ["metrics"]):
            verdict = acc.check_access(environ, snap.config.access, self.authorize)
            if verdict != acc.ALLOW:
                done(verdict)
                code = "unauthorized" if verdict == acc.UNAUTHORIZED else "forbidden"
                extra = [("WWW-Authenticate", 'Bearer realm="runner_mw"')] if verdict == 401 else []
                return error(start_response, verdict, code, rid, headers=extra)
            if rest == ["status"]:
                doc = status_document(snap, self.store.last_reload, self._health.get(snap))
                done(200)
                return json_response(start_response, 200, doc, rid)
            status, body = metrics.render(start_response, snap, rid)
            done(status)
            return body
        done(404)
        return error(start_response, 404, "not_found", rid)

    # ------------------------------------------------------------------ API

    def ui_url(self, extension_id: str, content_hash: str, path: str = "/",
               tenant: str | None = None, *, script_name: str = "") -> str:
        """The iframe URL of an extension's UI on the active backend (see ``RunnerBackend.ui_url``)."""
        return self.store.current.backend.ui_url(extension_id, content_hash, path, tenant,
                                                 script_name=script_name)

    def reload(self) -> ReloadOutcome:
        """Re-read the config file now; a bad file keeps the current config (see ``last_reload``)."""
        return self.store.reload()

    def close(self) -> None:
        """Close the current backend's connections (tests, shutdown)."""
        self.store.current.backend.close()


_PLAIN_METHODS = frozenset({"GET", "HEAD", "POST"})
_METHOD = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")


def _log_request(route: str, backend: str, status: int, seconds: float, rid: str,
                 environ: Mapping[str, Any]) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    method = environ.get("REQUEST_METHOD")
    if method in _PLAIN_METHODS:
        # Every field is the gateway's own or checked (the request id is sanitised): no
        # secret can be in it, so it skips the redaction pass (the hot path).
        log_checked(access_log, f"request route={route} backend={backend} method={method} "
                                f"status={status} upstream_ms={seconds * 1000:.1f} request_id={rid}")
    else:
        # The client's own word (werkzeug's server takes any method without a space): quoted
        # unless it is a plain token, so that escape codes and line breaks cannot reach a terminal.
        shown = method if isinstance(method, str) and _METHOD.fullmatch(method) else repr(method)[:40]
        access_log.info("request route=%s backend=%s method=%s status=%d upstream_ms=%.1f request_id=%s",
                        route, backend, shown, status, seconds * 1000, rid)


__all__ = ["RunnerMiddleware"]
