"""Find and load the JSON Schema of the config (``schemas/runner-config.schema.json``).

Use ``main_schema()`` for the whole file and ``builtin_backend_schema(name)`` for
the settings of a built-in backend kind. The file ships inside the package as
``runner_mw.schemas`` (setup.py maps that sub-package onto ``schemas/``), so it is
found from a wheel and an editable install; from a bare checkout it is read from
the repository's ``schemas/`` folder.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

SCHEMA_FILE = "runner-config.schema.json"


def schema_text() -> str:
    """The schema file's text, wherever this copy of runner_mw was installed from."""
    try:
        return resources.files("runner_mw.schemas").joinpath(SCHEMA_FILE).read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        # A checkout on sys.path without installing: runner_mw/ sits beside schemas/.
        return (Path(__file__).resolve().parent.parent / "schemas" / SCHEMA_FILE).read_text("utf-8")


@cache
def main_schema() -> dict[str, Any]:
    """The parsed schema (cached; treat it as read-only)."""
    schema: dict[str, Any] = json.loads(schema_text())
    return schema


def builtin_backend_schema(def_name: str) -> dict[str, Any]:
    """A self-contained schema for ``$defs/<def_name>`` (refs resolve within the file)."""
    schema = main_schema()
    return {"$defs": schema["$defs"], **schema["$defs"][def_name]}
