"""PasteDeploy: ``examples/pyramid.ini`` loads a pipeline with runner_mw's filter and serves through it.

The ini says ``use = egg:runner_mw``: when runner_mw is not installed in the test venv (the suite
also runs from a plain checkout), a stand-in ``.dist-info`` declaring the same entry point as
setup.py is put on ``sys.path`` so the file is loaded exactly as written.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import re
import sys
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import requests
from paste.deploy import loadapp
from werkzeug.serving import make_server

from runner_mw import ConfigError, RunnerMiddleware
from runner_mw.devrunner import SAMPLE_CONTENT_HASH, SAMPLE_EXTENSION_ID, DevServer
from runner_mw.devrunner import make_app as make_runner_app
from runner_mw.devrunner import make_server as make_runner_server
from runner_mw.paste import filter_app_factory, resolve

ROOT = Path(__file__).resolve().parent.parent
INI = ROOT / "examples" / "pyramid.ini"
ENTRY_POINT = "main=runner_mw.paste:filter_app_factory"
T = 10.0

# webob (Pyramid) imports cgi, deprecated since Python 3.11.
pytestmark = pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")


def envelope(tenant: str, extension: str = SAMPLE_EXTENSION_ID) -> dict[str, Any]:
    return {"context": {"tenant_id": tenant, "extension_id": extension, "content_hash": SAMPLE_CONTENT_HASH},
            "http": {"method": "POST", "path": "/hello", "body_b64": base64.b64encode(b"hi").decode()}}


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> Iterator[DevServer]:
    """A devrunner on a free port, named by the environment the shipped config reads."""
    server = make_runner_server("127.0.0.1", 0, make_runner_app()).start()
    for name in ("RUNNER_MW_CONFIG", "RUNNER_SERVICE_TOKEN", "EXT_GATEWAY_TIMEOUT_MS",
                 "RUNNER_MW_DEMO_TENANT", "RUNNER_MW_DEMO_EXTENSION", "RUNNER_MW_DEMO_CONTENT_HASH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RUNNER_BACKEND", "docker")
    monkeypatch.setenv("RUNNER_DOCKER_HOST", server.url)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def egg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make ``egg:runner_mw`` resolvable: the installed distribution, or a stand-in of it."""
    monkeypatch.syspath_prepend(str(ROOT))  # examples.* (the ini's app and execute_hook)
    try:
        metadata.distribution("runner_mw")
        return
    except metadata.PackageNotFoundError:
        pass
    info = tmp_path / "runner_mw-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: runner_mw\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(f"[paste.filter_app_factory]\n{ENTRY_POINT}\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(T)
        server.server_close()


def test_setup_declares_the_entry_point_the_ini_uses() -> None:
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert f'"paste.filter_app_factory": ["{ENTRY_POINT}"]' in text
    assert re.search(r"^use = egg:runner_mw$", INI.read_text(encoding="utf-8"), re.M)
    try:
        found = metadata.entry_points(group="paste.filter_app_factory", name="main")
    except metadata.PackageNotFoundError:  # pragma: no cover
        found = ()
    ours = [ep for ep in found if ep.value == ENTRY_POINT.split("=", 1)[1]]
    if ours:  # installed (pip install -e .): the entry point loads our factory
        assert ours[0].load() is filter_app_factory


