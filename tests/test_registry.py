"""Backend kinds from plugins: real entry points on sys.path, found, refused or reported broken,
and a broken plugin is a config error naming it (never an exception out of the loader)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from runner_mw.backends import registry
from runner_mw.cli import main
from runner_mw.errors import ConfigError
from runner_mw.loader import config_from_text

GOOD_SCHEMA = ("{'type': 'object', 'required': ['kind', 'url'], 'additionalProperties': False,"
               " 'properties': {'kind': {'const': 'KIND'}, 'url': {'type': 'string'}}}")
PLUGINS = {
    "working": f"class Backend(HTTPBackend):\n    @classmethod\n    def settings_schema(cls):\n"
               f"        return {GOOD_SCHEMA.replace('KIND', 'working')}\n",
    "pem": "class Backend(HTTPBackend):\n    @classmethod\n    def settings_schema(cls):\n"
           "        return {'type': 'object', 'properties': {'kind': {'const': 'pem'}, 'url': {},"
           " 'client_pem': {'type': 'string'}, 'api_key': {'type': 'string'}}}\n",
    "typo": "class Backend(HTTPBackend):\n    @classmethod\n    def settings_schema(cls):\n"
            "        return {'type': 'objekt'}\n",
    "raises": "class Backend(HTTPBackend):\n    @classmethod\n    def settings_schema(cls):\n"
              "        raise RuntimeError('schema file missing')\n",
    "leaky": "class Backend(HTTPBackend):\n    @classmethod\n    def settings_schema(cls):\n"
             f"        return {GOOD_SCHEMA.replace('KIND', 'leaky')}\n"
             "    def __init__(self, settings):\n"
             "        raise RuntimeError(f'login refused for token {settings.service_token}')\n",
    "closeraises": "class Backend(HTTPBackend):\n    @classmethod\n    def settings_schema(cls):\n"
                   f"        return {GOOD_SCHEMA.replace('KIND', 'closeraises')}\n"
                   "    def close(self):\n"
                   "        raise RuntimeError('close failed: never used')\n",
    "unimportable": "import no_such_module_anywhere\n",
    "notabackend": "class Backend:\n    pass\n",
}


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One installed distribution registering every kind of ``PLUGINS`` (module ``mwplug_<kind>``)."""
    site = tmp_path / "site"
    info = site / "mwplugins-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mwplugins\nVersion: 0.1\n")
    lines = ["[runner_mw.backends]"]
    for kind, body in PLUGINS.items():
        (site / f"mwplug_{kind}.py").write_text("from runner_mw.backends.http import HTTPBackend\n" + body)
        lines.append(f"{kind} = mwplug_{kind}:Backend")
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(site))
    registry._scan.cache_clear()  # entry points are read once per process: again, with these
    yield
    registry._scan.cache_clear()  # (sys.path is restored by monkeypatch after this)


def config(kind: str, *, active: bool = True) -> str:
    entry = f"  p:\n    kind: {kind}\n    url: http://127.0.0.1:9\n"
    return (f"version: 1\nbackend: {'p' if active else 'd'}\nbackends:\n"
            f"  d:\n    kind: docker\n    url: http://127.0.0.1:9\n{entry}")


def issue_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_text(text, file="runner.yaml", env={})
    (issue,) = info.value.issues
    assert (issue.line, issue.path) == (8, "backends.p.kind")
    return issue.message


@pytest.mark.usefixtures("plugins")
def test_a_working_plugin_is_a_kind_and_validates_its_entries() -> None:
    assert config_from_text(config("working"), env={}).active.kind == "working"
    with pytest.raises(ConfigError, match="unknown key 'extra'"):
        config_from_text(config("working") + "    extra: 1\n", env={})


@pytest.mark.usefixtures("plugins")
def test_a_plugins_own_options_are_its_schemas_business() -> None:
    # A PEM spans lines; the plugin's options are checked by its schema alone, and the
    # shared keys are still checked, without showing a value (it may be the plugin's secret).
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    text = config("pem") + "    client_pem: ${PEM}\n    api_key: ${KEY}\n"
    cfg = config_from_text(text, env={"PEM": pem, "KEY": "sk-secret-value-0123\n"})
    assert cfg.active.options["client_pem"] == pem
    with pytest.raises(ConfigError) as info:
        config_from_text(text.replace("kind: pem\n    url: http://127.0.0.1:9", "kind: pem\n    url: ${URL}"),
                         env={"PEM": pem, "KEY": "k", "URL": "http://127.0.0.1:9/sk-secret\n"})
    assert [i.path for i in info.value.issues] == ["backends.p.url"]
    assert "sk-secret" not in str(info.value)


@pytest.mark.usefixtures("plugins")
@pytest.mark.parametrize(("kind", "says"), [
    ("unimportable", "backend kind 'unimportable' is registered, but its plugin failed to load: "
                     "ModuleNotFoundError"),
    ("notabackend", "'notabackend' is registered, but its plugin failed to load: "
                    "mwplug_notabackend:Backend is not a RunnerBackend subclass"),
    ("typo", "the settings schema of backend kind 'typo' is broken: SchemaError"),
    ("raises", "the settings schema of backend kind 'raises' is broken: RuntimeError: schema file missing"),
])
def test_a_broken_plugin_is_a_config_error_that_names_it(kind: str, says: str) -> None:
    assert says in issue_of(config(kind))
    assert says in issue_of(config(kind, active=False))  # every entry is checked, used or not


