"""The request checks the reference runner makes, rewritten for the devrunner.

Use it from ``runner_mw.devrunner.app`` only: the execute envelope's shape as the runner's serde
models require it (``ee/runner/src/models.rs``: a wrong shape is axum's 422), the UI path rules of
``util/path_sanitize.rs``, and the JSON of the execute reply envelope.
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

# The reference's static-asset allow-list (util/path_sanitize.rs).
ALLOWED_EXTENSIONS = frozenset(
    {"html", "js", "css", "json", "map", "svg", "png", "jpg", "jpeg", "webp", "woff", "woff2"}
)
# Not a reference rule: the devrunner maps the id onto a folder, so it must be one plain name.
_EXTENSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")

# Field rules: name -> (type, presence). Types: "str", "map" (str -> str), "u64", "strs" or a nested
# rule table. Presence: "req" (serde's plain field), "default" (#[serde(default)]: may be missing,
# never null) and "opt" (Option<_>: missing or null).
Rules = dict[str, tuple[Any, str]]
_CONTEXT: Rules = {
    "request_id": ("str", "opt"), "tenant_id": ("str", "req"), "extension_id": ("str", "req"),
    "install_id": ("str", "opt"), "content_hash": ("str", "req"), "version_id": ("str", "opt"),
    "config": ("map", "default"),
}
_HTTP: Rules = {
    "method": ("str", "req"), "path": ("str", "req"), "query": ("map", "default"),
    "headers": ("map", "default"), "body_b64": ("str", "opt"),
}
_LIMITS: Rules = {"timeout_ms": ("u64", "opt"), "memory_mb": ("u64", "opt"), "fuel": ("u64", "opt")}
_SECRET: Rules = {
    "ciphertext_b64": ("str", "req"), "version": ("str", "opt"), "algorithm": ("str", "opt"),
    "expires_at": ("str", "opt"), "key_path": ("str", "opt"), "mount": ("str", "opt"),
}
_USER: Rules = {
    "user_id": ("str", "req"), "user_email": ("str", "req"), "user_name": ("str", "req"),
    "user_type": ("str", "req"), "client_name": ("str", "default"), "client_id": ("str", "opt"),
    "additional_fields": ("map", "default"),
}
EXECUTE: Rules = {
    "context": (_CONTEXT, "req"), "http": (_HTTP, "req"), "limits": (_LIMITS, "default"),
    "secret_envelope": (_SECRET, "opt"), "providers": ("strs", "default"), "user": (_USER, "opt"),
}
WARMUP: Rules = {"content_hash": ("str", "req")}


class Unprocessable(ValueError):
    """The JSON parsed but does not fit the runner's model (axum answers 422 with this text)."""


def check_execute(value: Any) -> dict[str, Any]:
    """Return ``value`` if it is an execute request the runner would accept, else raise."""
    _check(value, EXECUTE, "")
    return value  # type: ignore[no-any-return]


def check_warmup(value: Any) -> None:
    _check(value, WARMUP, "")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, (int, float)):
        return f"{'integer' if isinstance(value, int) else 'floating point'} `{value}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    return "sequence" if isinstance(value, list) else "map"


def _fail(path: str, problem: str) -> NoReturn:
    raise Unprocessable(f"{path}: {problem}" if path else problem)


def _check(value: Any, rules: Rules, path: str) -> None:
    if not isinstance(value, dict):
        _fail(path, f"invalid type: {_kind(value)}, expected a struct")
    for name, (kind, presence) in rules.items():
        where = f"{path}.{name}" if path else name
        if name not in value:
            if presence == "req":
                _fail(path, f"missing field `{name}`")
            continue
        item = value[name]
        if item is None and presence == "opt":
            continue
        if isinstance(kind, dict):
            _check(item, kind, where)
        elif kind == "str" and not isinstance(item, str):
            _fail(where, f"invalid type: {_kind(item)}, expected a string")
        elif kind == "u64" and (isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < 2**64):
            _fail(where, f"invalid type: {_kind(item)}, expected u64")
        elif kind == "map" and not _str_map(item):
            _fail(where, f"invalid type: {_kind(item)}, expected a map of strings")
        elif kind == "strs" and not (isinstance(item, list) and all(isinstance(v, str) for v in item)):
            _fail(where, f"invalid type: {_kind(item)}, expected a sequence of strings")


def _str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def no_constants(name: str) -> NoReturn:
    """``json.loads`` hook: serde_json refuses NaN and Infinity, so the runner does too."""
    raise ValueError(f"expected value, found {name}")


def reply(
    status: int,
    *,
    headers: dict[str, str] | None = None,
    body_b64: str | None = None,
    error: str | None = None,
) -> bytes:
    """The runner's execute reply envelope, field order and compact form as serde writes it."""
    envelope = {"status": status, "headers": headers or {}, "body_b64": body_b64, "error": error}
    return json.dumps(envelope, separators=(",", ":")).encode()


def sanitize(tail: str) -> list[str] | None:
    """The UI path's segments, or None where the reference answers 400 ``invalid path``.

    Empty means the bundle root. A last segment with a dot must carry an allowed file type; one
    without is a directory-like path, allowed (the caller falls back to ``index.html``).
    """
    if not tail:
        return []
    if tail.startswith("/") or "\\" in tail or any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in tail):
        return None
    segments = [s for s in tail.split("/") if s]  # repeated slashes collapse
    if any(s in (".", "..") or s.startswith(".") for s in segments):
        return None
    if segments and "." in segments[-1]:
        suffix = segments[-1].rsplit(".", 1)[1].lower()
        if suffix not in ALLOWED_EXTENSIONS:
            return None
    return segments


def safe_extension_id(extension_id: str) -> bool:
    return _EXTENSION_ID.fullmatch(extension_id) is not None
