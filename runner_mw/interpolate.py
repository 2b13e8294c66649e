"""``${VAR}`` / ``${VAR:-default}`` interpolation and ``{file: PATH}`` secret references.

Use it so that secrets never sit in the YAML in clear: a token comes from the
environment or from a mounted file. ``$${`` writes a literal ``${``. A plain
(unquoted) scalar that is only one ``${...}`` expression is re-read as a YAML
scalar afterwards, so ``read_ms: ${EXT_GATEWAY_TIMEOUT_MS:-30000}`` is an int.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runner_mw.yaml_source import Path as KeyPath
from runner_mw.yaml_source import dotted

_TOKEN = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_EXPR = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_WHOLE = re.compile(r"\$\{[^}]*\}")
#: Secret files are small; a bigger one is almost certainly the wrong file.
MAX_SECRET_FILE_BYTES = 64 * 1024


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Expand ``${...}`` in ``text``; raise ``ValueError`` naming what is wrong."""

    def expand(match: re.Match[str]) -> str:
        whole = match.group(0)
        if whole == "$${":
            return "${"
        if match.group(1) is None:
            raise ValueError("unterminated '${' (write '$${' for a literal '${')")
        if "${" in match.group(1):
            # ${A:-${B}} would end at B's '}': the default would be the text "${B" (then "}").
            raise ValueError("a ${...} inside a ${...} is not supported (shells and Compose nest "
                             "defaults; here, give the variable itself a value)")
        expr = _EXPR.fullmatch(match.group(1))
        if expr is None:
            raise ValueError(f"invalid expression {whole!r}: expected ${{NAME}} or ${{NAME:-default}}")
        name, default = expr.group(1), expr.group(2)
        value = env.get(name)
        if value:
            return value
        if default is not None:
            return default
        if value is None:
            raise ValueError(f"environment variable {name} is not set and has no default "
                             f"(write ${{{name}:-default}} to give one)")
        return value

    return _TOKEN.sub(expand, text)


def interpolate_scalar(text: str, plain: bool, env: Mapping[str, str]) -> Any:
    """Interpolate one scalar; re-read it as YAML when it was a plain lone ``${...}``."""
    if "${" not in text:
        return text
    result = interpolate(text, env)
    if plain and _WHOLE.fullmatch(text):
        return reread_scalar(result)
    return result


_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+")


def reread_scalar(text: str) -> Any:
    """Read an interpolated value as a YAML 1.2 core-schema scalar: decimal numbers,
    true/false, null; anything else stays a string (no YAML 1.1 octal ``030000`` or
    sexagesimal ``1:20`` surprises from an environment variable)."""
    value = text.strip()
    if value in ("", "~", "null", "Null", "NULL"):
        return None
    if value in ("true", "True", "TRUE"):
        return True
    if value in ("false", "False", "FALSE"):
        return False
    if _INT.fullmatch(value):
        return int(value, 10)
    if _FLOAT.fullmatch(value):
        return float(value)
    return text


def resolve_files(data: Any, base_dir: Path, path: KeyPath = (),
                  secret_keys: frozenset[str] = frozenset(),
                  read: list[tuple[Path, bytes]] | None = None,
                  ) -> tuple[Any, list[tuple[KeyPath, str]]]:
    """Replace each ``{file: PATH}`` mapping under a secret key by the file's text (one
    trailing newline stripped); elsewhere it is left for the schema to refuse.

    Relative paths resolve against ``base_dir`` (the config file's folder).
    Returns the new data and a list of (key path, message) problems; each file read is
    appended to ``read`` as (path, bytes) when given (a rotated secret changes the config).
    """
    problems: list[tuple[KeyPath, str]] = []

    def walk(node: Any, here: KeyPath) -> Any:
        if isinstance(node, dict):
            if set(node) == {"file"} and any(part in secret_keys for part in here):
                return read_secret(node["file"], here)
            return {k: walk(v, (*here, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, (*here, i)) for i, v in enumerate(node)]
        return node

    def read_secret(ref: Any, here: KeyPath) -> Any:
        if not isinstance(ref, str) or not ref:
            problems.append(((*here, "file"), "must be a non-empty path string"))
            return None
        target = Path(ref) if os.path.isabs(ref) else base_dir / ref
        try:
            with open(target, "rb") as fh:
                raw = fh.read(MAX_SECRET_FILE_BYTES + 1)
        except OSError as exc:
            problems.append(((*here, "file"), f"cannot read secret file {str(target)!r}: "
                             f"{exc.strerror or exc}"))
            return None
        if len(raw) > MAX_SECRET_FILE_BYTES:
            problems.append(((*here, "file"), f"secret file {str(target)!r} is larger than "
                             f"{MAX_SECRET_FILE_BYTES} bytes"))
            return None
        if read is not None:
            read.append((target, raw))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(((*here, "file"), f"secret file {str(target)!r} is not UTF-8 text"))
            return None
        text = text[:-1] if text.endswith("\n") else text
        if not text.strip():
            # Never "no token": most likely a file caught while it is rewritten in place.
            problems.append(((*here, "file"), f"secret file {str(target)!r} is empty"))
            return None
        return text

    return walk(data, path), problems


__all__ = ["MAX_SECRET_FILE_BYTES", "dotted", "interpolate", "interpolate_scalar", "resolve_files"]
