"""YAML file (or mapping) -> interpolation -> JSON Schema -> semantic checks -> ``Config``.

Use ``load_config(path)`` for a file and ``config_from_mapping(data)`` for settings
kept in code. Both gather *every* problem and raise one ``ConfigError`` whose
lines read ``FILE:LINE: dotted.key.path: message``; nothing half-valid is ever
returned.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

from runner_mw import config as c
from runner_mw.access import parse_network
from runner_mw.backends.registry import BUILTIN_KINDS, broken_kinds, known_kinds
from runner_mw.errors import ConfigError, ConfigIssue
from runner_mw.interpolate import interpolate_scalar, resolve_files
from runner_mw.schema import main_schema
from runner_mw.yaml_source import Path as KeyPath
from runner_mw.yaml_source import dotted, load_yaml

#: A config file is a page of YAML; anything this big is a mistake (or an attack).
MAX_CONFIG_BYTES = 1024 * 1024
MIN_TOKEN_CHARS = 16

# JSON Schema counts 1.0 as an integer; a config must not smuggle a float into an int field.
_STRICT_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool))
Validator = validators.extend(Draft202012Validator, type_checker=_STRICT_TYPES)
_VISIBLE = frozenset(chr(i) for i in range(0x21, 0x7F))
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None,
                settle: bool = False) -> c.Config:
    """Read, interpolate and validate one YAML file. Raises ``ConfigError``.

    ``settle``: a reload's read, which waits until the file has been still for ``SETTLE_S``.
    """
    file = os.fspath(path)
    try:
        raw = _read_settled(file, settle)
    except OSError as exc:
        raise ConfigError([ConfigIssue(file, None, "", f"cannot read file: {exc.strerror or exc}")]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigIssue(file, None, "", f"file is larger than {MAX_CONFIG_BYTES} bytes")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        problem = f"file is not UTF-8 text ({exc.reason} at column {column}, byte {exc.start})"
        raise ConfigError([ConfigIssue(file, line, "", problem)]) from None
    return config_from_text(text, file=file, base_dir=config_dir(file), env=env,
                            sha256=hashlib.sha256(raw).hexdigest())


#: A file changed this recently may still be being written: it is read once it has been
#: still this long. A HUP sent by a watcher on every write would otherwise apply whatever
#: prefix was on disk (``read_ms: 300`` of ``read_ms: 30000``) whenever it happens to parse.
SETTLE_S = 0.2
_READ_ATTEMPTS = 10


def _read_settled(file: str, settle: bool) -> bytes:
    """The file's bytes, once (with ``settle``) it has not changed for ``SETTLE_S``, and as
    they were throughout the read (size, mtime and inode the same before and after). Raises
    ``OSError``; one that keeps changing is a ``ConfigError`` (the last good config stays)."""
    for _ in range(_READ_ATTEMPTS):
        before = os.stat(file)
        age = time.time() - before.st_mtime
        if settle and 0 <= age < SETTLE_S:  # (a future mtime, a clock apart, is not waited for)
            time.sleep(SETTLE_S - age)
            continue
        with open(file, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
            after = os.fstat(fh.fileno())
        now = os.stat(file)
        same = {(st.st_size, st.st_mtime_ns, st.st_ino) for st in (before, after, now)}
        if len(same) == 1:
            return raw
    raise ConfigError([ConfigIssue(file, None, "", "the file kept changing while it was read; "
                                   "write it elsewhere and rename it into place")])


def config_dir(file: str) -> Path:
    """The folder relative ``{file: ...}`` and ``ca_bundle`` paths start from: the config
    file's, as named, symlinks not followed. A Kubernetes ConfigMap mounts ``runner.yaml`` as
    a link into a timestamped folder that the next update deletes: a path pinned there
    would break; through the mount's own links it reaches the new files."""
    return Path(os.path.abspath(file)).parent


