"""Checks on the ``/v1/execute`` envelope before it is sent to the runner.

Use ``envelope_problem`` to refuse early (400 ``invalid_request``) what the runner
would refuse anyway, with a detail a developer can act on, and ``prepare`` to
fill in what the gateway owns (request id, the timeout the runner must honour).
"""

from __future__ import annotations

from typing import Any

from runner_mw.backends.base import CONTENT_HASH

_OPTIONAL_STR = ("request_id", "install_id", "version_id")
_U64 = 2**64
# The runner's serde model (runner_mw.devrunner.checks mirrors it; a test holds this module to
# it): fields that may be missing but never null, and the nested objects' fields.
_SECRET_REQUIRED = ("ciphertext_b64",)
_SECRET_OPTIONAL = ("version", "algorithm", "expires_at", "key_path", "mount")
_USER_REQUIRED = ("user_id", "user_email", "user_name", "user_type")


class Problem(str):
    """What is wrong with an envelope (the text a client sees), and ``path``: where the value
    at fault is (``("user", "user_id")``, ``("http", "headers", "x-n")``, ``("providers", 2)``),
    so that a caller can tell whose value it is (the client's, or one a hook wrote)."""

    path: tuple[str | int, ...]

    def __new__(cls, text: str, *path: str | int) -> Problem:
        problem = super().__new__(cls, text)
        problem.path = path
        return problem


def _strings(value: Any) -> bool:
    """A dict whose values are all strings."""
    if not isinstance(value, dict):
        return False
    for item in value.values():  # noqa: SIM110 - a loop, not all() over a generator: 290 ns, not 610
        if not isinstance(item, str):
            return False
    return True


