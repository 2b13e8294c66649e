"""What both example apps share: who the caller is, which extensions it may run, the host page.

Replace ``current_user`` and ``INSTALLS`` with your app's session and database. The rest is
what a host app needs around ``RunnerMiddleware``:

- ``bind_to_caller`` is the ``execute_hook``: the server, not the browser, decides which
  tenant's code runs, for which user, and only for an extension that tenant installed;
- ``page`` renders the host page: the extension UI in ``<iframe sandbox="allow-scripts">``
  (an opaque origin: it cannot read the host's cookies nor call its APIs as the user) and
  ``static/runner-bridge.js``, which relays the frame's calls to ``/v1/execute``; send it
  with ``PAGE_HEADERS`` (no framing by another site, whose page could take the iframe's place).
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Mapping
from typing import Any

from runner_mw.devrunner import SAMPLE_CONTENT_HASH, SAMPLE_EXTENSION_ID

#: The demo's signed-in tenant and its one install: the devrunner's sample bundle by default; set
#: these to an extension installed on a real runner (scripts/dev-runner.sh) to show that one.
TENANT = os.environ.get("RUNNER_MW_DEMO_TENANT") or "demo-tenant"
EXTENSION = os.environ.get("RUNNER_MW_DEMO_EXTENSION") or SAMPLE_EXTENSION_ID
CONTENT_HASH = os.environ.get("RUNNER_MW_DEMO_CONTENT_HASH") or SAMPLE_CONTENT_HASH

#: tenant -> {extension id: its install}. Demo data: your database. Everything the runner is
#: told about an install comes from here, never from the browser.
INSTALLS: dict[str, dict[str, dict[str, Any]]] = {
    TENANT: {EXTENSION: {"content_hash": CONTENT_HASH, "install_id": f"{TENANT}/{EXTENSION}",
                         "config": {}, "providers": []}},
}


def current_user(environ: Mapping[str, Any]) -> dict[str, str] | None:
    """The signed-in user, from your session. Demo: everyone is the demo user of ``TENANT``."""
    return {"user_id": "demo-user", "user_email": "demo@example.com", "user_name": "Demo User",
            "user_type": "internal", "tenant": TENANT}


def bind_to_caller(environ: Mapping[str, Any], envelope: dict[str, Any]) -> dict[str, Any]:
    """``execute_hook``: run the caller's tenant's install, whatever the browser sent.

    Every field this does not set reaches the runner as the browser wrote it: the extension's
    request (``http``) is the browser's to choose; who runs it, which install with which
    config and capabilities, and the resource limits are not.
    """
    user = current_user(environ)
    if user is None:
        raise PermissionError("not signed in")  # the middleware answers 403
    context = envelope.get("context")
    if not isinstance(context, dict):
        return envelope  # the middleware answers 400 invalid_request
    installed = INSTALLS.get(user["tenant"], {})
    extension = context.get("extension_id")
    if not isinstance(extension, str) or extension not in installed:
        raise PermissionError("extension not installed for this tenant")
    install = installed[extension]
    context.update(tenant_id=user["tenant"], content_hash=install["content_hash"],
                   install_id=install["install_id"], config=dict(install["config"]))
    context.pop("version_id", None)  # the install's, which content_hash already names
    envelope["providers"] = list(install["providers"])
    envelope.pop("secret_envelope", None)  # an install's secrets are sealed server-side, if any
    # The runner's own defaults for memory and fuel; the middleware bounds timeout_ms.
    limits = envelope.get("limits")
    envelope["limits"] = {"timeout_ms": limits.get("timeout_ms")} if isinstance(limits, dict) else {}
    envelope["user"] = {k: v for k, v in user.items() if k != "tenant"}
    return envelope


PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>runner_mw demo</title>
  <script src="{bridge}"></script>
  <style>body {{ font-family: sans-serif; margin: 2em; }}
         iframe {{ width: 100%; height: 22em; border: 1px solid #ccc; }}</style>
</head>
<body>
  <h1>Host app</h1>
  <p>Signed in as {user} (tenant {tenant}). The extension below is served through
     <code>/runner</code> and calls its code through this page and <code>/v1/execute</code>.</p>
  <iframe id="extension" title="Extension {extension}" src="{src}"
          sandbox="allow-scripts" referrerpolicy="no-referrer"
          data-runner-extension="{extension}" data-content-hash="{content_hash}"
          data-tenant="{tenant}" data-execute-url="{execute_url}"></iframe>
</body>
</html>
"""


#: Send these with the host page. Framed by another site, the page's extension iframe can be
#: navigated by that site's top-level page (browsers let a page navigate any frame below it)
#: to a document of its own, which then talks to the bridge as the extension would: calls
#: made as the signed-in user, replies read by that site.
PAGE_HEADERS = [("Content-Security-Policy", "frame-ancestors 'self'"), ("X-Frame-Options", "SAMEORIGIN")]


def page(environ: Mapping[str, Any], *, static_url: str) -> str:
    """The host page for the caller: one sandboxed iframe per installed extension (here, one).
    Its bridge posts to ``runner_mw.execute_url``, the middleware's own mount point: the app's
    script root is another path when a dispatcher mounts the app below the middleware."""
    user = current_user(environ)
    if user is None:
        return "<!doctype html><p>Please sign in.</p>"
    extension, install = next(iter(INSTALLS[user["tenant"]].items()))
    content_hash = install["content_hash"]
    ui_url: Callable[..., str] = environ["runner_mw.ui_url"]  # added by RunnerMiddleware
    src = ui_url(extension, content_hash, path="/", tenant=user["tenant"])
    values = {"bridge": static_url + "/runner-bridge.js", "src": src, "extension": extension,
              "content_hash": content_hash, "tenant": user["tenant"], "user": user["user_name"],
              "execute_url": environ["runner_mw.execute_url"]}
    return PAGE.format(**{k: html.escape(v) for k, v in values.items()})
