"""The JSON Schema: valid draft 2020-12, strict, documented, and found wherever runner_mw is installed.

NOTE: test_schema_found_from_a_built_wheel and test_schema_found_from_an_editable_install
build and install runner_mw for real (pip wheel / pip install -e, offline, without build
isolation, into tmp_path). They copy the checkout first so that nothing (build/, *.egg-info)
is written into the repository and parallel runs cannot collide. Each takes a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from runner_mw.backends.registry import known_kinds
from runner_mw.schema import SCHEMA_FILE, builtin_backend_schema, main_schema, schema_text

REPO = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO / "schemas" / SCHEMA_FILE
RUNNER_YAML = REPO / "config" / "runner.yaml"
# The interpreter's own libraries (jsonschema, yaml, pip, setuptools) without running
# site.py, so that no .pth file (e.g. an editable install of this checkout) is processed.
LIBS = os.pathsep.join(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]))

PROBE = """\
import importlib.util, json, sys
import runner_mw
from runner_mw.schema import schema_text
from runner_mw.cli import main
spec = importlib.util.find_spec("runner_mw.schemas")
locations = list(spec.submodule_search_locations or []) if spec else []
print(json.dumps({"file": runner_mw.__file__, "schemas": locations, "length": len(schema_text())}))
sys.stdout.flush()
sys.exit(main(["check", sys.argv[1]]))
"""


def _walk(node: Any, pointer: str = "") -> Any:
    yield pointer, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{pointer}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{pointer}/{i}")


def _resolve(ref: str) -> dict[str, Any]:
    assert ref.startswith("#/"), ref
    node: Any = main_schema()
    for part in ref[2:].split("/"):
        node = node[part]
    assert isinstance(node, dict)
    return node


def test_schema_file_is_valid_draft_2020_12() -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    assert schema == main_schema()
    assert schema_text() == SCHEMA_PATH.read_text(encoding="utf-8")


def test_every_property_has_a_description() -> None:
    missing = []
    for pointer, node in _walk(main_schema()):
        if not isinstance(node, dict) or not isinstance(node.get("properties"), dict):
            continue
        for name, prop in node["properties"].items():
            text = prop.get("description")
            if text is None and "$ref" in prop:  # described where it is defined
                text = _resolve(prop["$ref"]).get("description")
            if not (isinstance(text, str) and text.strip()):
                missing.append(f"{pointer}/properties/{name}")
    for name, definition in main_schema()["$defs"].items():
        if not definition.get("description"):
            missing.append(f"/$defs/{name}")
    assert missing == []


def test_every_object_with_properties_is_closed() -> None:
    open_entry = "/properties/backends/additionalProperties"  # closed by each kind's own schema
    open_ones = []
    for pointer, node in _walk(main_schema()):
        if (isinstance(node, dict) and isinstance(node.get("properties"), dict) and pointer != open_entry
                and node.get("additionalProperties") is not False):
            open_ones.append(pointer)
    assert open_ones == []
    assert main_schema()["properties"]["backends"]["additionalProperties"].get("additionalProperties") is None


def test_every_ref_resolves() -> None:
    for _pointer, node in _walk(main_schema()):
        if isinstance(node, dict) and "$ref" in node:
            _resolve(node["$ref"])


@pytest.mark.parametrize("kind", ["docker", "knative"])
def test_builtin_kind_schemas_are_valid_and_strict(kind: str) -> None:
    cls = known_kinds()[kind]
    schema = cls.settings_schema()
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    assert validator.is_valid({"kind": kind, "url": "http://runner.internal"})
    assert not validator.is_valid({"kind": kind})  # url is required
    assert not validator.is_valid({"kind": kind, "url": "http://x", "nope": 1})
    other = "knative" if kind == "docker" else "docker"
    assert not validator.is_valid({"kind": other, "url": "http://x"})
    assert schema == builtin_backend_schema(f"{kind}Backend")
    assert schema["additionalProperties"] is False


def test_known_kinds_include_the_builtins() -> None:
    assert {"docker", "knative"} <= set(known_kinds())


def test_shipped_configs_validate_against_the_raw_schema() -> None:
    """The schema alone (as an editor would use it) accepts the shipped example."""
    from runner_mw.loader import load_config

    data = dict(load_config(RUNNER_YAML, env={}).data)
    Draft202012Validator(main_schema()).validate(data)


# --------------------------------------------------------------------------- where the schema is found


def _run(args: list[str], cwd: Path, pythonpath: str | None, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False,
                          **kw)


def _probe(python: str, flags: list[str], cwd: Path, pythonpath: str | None) -> dict[str, Any]:
    result = _run([python, *flags, "-c", PROBE, str(RUNNER_YAML)], cwd, pythonpath)
    assert result.returncode == 0, result.stdout + result.stderr
    first, _, rest = result.stdout.partition("\n")
    assert f"{RUNNER_YAML}: ok" in rest
    info: dict[str, Any] = json.loads(first)
    assert info["length"] == len(SCHEMA_PATH.read_text(encoding="utf-8"))
    return info


def test_schema_found_from_the_checkout(tmp_path: Path) -> None:
    # -S: no site-packages and no .pth files; runner_mw can only come from the checkout.
    info = _probe(sys.executable, ["-S"], tmp_path, os.pathsep.join([str(REPO), LIBS]))
    assert Path(info["file"]).resolve() == REPO / "runner_mw" / "__init__.py"
    assert info["schemas"] == []  # not a package there: read from the repository's schemas/


@pytest.fixture
def source_copy(tmp_path: Path) -> Path:
    """The checkout as `pip install .` would see it, minus VCS data and build litter."""
    target = tmp_path / "runner_mw-src"
    shutil.copytree(
        REPO, target, symlinks=True,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                      ".ruff_cache", ".pytest_cache", ".mypy_cache", "tests", "bench",
                                      "node_modules"),
    )
    return target


def test_schema_found_from_a_built_wheel(tmp_path: Path, source_copy: Path) -> None:
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "--no-cache-dir", "-q", "-w", str(wheels), str(source_copy)], tmp_path, None)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = wheels.glob("runner_mw-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "runner_mw/schemas/runner-config.schema.json" in names
        assert "runner_mw/py.typed" in names
        packaged = archive.read("runner_mw/schemas/runner-config.schema.json").decode("utf-8")
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "runner-mw = runner_mw.cli:main" in archive.read(entry_points).decode("utf-8")
    assert packaged == SCHEMA_PATH.read_text(encoding="utf-8")
    assert not any(n.startswith("schemas/") for n in names)  # not a top-level "schemas" package

    site = tmp_path / "site"
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                      "--target", str(site), str(wheel)], tmp_path, None)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # With no checkout beside it, the file can only come from the installed package.
    assert not (site / "schemas").exists()
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    info = _probe(sys.executable, ["-S"], cwd, os.pathsep.join([str(site), LIBS]))
    assert Path(info["file"]).resolve() == (site / "runner_mw" / "__init__.py").resolve()
    assert [Path(p).resolve() for p in info["schemas"]] == [(site / "runner_mw" / "schemas").resolve()]
    # The console script that `pip install .` makes.
    script = site / "bin" / "runner-mw"
    assert script.exists(), sorted(p.name for p in site.iterdir())
    ran = _run([str(script), "check", str(RUNNER_YAML)], cwd, str(site))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"{RUNNER_YAML}: ok" in ran.stdout


def test_schema_found_from_an_editable_install(tmp_path: Path, source_copy: Path) -> None:
    venv_dir = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv_dir)], tmp_path, None)
    assert made.returncode == 0, made.stderr
    python = venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    venv_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          tmp_path, None).stdout.strip())
    # pip, setuptools, jsonschema and PyYAML come from this interpreter's environment.
    (venv_site / "_runner_mw_test_libs.pth").write_text(LIBS.replace(os.pathsep, "\n") + "\n")
    installed = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                      "--no-cache-dir", "--ignore-installed", "-q", "-e", str(source_copy)], tmp_path, None)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    info = _probe(str(python), [], cwd, None)
    assert Path(info["file"]).resolve() == source_copy / "runner_mw" / "__init__.py"
    # An edit to the checkout's schema is seen at once: it really is the editable copy.
    schema_file = source_copy / "schemas" / SCHEMA_FILE
    schema_file.write_text(schema_file.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    probe = _run([str(python), "-c", "from runner_mw.schema import schema_text; print(len(schema_text()))"],
                 cwd, None)
    assert probe.stdout.strip() == str(info["length"] + 1), probe.stderr
