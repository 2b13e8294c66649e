"""A Flask app hosting an extension UI through runner_mw: the quick start's demo.

Run it (from the repository root, a runner on 127.0.0.1:8085, e.g. ``runner-mw devrunner``)::

    gunicorn -c config/gunicorn.conf.py examples.wsgi_app:application

``/`` shows the sample extension in a sandboxed iframe served same-origin through
``/runner``; the page relays the extension's calls to ``/v1/execute``
(``static/runner-bridge.js``), and ``execute_hook`` binds them to the signed-in user's
tenant (``host.py``). The config file is ``$RUNNER_MW_CONFIG`` (default
``config/runner.yaml`` of this checkout, whatever the working directory).
"""

from __future__ import annotations

import os
from pathlib import Path

from flask import Flask, request

from examples import host
from runner_mw import RunnerMiddleware

CONFIG = os.path.abspath(os.environ.get("RUNNER_MW_CONFIG")
                         or Path(__file__).resolve().parent.parent / "config" / "runner.yaml")

app = Flask(__name__)  # serves examples/static/ at /static


@app.get("/")
def index() -> tuple[str, list[tuple[str, str]]]:
    return host.page(request.environ, static_url=request.script_root + "/static"), host.PAGE_HEADERS


# Everything but /runner/* and /v1/execute still reaches Flask.
app.wsgi_app = RunnerMiddleware(app.wsgi_app, CONFIG, execute_hook=host.bind_to_caller)
application = app