def config_from_text(
    text: str,
    *,
    file: str = "<string>",
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    sha256: str | None = None,
) -> c.Config:
    """Like ``load_config`` for YAML text already in memory."""
    environ = os.environ if env is None else env

    def on_scalar(path: KeyPath, value: str, plain: bool) -> Any:
        # A secret stays a string even when it looks like a number.
        secret = any(part in c.SECRET_KEYS for part in path)
        return interpolate_scalar(value, plain and not secret, environ)

    data, lines, issues = load_yaml(text, file, on_scalar, c.SECRET_KEYS)
    if issues:
        raise ConfigError(issues)
    if data is None:
        raise ConfigError([ConfigIssue(file, 1, "", "the file is empty: expected a mapping with "
                                       "version, backend and backends")])
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(file, 1, "", f"the top level must be a mapping, not "
                                       f"{_type_name(data)}")])
    if sha256 is None:
        sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return _validate(data, file, lines, base_dir or Path.cwd(), sha256, files_in_digest=True)


def config_from_mapping(
    data: Mapping[str, Any], *, source: str = "<mapping>", base_dir: Path | None = None,
    sha256: str | None = None,
) -> c.Config:
    """Validate settings kept in code (no ``${...}`` interpolation; ``{file: ...}`` is read).

    Also how a gunicorn worker rebuilds exactly the config its master validated: it passes
    the master's ``sha256`` of the source file, so every process reports the same checksum.
    """
    if not isinstance(data, Mapping):
        raise ConfigError([ConfigIssue(source, None, "", f"the top level must be a mapping, not "
                                       f"{_type_name(data)}")])
    plain = _plain(data)
    digest = sha256 or hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()
    # A worker rebuilding its master's config takes the master's digest as it is, and not
    # the files' word for it again: a CA bundle rotated (or broken) since the master checked
    # it must not stop a worker from booting (its TLS then fails, a 502, until a reload).
    return _validate(plain, source, {}, base_dir or Path.cwd(), digest, files_in_digest=sha256 is None)


# --------------------------------------------------------------------------- validation


class _Issues:
    def __init__(self, file: str, lines: dict[KeyPath, int]) -> None:
        self.file = file
        self.lines = lines
        self.items: list[ConfigIssue] = []

    def add(self, path: KeyPath, message: str) -> None:
        issue = ConfigIssue(self.file, self.line(path), dotted(path), message)
        if issue not in self.items:  # e.g. `type` and `const` both failing on one value
            self.items.append(issue)

    def add_new(self, path: KeyPath, message: str) -> None:
        """``add``, unless ``path`` has an issue already: one message per mistake (a URL the
        schema refused needs no second one saying why; a missing key beside it is another)."""
        key = dotted(path)
        if not any(i.path == key for i in self.items):
            self.add(path, message)

    def line(self, path: KeyPath) -> int | None:
        if not self.lines:
            return None
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path)


def _validate(data: dict[str, Any], file: str, lines: dict[KeyPath, int], base_dir: Path,
              sha256: str, *, files_in_digest: bool) -> c.Config:
    issues = _Issues(file, lines)
    read: list[tuple[Path, bytes]] = []
    data, file_problems = resolve_files(data, base_dir, secret_keys=c.SECRET_KEYS, read=read)
    for path, message in file_problems:
        issues.add(path, message)
    _schema_issues(Validator(main_schema()), data, (), issues)
    backends = data.get("backends")
    if isinstance(backends, dict):
        _backend_issues(backends, issues)
    _semantic_issues(data, base_dir, issues, check_files=files_in_digest)
    if not issues.items and files_in_digest:
        sha256 = _digest_with_files(sha256, read, data, base_dir, issues)
    if issues.items:
        raise ConfigError(issues.items)
    return _build(data, file, sha256, base_dir)


def _digest_with_files(sha256: str, secrets: list[tuple[Path, bytes]], data: dict[str, Any],
                       base_dir: Path, issues: _Issues) -> str:
    """The config's digest, covering the files it names: a rotated ``{file: ...}`` secret or
    CA bundle, then SIGHUP, is a change to apply, not "unchanged". The YAML's own sha256
    when it names no file."""
    parts = [(f"secret {path}", raw) for path, raw in secrets]
    for name, entry in sorted(data["backends"].items()):
        ca = entry.get("ca_bundle")
        if ca:
            try:
                parts.append((f"ca_bundle {name}", _resolve(ca, base_dir).read_bytes()))
            except OSError as exc:  # gone since it was checked
                issues.add(("backends", name, "ca_bundle"), f"cannot read CA bundle {ca!r}: "
                           f"{exc.strerror or exc}")
    if not parts:
        return sha256
    digest = hashlib.sha256(sha256.encode())
    for label, raw in parts:
        digest.update(b"\0" + label.encode("utf-8", "surrogateescape") + b"\0" + hashlib.sha256(raw).digest())
    return digest.hexdigest()