def test_ini_pipeline_serves_page_assets_and_execute(runner: DevServer, egg: None) -> None:
    imported_before = "examples.pyramid_app" in sys.modules
    app = loadapp(f"config:{INI}")
    try:
        assert isinstance(app, RunnerMiddleware)
        assert app.store.current.config.active.url == runner.url
        with serving(app) as base, requests.Session() as http:
            http.trust_env = False
            page = http.get(f"{base}/", timeout=T)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert page.headers["content-security-policy"] == "frame-ancestors 'self'"
            assert page.headers["x-frame-options"] == "SAMEORIGIN"
            tag = re.search(r"<iframe[^>]*>", page.text)
            assert tag is not None and 'sandbox="allow-scripts"' in tag[0]
            src = html.unescape(re.search(r'\ssrc="([^"]+)"', tag[0])[1])  # type: ignore[index]
            assert src.startswith("/runner/ext-ui/") and "tenant=demo-tenant" in src

            index = http.get(base + src, timeout=T)
            assert index.status_code == 200 and 'id="loaded"' in index.text
            bridge = http.get(f"{base}/static/runner-bridge.js", timeout=T)
            assert bridge.status_code == 200 and "runner_mw.result" in bridge.text

            # The browser asks for another tenant: the execute_hook of the ini binds the caller's.
            reply = http.post(f"{base}/v1/execute", json=envelope("someone-else"), timeout=T)
            assert reply.status_code == 200, reply.text
            assert reply.json()["status"] == 200
            echo = json.loads(base64.b64decode(reply.json()["body_b64"]))
            assert (echo["tenant"], echo["path"], echo["body"]) == ("demo-tenant", "/hello", "hi")

            denied = http.post(f"{base}/v1/execute", json=envelope("demo-tenant", "com.example.other"),
                               timeout=T)
            assert denied.status_code == 403 and denied.json()["error"] == "forbidden"
        # The ini's filter is the only middleware: importing the module for `main` built none.
        module = sys.modules["examples.pyramid_app"]
        assert imported_before or "application" not in vars(module)
    finally:
        app.close()


def test_filter_resolves_relative_config_and_references(runner: DevServer, tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(f"version: 1\nbackend: d\nbackends:\n  d:\n    kind: docker\n"
                                      f"    url: {runner.url}\n")
    mw = filter_app_factory(lambda e, s: [], {"here": str(tmp_path)}, config="gw.yaml",
                            execute_hook="examples.host:bind_to_caller", reload_signal="false")
    try:
        assert mw.store.current.config.active.url == runner.url
        assert mw.store.path == str(tmp_path / "gw.yaml")  # relative to the ini's folder
        from examples.host import bind_to_caller

        assert mw.execute_hook is bind_to_caller
    finally:
        mw.close()


def test_filter_refuses_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown setting.*confg"):
        filter_app_factory(lambda e, s: [], {}, confg="x.yaml")
    with pytest.raises(ValueError, match="not a boolean"):
        filter_app_factory(lambda e, s: [], {"here": str(ROOT)}, config="config/runner.yaml",
                           reload_signal="maybe")
    with pytest.raises(ValueError, match="not a 'module:attribute'"):
        resolve("nodots")
    with pytest.raises(ValueError, match="not callable"):
        resolve("runner_mw.paste:CONFIG_ENV")
    assert resolve("runner_mw.paste.resolve") is resolve
    (tmp_path / "bad.yaml").write_text("version: 1\nbackend: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        filter_app_factory(lambda e, s: [], {"here": str(tmp_path)}, config="bad.yaml", reload_signal="no")


def test_the_examples_execute_hook_decides_tenant_and_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from examples.host import bind_to_caller

    sent = envelope("someone-else")
    sent["context"].update(install_id="someone-elses-install", config={"admin": "true"}, version_id="v-old")
    sent.update(providers=["cap:secrets.get"], secret_envelope={"ciphertext_b64": "AAAA"},
                limits={"timeout_ms": 1000, "memory_mb": 2**64 - 1, "fuel": 2**64 - 1})
    bound = bind_to_caller({}, sent)
    assert bound["context"]["tenant_id"] == "demo-tenant"
    assert bound["context"]["content_hash"] == SAMPLE_CONTENT_HASH
    # The install, its config and capabilities, and the limits are the server's, not the browser's.
    assert bound["context"]["install_id"] == f"demo-tenant/{SAMPLE_EXTENSION_ID}"
    assert bound["context"]["config"] == {} and bound["providers"] == []
    assert "version_id" not in bound["context"]
    assert "secret_envelope" not in bound and bound["limits"] == {"timeout_ms": 1000}
    assert bound["http"] == envelope("x")["http"]  # the extension's request is the browser's
    assert bound["user"]["user_id"] == "demo-user" and "tenant" not in bound["user"]
    for odd in ({"context": {"extension_id": ["x"]}}, {"context": {}}):
        with pytest.raises(PermissionError):
            bind_to_caller({}, odd)
    assert bind_to_caller({}, {"context": "x"}) == {"context": "x"}  # the middleware answers 400
