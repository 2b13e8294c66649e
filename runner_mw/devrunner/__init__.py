"""A development stand-in for the extension runner: its HTTP contract, an echo for an extension.

Use it to develop or test a host app and ``runner_mw`` without the real runner (the Rust service
``ee/runner`` of Nine-Minds/alga-psa): ``python -m runner_mw.devrunner`` listens on
127.0.0.1:8085, the local Docker convention for the runner. It speaks the runner's HTTP contract
faithfully (status codes, headers, the execute envelope, the UI asset rules, even the
``Cache-Control: immutable`` the runner puts on every response) but it does NOT run WebAssembly:
``POST /v1/execute`` answers with a JSON echo of the call (tenant, extension, method, path with
query, body text, request id). It checks no credential: never expose it.

The sample bundle (``SAMPLE_EXTENSION_ID`` at ``SAMPLE_CONTENT_HASH``) is a page made to run in
``<iframe sandbox="allow-scripts">``: an opaque origin, no ``allow-same-origin``, so it cannot
call ``/v1/execute`` itself. It asks the host page instead, with ``postMessage``:

- page -> host (``window.parent.postMessage(msg, "*")``; the page cannot know the host's origin,
  and the message holds nothing secret)::

      {"type": "runner_mw.execute", "id": "<unique string>",
       "http": {"method": "POST", "path": "/hello", "body": "<text>"}}

- host -> page (``iframe.contentWindow.postMessage(msg, "*")``: a sandboxed frame's origin is
  ``"null"``)::

      {"type": "runner_mw.result", "id": "<the same id>", "status": <int>, "body": "<text>"}

  ``status`` is the envelope's ``status`` (or the gateway's error status), ``body`` the envelope's
  ``body_b64`` decoded as UTF-8 text (or the gateway's error body).

The host must accept a ``runner_mw.execute`` message only when ``event.source`` is that iframe's
``contentWindow``, and must choose the tenant and the extension itself (from its session and the
iframe it created), never from the message: the page only supplies the HTTP part. The page, in
turn, accepts results only from ``window.parent`` and for ids it sent; it shows the answer in
``#answer`` (``Extension says: <text> (tenant <id>, path /hello)``) and has a static ``#loaded``.
"""

from __future__ import annotations

from runner_mw.devrunner.app import (
    SAMPLE_BUNDLES,
    SAMPLE_CONTENT_HASH,
    SAMPLE_EXTENSION_ID,
    DevRunnerApp,
    make_app,
)
from runner_mw.devrunner.server import HEADER_LIST_KEY, DevServer, main, make_server, serve

__all__ = [
    "HEADER_LIST_KEY",
    "SAMPLE_BUNDLES",
    "SAMPLE_CONTENT_HASH",
    "SAMPLE_EXTENSION_ID",
    "DevRunnerApp",
    "DevServer",
    "main",
    "make_app",
    "make_server",
    "serve",
]