def _schema_issues(validator: Any, data: Any, prefix: KeyPath, issues: _Issues) -> None:
    for error in validator.iter_errors(data):
        for path, message in _explain(error):
            issues.add((*prefix, *path), message)


def _explain(error: ValidationError) -> list[tuple[KeyPath, str]]:
    """Turn one jsonschema error into readable (path, message) pairs."""
    path: KeyPath = tuple(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(schema.get("properties", {}))
        extra = [k for k in error.instance if k not in allowed]
        hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
        return [((*path, k), f"unknown key '{k}'{hint}") for k in extra]
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [k for k in error.validator_value if k not in error.instance]
        return [(path, f"missing required key '{k}'") for k in missing]
    if any(part in c.SECRET_KEYS for part in path):
        # Never echo what may be a secret (into logs or a terminal): say what was expected.
        expected = schema.get("x-error") or f"is invalid ({error.validator})"
        return [(path, f"the value (not shown: a secret) {expected}")]
    if "x-error" in schema:
        shown = _masked_url(error.instance) if isinstance(error.instance, str) else error.instance
        return [(path, f"{_short(shown)} {schema['x-error']}")]
    if "propertyNames" in error.schema_path:
        return [((*path, str(error.instance)),
                 f"invalid name {error.instance!r}: use 1-64 letters, digits, '_', '.', '-'")]
    return [(path, error.message)]


# Plugin schemas (by class and content) found to be schemas. Checked once: a worker
# rebuilds the config on every reload, with the GIL its request threads need.
_SOUND_SCHEMAS: set[tuple[type, str]] = set()


def _backend_issues(backends: dict[str, Any], issues: _Issues) -> None:
    kinds = known_kinds()
    for name, entry in backends.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
            continue  # the main schema reported it
        kind = entry["kind"]
        cls = kinds.get(kind)
        if cls is None:
            broken = broken_kinds().get(kind)
            issues.add(("backends", name, "kind"), f"backend kind {kind!r} is registered, but its "
                       f"plugin failed to load: {broken}" if broken else f"unknown backend kind "
                       f"{kind!r} (known kinds: {', '.join(sorted(kinds))})")
            continue
        try:
            schema = cls.settings_schema()
            if kind not in BUILTIN_KINDS:
                key = (cls, json.dumps(schema, sort_keys=True, default=str))
                if key not in _SOUND_SCHEMAS:
                    Validator.check_schema(schema)  # 35 ms: once per schema and process
                    _SOUND_SCHEMAS.add(key)
            _schema_issues(Validator(schema), entry, ("backends", name), issues)
        except Exception as exc:  # the plugin's bug, reported as the config's (never raised)
            issues.add(("backends", name, "kind"), f"the settings schema of backend kind {kind!r} "
                       f"is broken: {type(exc).__name__}: {str(exc).partition(chr(10))[0][:200]}")


def _semantic_issues(data: dict[str, Any], base_dir: Path, issues: _Issues, *, check_files: bool) -> None:
    """What the schema cannot say. Run on a file with schema errors too (every error at
    once, as ``check`` promises), so each test takes only the shapes it can read, and a
    key the schema already refused gets no second message (``_Issues.add_new``)."""
    backends = data.get("backends")
    backends = backends if isinstance(backends, dict) else {}
    backend = data.get("backend")
    if backends and isinstance(backend, str) and backend not in backends:
        issues.add_new(("backend",), f"{backend!r} is not an entry of backends "
                       f"(entries: {', '.join(sorted(map(str, backends)))})")
    _control_issues({k: v for k, v in data.items() if k != "backends"}, (), issues)
    for name, entry in backends.items():
        if not isinstance(entry, dict):
            continue
        # A plugin's own options are its schema's business (a PEM may span lines, and a
        # secret of its own is not known to be one): only the keys every kind shares.
        shared = entry if entry.get("kind") in BUILTIN_KINDS else {
            k: v for k, v in entry.items() if k in ("kind", "url", "public_base", "host")}
        _control_issues(shared, ("backends", name), issues)
        for key in ("url", "public_base"):
            value = entry.get(key)
            if isinstance(value, str) and value.startswith("http"):
                problem = _url_problem(value, request_line=key == "url")
                if problem:
                    issues.add_new(("backends", name, key), f"{_masked_url(value)!r} {problem}")
        ca = entry.get("ca_bundle")
        if isinstance(ca, str) and check_files:
            problem = _ca_problem(_resolve(ca, base_dir))
            if problem:
                issues.add_new(("backends", name, "ca_bundle"), f"CA bundle {ca!r} {problem}")
        _token_issue(entry.get("service_token"), ("backends", name, "service_token"), issues)
    upstream = data.get("upstream")
    if isinstance(upstream, dict):
        _token_issue(upstream.get("service_token"), ("upstream", "service_token"), issues)
    access = data.get("access")
    access = access if isinstance(access, dict) else {}
    for key in ("networks", "trusted_proxies"):
        nets = access.get(key)
        for i, net in enumerate(nets if isinstance(nets, list) else []):
            if not isinstance(net, str):
                continue  # the schema said so
            try:
                ipaddress.ip_network(net, strict=True)
            except ValueError as exc:
                issues.add_new(("access", key, i), f"{net!r} is not a network: {exc}")
    tokens = access.get("tokens")
    for i, token in enumerate(tokens if isinstance(tokens, list) else []):
        path = ("access", "tokens", i)
        if isinstance(token, str) and token and len(token) < MIN_TOKEN_CHARS:
            issues.add_new(path, f"a token must be at least {MIN_TOKEN_CHARS} characters long")
        _token_issue(token, path, issues)


def _control_issues(node: Any, path: KeyPath, issues: _Issues) -> None:
    """A control character in any name or text (but secrets, checked on their own): it can
    only be a mistake, most often the newline a ``${VAR}`` from a Kubernetes secret or
    ConfigMap ends in, which the schema's patterns miss (``$`` matches before a last
    newline) and which would fail every request later (a header cannot hold it)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and _CONTROL.search(key):
                issues.add_new((*path, key), "the name holds a control character (a newline?)")
            elif key not in c.SECRET_KEYS:
                _control_issues(value, (*path, key), issues)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _control_issues(value, (*path, i), issues)
    elif isinstance(node, str) and _CONTROL.search(node):
        # The value is not shown: it may be a secret of a kind we cannot tell.
        issues.add_new(path, "the value holds a control character (a newline from an "
                             "environment variable?)")


def _ca_problem(path: Path) -> str | None:
    """Why the CA bundle at ``path`` cannot verify a runner, or None. Tried now: the TLS
    context is made at a worker's first request, where a bad bundle is a 502 for all."""
    if not path.is_file():
        return "is not a readable file"
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        return f"holds no usable PEM certificate ({exc.reason or exc})"
    except (OSError, ValueError) as exc:
        return f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    return None


def _token_issue(token: Any, path: KeyPath, issues: _Issues) -> None:
    # A token ends up in a header: refuse anything that could split or smuggle one.
    if isinstance(token, str) and token and not set(token) <= _VISIBLE:
        issues.add_new(path, "a token may only hold visible ASCII characters (no spaces or newlines)")


def _url_problem(url: str, *, request_line: bool = False) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        # urlsplit quotes the text it took for a port, which may be part of a password.
        why = "its port is not a number" if "could not be cast" in str(exc) else str(exc)
        return f"is not a valid URL: {why}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an http(s) URL with a host"
    if request_line and not url.isascii():  # (control characters: _control_issues)
        return "must be ASCII: it goes into request lines (percent-encode the path, punycode the host)"
    if parts.port == 0:
        return "names port 0"
    if parts.username is not None or parts.query or parts.fragment:
        return "must not hold user:password@, a query or a fragment"
    return None


# --------------------------------------------------------------------------- building


def _build(data: dict[str, Any], source: str, sha256: str, base_dir: Path) -> c.Config:
    shared = _timeouts(data.get("timeouts", {}), c.Timeouts())
    upstream = data.get("upstream", {})
    global_token = upstream.get("service_token") or None
    backends = {}
    for name, entry in data["backends"].items():
        retry = entry.get("retry", {})
        backends[name] = c.BackendSettings(
            name=name,
            kind=entry["kind"],
            url=str(entry.get("url", "")).rstrip("/"),
            public_base=entry.get("public_base", c.DEFAULT_PUBLIC_BASE),
            timeouts=_timeouts(entry.get("timeouts", {}), shared),
            service_token=entry.get("service_token") or global_token,
            ca_bundle=str(_resolve(entry["ca_bundle"], base_dir)) if entry.get("ca_bundle") else None,
            host=entry.get("host"),
            retry=c.Retry(
                attempts=retry.get("attempts", c.DEFAULT_RETRY_ATTEMPTS if entry["kind"] == "knative" else 1),
                budget_ms=retry.get("budget_ms", c.DEFAULT_RETRY_BUDGET_MS),
                backoff_ms=retry.get("backoff_ms", c.DEFAULT_RETRY_BACKOFF_MS),
            ),
            pool_size=upstream.get("pool_size", c.DEFAULT_POOL_SIZE),
            pool_wait_ms=upstream.get("pool_wait_ms", c.DEFAULT_POOL_WAIT_MS),
            max_reply_bytes=data.get("limits", {}).get("max_reply_bytes", c.DEFAULT_MAX_REPLY_BYTES),
            options=MappingProxyType(dict(entry)),
        )
    access = data.get("access", {})
    limits = data.get("limits", {})
    routes = data.get("routes", {})
    logging_ = data.get("logging", {})
    return c.Config(
        backend=data["backend"],
        backends=MappingProxyType(backends),
        timeouts=shared,
        max_body_bytes=limits.get("max_body_bytes", c.DEFAULT_MAX_BODY_BYTES),
        max_reply_bytes=limits.get("max_reply_bytes", c.DEFAULT_MAX_REPLY_BYTES),
        asset_prefixes=tuple(routes.get("asset_prefixes", c.DEFAULT_ASSET_PREFIXES)),
        expose_runner_errors=routes.get("expose_runner_errors", False),
        access=c.Access(
            networks=tuple(parse_network(n) for n in access.get("networks", c.DEFAULT_NETWORKS)),
            tokens=tuple(t for t in access.get("tokens", []) if t),
            trusted_proxies=tuple(parse_network(n) for n in access.get("trusted_proxies", [])),
            hosts=frozenset(h.lower() for h in access.get("hosts", [])),
        ),
        metrics_enabled=data.get("metrics", {}).get("enabled", True),
        log_format=logging_.get("format", "text"),
        access_log=logging_.get("access_log", True),
        source=source,
        sha256=sha256,
        data=MappingProxyType(data),
    )


def _timeouts(raw: dict[str, int], base: c.Timeouts) -> c.Timeouts:
    return c.Timeouts(connect_ms=raw.get("connect_ms", base.connect_ms),
                      read_ms=raw.get("read_ms", base.read_ms))


def _resolve(path: str, base_dir: Path) -> Path:
    return Path(path) if os.path.isabs(path) else base_dir / path


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)


_SCHEME = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*:(//)?")


def _masked_url(text: str) -> str:
    """``text`` with what may be a URL's credentials starred: everything up to the last
    ``@`` after the scheme (a password may hold ``/``, ``?`` or ``#``; no scheme at all, as
    in ``user:pw@host``, is masked too), then the query and fragment. Over-masking a path
    is harmless in an error message; quoting a password is not."""
    found = _SCHEME.match(text)
    head = found.group(0) if found and found.group(1) else ""
    rest = text[len(head):]
    at = rest.rfind("@")
    if at >= 0:
        rest = "***@" + rest[at + 1:]
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        rest = rest[:cut + 1] + "***"
    return head + rest


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