def _not_string(value: Any) -> tuple[str, ...]:
    """Where a map that ``_strings`` refused goes wrong: the key of its first value that is
    not a string, or nothing (the map itself is not an object)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(item, str):
                return (key,)
    return ()


def _header_safe(value: str) -> bool:
    """1-256 visible ASCII characters (``[\x21-\x7e]{1,256}``), without a regex scan."""
    return 0 < len(value) <= 256 and value.isascii() and value.isprintable() and " " not in value


def envelope_problem(env: Any) -> Problem | None:
    """What is wrong with an envelope (a short text), or None when it is usable."""
    # Runs on every execute: each value is looked up once.
    if not isinstance(env, dict):
        return Problem("the body must be a JSON object (an execute envelope)")
    ctx = env.get("context")
    if not isinstance(ctx, dict):
        return Problem("context must be an object", "context")
    for key in ("tenant_id", "extension_id"):
        value = ctx.get(key)
        if not isinstance(value, str) or not value:
            return Problem(f"context.{key} must be a non-empty string", "context", key)
        if not _header_safe(value):
            # It travels as x-alga-tenant / x-alga-extension: visible ASCII only.
            return Problem(f"context.{key} must be 1-256 visible ASCII characters", "context", key)
    value = ctx.get("content_hash")
    if not isinstance(value, str) or not CONTENT_HASH.fullmatch(value):
        return Problem("context.content_hash must be 'sha256:' followed by 64 hex digits",
                       "context", "content_hash")
    for key in _OPTIONAL_STR:
        value = ctx.get(key)
        if value is not None and not isinstance(value, str):
            return Problem(f"context.{key} must be a string", "context", key)
    if "config" in ctx and not _strings(ctx["config"]):  # may be left out, never null
        return Problem("context.config must be an object of strings", "context", "config",
                       *_not_string(ctx["config"]))
    http = env.get("http")
    if not isinstance(http, dict):
        return Problem("http must be an object", "http")
    for key in ("method", "path"):
        value = http.get(key)
        if not isinstance(value, str) or not value:
            return Problem(f"http.{key} must be a non-empty string", "http", key)
    for key in ("query", "headers"):
        if key in http and not _strings(http[key]):
            return Problem(f"http.{key} must be an object of strings", "http", key, *_not_string(http[key]))
    value = http.get("body_b64")
    if value is not None and not isinstance(value, str):
        return Problem("http.body_b64 must be a string", "http", "body_b64")
    limits = env.get("limits")
    if limits is not None:
        if not isinstance(limits, dict):
            return Problem("limits must be an object", "limits")
        for key in ("timeout_ms", "memory_mb", "fuel"):
            value = limits.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value < _U64):
                return Problem(f"limits.{key} must be an integer from 0 to 2^64-1", "limits", key)
    if "providers" in env:  # may be left out, never null
        providers = env["providers"]
        if not isinstance(providers, list):
            return Problem("providers must be a list of strings", "providers")
        for index, item in enumerate(providers):
            if not isinstance(item, str):
                return Problem("providers must be a list of strings", "providers", index)
    secret = env.get("secret_envelope")
    if secret is not None:
        problem = _object_problem("secret_envelope", secret, _SECRET_REQUIRED, _SECRET_OPTIONAL)
        if problem:
            return problem
    user = env.get("user")
    if user is not None:
        problem = _object_problem("user", user, _USER_REQUIRED, ("client_id",))
        if problem:
            return problem
        if "client_name" in user and not isinstance(user["client_name"], str):
            return Problem("user.client_name must be a string", "user", "client_name")
        if "additional_fields" in user and not _strings(user["additional_fields"]):
            return Problem("user.additional_fields must be an object of strings", "user", "additional_fields",
                           *_not_string(user["additional_fields"]))
    return None


def _object_problem(name: str, value: Any, required: tuple[str, ...],
                    optional: tuple[str, ...]) -> Problem | None:
    """A nested object's problem: ``required`` string fields present, ``optional`` ones
    strings or null."""
    if not isinstance(value, dict):
        return Problem(f"{name} must be an object", name)
    for key in required:
        if not isinstance(value.get(key), str):
            return Problem(f"{name}.{key} must be a string", name, key)
    for key in optional:
        item = value.get(key)
        if item is not None and not isinstance(item, str):
            return Problem(f"{name}.{key} must be a string", name, key)
    return None


#: The fields the runner reads as text: (part, field, kind), kind "s" a string, "m" a map of
#: strings (keys and values); and ``providers``. Other keys it ignores (they pass as sent).
_TEXT_FIELDS = (
    *(("context", f, "s") for f in ("request_id", "tenant_id", "extension_id", "install_id",
                                    "content_hash", "version_id")),
    ("context", "config", "m"),
    *(("http", f, "s") for f in ("method", "path", "body_b64")),
    ("http", "query", "m"), ("http", "headers", "m"),
    *(("secret_envelope", f, "s") for f in ("ciphertext_b64", *_SECRET_OPTIONAL)),
    *(("user", f, "s") for f in (*_USER_REQUIRED, "client_name", "client_id")),
    ("user", "additional_fields", "m"),
)


def unicode_problem(env: dict[str, Any]) -> str | None:
    """A field the runner reads as text that holds a lone surrogate (``"\\ud800"`` is valid
    JSON, but the runner's parser refuses it in a string: a 422 the gateway could only call
    a 502), or None. Use it where the fast encoder refused the envelope, not on every request;
    call it after ``envelope_problem`` (the shapes are known)."""
    for part, field, kind in _TEXT_FIELDS:
        obj = env.get(part)
        value = obj.get(field) if isinstance(obj, dict) else None
        if value is None:
            continue
        texts = [*value, *value.values()] if kind == "m" else [value]
        if not all(_unicode(t) for t in texts):
            return f"{part}.{field} holds text that is not valid Unicode (a lone surrogate escape)"
    providers = env.get("providers")
    if isinstance(providers, list) and not all(_unicode(p) for p in providers):
        return "providers holds text that is not valid Unicode (a lone surrogate escape)"
    # A key anywhere: the runner's parser reads every key as text (to match a field name,
    # also one it then ignores). Values it ignores it only skips. (A loop, not recursion:
    # the body may nest as deep as json.loads allows.)
    stack: list[Any] = [env]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if not all(_unicode(key) for key in node):
                return "a key holds text that is not valid Unicode (a lone surrogate escape)"
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def _unicode(text: Any) -> bool:
    return not isinstance(text, str) or text.isascii() or not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def timeout_budget_ms(read_ms: int) -> int:
    """The ``limits.timeout_ms`` the runner is told: a margin below the gateway's deadline,
    so that the runner's own timeout answers (in-band) before the gateway gives up."""
    margin = max(50, min(1000, read_ms // 10))
    return max(1, read_ms - margin)


def prepare(env: dict[str, Any], request_id: str, read_ms: int) -> dict[str, Any]:
    """Fill ``context.request_id`` when absent and set or clamp ``limits.timeout_ms``."""
    ctx = env["context"]
    if not ctx.get("request_id"):
        ctx["request_id"] = request_id
    limits = env.get("limits")
    if not isinstance(limits, dict):
        limits = env["limits"] = {}
    budget = timeout_budget_ms(read_ms)
    if not limits.get("timeout_ms") or limits["timeout_ms"] > budget:
        limits["timeout_ms"] = budget
    return env
