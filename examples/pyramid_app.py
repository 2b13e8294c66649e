"""The demo of ``wsgi_app.py`` as a Pyramid app.

Run it under gunicorn (``gunicorn -c config/gunicorn.conf.py examples.pyramid_app:application``)
or through PasteDeploy, where the middleware is a filter of the pipeline (``examples/pyramid.ini``:
``pserve examples/pyramid.ini``); ``main`` is the app factory both use.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from pyramid.config import Configurator
from pyramid.request import Request
from pyramid.response import Response

from examples import host
from runner_mw import RunnerMiddleware

HERE = Path(__file__).resolve().parent
CONFIG = os.path.abspath(os.environ.get("RUNNER_MW_CONFIG") or HERE.parent / "config" / "runner.yaml")


def index(request: Request) -> Response:
    return Response(host.page(request.environ, static_url=request.script_name + "/static"),
                    headerlist=[("Content-Type", "text/html; charset=UTF-8"), *host.PAGE_HEADERS])


def main(global_config: Any = None, **settings: Any) -> Any:
    """The Pyramid app, not wrapped: PasteDeploy's ``app`` factory (the ini adds the filter)."""
    with Configurator(settings=settings) as config:
        config.add_route("index", "/")
        config.add_view(index, route_name="index")
        config.add_static_view("static", str(HERE / "static"))
        return config.make_wsgi_app()


_build_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    # ``application`` is built on first use (gunicorn's ``examples.pyramid_app:application``),
    # not on import: PasteDeploy imports this module only for ``main`` and adds the ini's own
    # filter; a second, hidden middleware would read another file and answer every SIGHUP.
    if name != "application":
        raise AttributeError(name)
    with _build_lock:  # once, also when two threads ask at the same moment
        if "application" not in globals():
            try:
                app = RunnerMiddleware(main(), CONFIG, execute_hook=host.bind_to_caller)
            except AttributeError as exc:  # would read as "no attribute 'application'"
                raise RuntimeError(f"cannot build the application: {exc}") from exc
            globals()["application"] = app
    return globals()["application"]