@pytest.mark.usefixtures("plugins")
def test_check_reports_a_broken_plugin_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "runner.yaml"
    target.write_text(config("typo", active=False), encoding="utf-8")
    assert main(["check", "--json", str(target)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert [e["path"] for e in report["errors"]] == ["backends.p.kind"]


def test_without_plugins_an_unknown_kind_lists_the_known_ones() -> None:
    assert issue_of(config("nope")) == "unknown backend kind 'nope' (known kinds: docker, knative)"


def test_a_plugin_schema_that_changes_is_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # The metaschema check (35 ms) is made once per schema, not once per class.
    from runner_mw import loader

    class Changing:
        schema: dict[str, object] = {"type": "object"}

        @classmethod
        def settings_schema(cls) -> dict[str, object]:
            return cls.schema

    monkeypatch.setattr(loader, "known_kinds", lambda: {**registry.known_kinds(), "changing": Changing})
    assert config_from_text(config("changing"), env={}).active.kind == "changing"
    Changing.schema = {"type": "object", "required": "url"}  # not a schema: required is a list
    assert "the settings schema of backend kind 'changing' is broken" in issue_of(config("changing"))



@pytest.mark.usefixtures("plugins")
def test_a_plugins_exception_in_a_reload_never_quotes_a_secret(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # The master's failed-reload line (the journal) and the published error (every worker's
    # status) carried a plugin's exception text as it was.
    from runner_mw import loader
    from runner_mw.gunicorn import _Master

    monkeypatch.setattr(loader, "SETTLE_S", 0.0)
    token = "s3cret-service-token-0123456789"
    file = tmp_path / "runner.yaml"
    file.write_text(config("docker", active=False) + f"upstream:\n  service_token: {token}\n")
    state = tmp_path / "state"
    state.mkdir()
    server = SimpleNamespace(log=logging.getLogger("test.master"), cfg=SimpleNamespace(uid=None, gid=None))
    master = _Master(server, str(file), str(state / "state.json"), None)
    master.first_load()
    caplog.set_level(logging.INFO, logger="test.master")
    file.write_text(config("leaky") + f"upstream:\n  service_token: {token}\n")
    master.reload()
    published = json.loads((state / "state.json").read_text())
    assert published["ok"] is False and "RuntimeError: login refused for token" in published["error"]
    assert token not in published["error"] and token not in caplog.text
    assert "reload result=failed" in caplog.text


@pytest.mark.usefixtures("plugins")
def test_a_plugins_exception_at_the_first_start_never_quotes_a_secret(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # Redacted in a failed reload, the same text went out whole at the first start: gunicorn's
    # "Error: ... cannot start: RuntimeError: login refused for token <token>" (the journal),
    # and RunnerMiddleware's exception and traceback in a single process.
    from runner_mw import RunnerMiddleware, gunicorn

    token = "s3cret-service-token-0123456789"
    file = tmp_path / "runner.yaml"
    file.write_text(config("leaky") + f"upstream:\n  service_token: {token}\n")
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(gunicorn.CONFIG_ENV, str(file))
    server = SimpleNamespace(log=logging.getLogger("test.master"), pidfile=None,
                             cfg=SimpleNamespace(uid=None, gid=None))
    with pytest.raises(RuntimeError) as master:
        gunicorn.on_starting(server)
    with pytest.raises(RuntimeError) as single:
        RunnerMiddleware(lambda environ, start_response: [], str(file), reload_signal=False)
    for info in (master, single):
        text = "".join(traceback.format_exception(info.value))
        assert "login refused for token" in text and token not in text
        assert "the backend cannot be built" in text or "cannot build backend 'p'" in text
    assert token not in caplog.text and "login refused for token" in caplog.text


@pytest.mark.usefixtures("plugins")
def test_check_and_reload_build_the_backend_as_the_master_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # check said ok and reload sent the HUP for a file whose backend's constructor fails;
    # the master then refused it. Now all three agree, and none quotes the secret.
    token = "s3cret-service-token-0123456789"
    file = tmp_path / "runner.yaml"
    file.write_text(config("leaky") + f"upstream:\n  service_token: {token}\n")
    assert main(["check", str(file)]) == 1
    assert main(["check", "--json", str(file)]) == 1
    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert main(["reload", "--pid", str(target.pid), "--config", str(file)]) == 1
        assert target.poll() is None  # no HUP (it would have ended the sleeper)
    finally:
        target.kill()
        target.wait()
    out = capsys.readouterr()
    text = out.out + out.err
    assert text.count("backends.p: the backend cannot be built: RuntimeError: login refused for token") == 2
    assert '"path": "backends.p"' in out.out and "no signal sent" in out.err
    assert token not in text


@pytest.mark.usefixtures("plugins")
def test_a_close_that_raises_on_an_unused_backend_does_not_refuse_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The master built and closed a trial instance and took close()'s exception for a bad
    # file: refused at the first start and on HUP, while a single process took it.
    from runner_mw import loader
    from runner_mw.gunicorn import _Master

    monkeypatch.setattr(loader, "SETTLE_S", 0.0)
    file = tmp_path / "runner.yaml"
    file.write_text(config("closeraises"))
    state = tmp_path / "state"
    state.mkdir()
    server = SimpleNamespace(log=logging.getLogger("test.master"), cfg=SimpleNamespace(uid=None, gid=None))
    master = _Master(server, str(file), str(state / "state.json"), None)
    master.first_load()
    file.write_text(config("closeraises") + "upstream:\n  service_token: another-one-0123\n")
    master.reload()
    published = json.loads((state / "state.json").read_text())
    assert published["ok"] is True and published["generation"] == 2
    assert main(["check", str(file)]) == 0
    assert "close() of an unused instance raised RuntimeError" in caplog.text
