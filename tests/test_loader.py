"""runner_mw.loader: YAML file or mapping -> interpolation -> schema -> semantic checks -> Config.

The big table below is the contract of the error messages: each invalid config
must name its file, the line of the offending key (or value) and the dotted key
path, and every problem of a file must be reported at once, in file order.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import json
import shutil
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from runner_mw import config as c
from runner_mw import loader
from runner_mw.access import config_warnings
from runner_mw.errors import ConfigError, ConfigIssue
from runner_mw.loader import MAX_CONFIG_BYTES, config_from_mapping, config_from_text, load_config
from runner_mw.schema import main_schema

pytest_plugins = ["mwfixtures"]

REPO = Path(__file__).resolve().parent.parent
RUNNER_YAML = REPO / "config" / "runner.yaml"
KNATIVE_YAML = REPO / "config" / "knative.example.yaml"
DEPLOYMENT_VARS = (
    "RUNNER_BACKEND",
    "RUNNER_BASE_URL",
    "RUNNER_DOCKER_HOST",
    "RUNNER_PUBLIC_BASE",
    "RUNNER_SERVICE_TOKEN",
    "EXT_GATEWAY_TIMEOUT_MS",
)

# Lines 1-6 of most cases; whatever a case appends starts on line 7.
BASE = (
    "version: 1\n"
    "backend: docker\n"
    "backends:\n"
    "  docker:\n"
    "    kind: docker\n"
    "    url: http://127.0.0.1:8085\n"
)
KNATIVE = (
    "version: 1\n"
    "backend: k\n"
    "backends:\n"
    "  k:\n"
    "    kind: knative\n"
    "    url: http://kourier.internal\n"
)


def with_url(url: str) -> str:
    return BASE.replace("http://127.0.0.1:8085", url)


def billion_laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    names = "abcdefghi"
    for prev, name in itertools.pairwise(names):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _oversize(tmp_path: Path) -> Path:
    target = tmp_path / "runner.yaml"
    target.write_bytes(BASE.encode() + b"#" * (MAX_CONFIG_BYTES + 1 - len(BASE)))
    return target


def _directory(tmp_path: Path) -> Path:
    target = tmp_path / "a-directory.yaml"
    target.mkdir()
    return target


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "no-such-file.yaml"


# (id, content, [(line, path, message substring), ...]). ``content`` is YAML text,
# raw bytes, or a function making the path to load. ``path`` may be a tuple of
# acceptable paths. The issues must match the list exactly, in order.
CASES: list[Any] = [
    # --- unknown keys
    ("top-level-typo", BASE + "timeout:\n  read_ms: 500\n",
     [(7, "timeout", "unknown key 'timeout' (expected one of: access, backend, backends")]),
    ("backend-key-typo", BASE + "    urll: http://x\n",
     [(7, "backends.docker.urll", "unknown key 'urll'")]),
    ("retry-on-docker", BASE + "    retry: {attempts: 2}\n",
     [(7, "backends.docker.retry", "unknown key 'retry' (expected one of: ca_bundle, kind,")]),
    ("timeouts-unknown-key", BASE + "timeouts:\n  connect_ms: 100\n  write_ms: 5\n",
     [(9, "timeouts.write_ms", "unknown key 'write_ms' (expected one of: connect_ms, read_ms)")]),
    # --- kinds and backend names
    ("unknown-kind", BASE + "  other:\n    kind: lambda\n    url: http://x\n",
     [(8, "backends.other.kind", "unknown backend kind 'lambda' (known kinds: docker, knative)")]),
    ("kind-missing", "version: 1\nbackend: docker\nbackends:\n  docker:\n    url: http://x\n",
     [(4, "backends.docker", "missing required key 'kind'")]),
    ("backend-not-in-backends", BASE.replace("backend: docker", "backend: dokcer"),
     [(2, "backend", "'dokcer' is not an entry of backends (entries: docker)")]),
    ("backend-null", BASE.replace("backend: docker", "backend:"),
     [(2, "backend", "None is not of type 'string'")]),
    ("backends-missing", "version: 1\nbackend: docker\n",
     [(1, "", "missing required key 'backends'")]),
    ("backends-empty", "version: 1\nbackend: docker\nbackends: {}\n",
     [(3, "backends", "should be non-empty")]),
    ("backend-entry-not-mapping", "version: 1\nbackend: docker\nbackends:\n  docker: http://x\n",
     [(4, "backends.docker", "'http://x' is not of type 'object'")]),
    pytest.param(
        "backend-name-bad-characters",
        BASE + "  'bad name!':\n    kind: docker\n    url: http://x\n",
        [(7, ("backends", "backends.bad name!"), "bad name!")],
        id="backend-name-bad-characters",
    ),
    # --- URLs
    ("url-bad-scheme", with_url("htp://x"),
     [(6, "backends.docker.url", "'htp://x' is not an http(s) URL with a host")]),
    ("url-ftp", with_url("ftp://runner.internal"),
     [(6, "backends.docker.url", "is not an http(s) URL with a host")]),
    ("url-userinfo", with_url("http://user:pw@runner.internal"),
     [(6, "backends.docker.url", "no user:password@")]),
    ("url-query", with_url("http://runner.internal/?a=1"),
     [(6, "backends.docker.url", "is not an http(s) URL")]),
    ("url-fragment", with_url("http://runner.internal/#frag"),
     [(6, "backends.docker.url", "is not an http(s) URL")]),
    ("url-no-host", with_url("http://"),
     [(6, "backends.docker.url", "is not an http(s) URL with a host")]),
    ("url-port-only", with_url("http://:8085"),
     [(6, "backends.docker.url", "is not an http(s) URL with a host")]),
    ("url-port-out-of-range", with_url("http://runner.internal:99999"),
     [(6, "backends.docker.url", "is not a valid URL: Port out of range")]),
    ("url-port-not-a-number", with_url("http://runner.internal:abc"),
     [(6, "backends.docker.url", "is not a valid URL")]),
    ("url-wrong-type", with_url("8085"),
     [(6, "backends.docker.url", "8085 is not an http(s) URL")]),
    ("public-base-relative", BASE + "    public_base: /assets\n",
     [(7, "backends.docker.public_base", "'/assets' must be /runner or an absolute http(s) URL")]),
    ("public-base-trailing-slash", BASE + "    public_base: /runner/\n",
     [(7, "backends.docker.public_base", "must be /runner or an absolute")]),
    ("public-base-query", BASE + "    public_base: https://cdn.example.com/?v=1\n",
     [(7, "backends.docker.public_base", "must be /runner or an absolute")]),
    ("public-base-bad-port", BASE + "    public_base: https://cdn.example.com:70000/\n",
     [(7, "backends.docker.public_base", "Port out of range")]),
    # --- timeouts
    ("timeout-zero", BASE + "timeouts:\n  connect_ms: 0\n",
     [(8, "timeouts.connect_ms", "0 is less than the minimum of 1")]),
    ("timeout-negative", BASE + "timeouts:\n  read_ms: -5\n",
     [(8, "timeouts.read_ms", "-5 is less than the minimum of 100")]),
    ("timeout-over-max", BASE + "timeouts:\n  read_ms: 600001\n",
     [(8, "timeouts.read_ms", "600001 is greater than the maximum of 600000")]),
    ("timeout-wrong-type", BASE + "timeouts:\n  read_ms: fast\n",
     [(8, "timeouts.read_ms", "'fast' is not of type 'integer'")]),
    ("timeout-bool", BASE + "timeouts:\n  read_ms: true\n",
     [(8, "timeouts.read_ms", "True is not of type 'integer'")]),
    ("timeout-fraction", BASE + "timeouts:\n  read_ms: 1000.5\n",
     [(8, "timeouts.read_ms", "1000.5 is not of type 'integer'")]),
    ("timeouts-null", BASE + "timeouts:\n",
     [(7, "timeouts", "None is not of type 'object'")]),
    ("backend-timeout-zero", BASE + "    timeouts:\n      read_ms: 0\n",
     [(8, "backends.docker.timeouts.read_ms", "0 is less than the minimum of 100")]),
    ("backend-timeout-unknown-key", BASE + "    timeouts: {connect: 5}\n",
     [(7, "backends.docker.timeouts.connect", "unknown key 'connect'")]),
    ("backend-timeout-over-max", KNATIVE + "    timeouts:\n      connect_ms: 60001\n",
     [(8, "backends.k.timeouts.connect_ms", "greater than the maximum of 60000")]),
    # --- limits and upstream
    ("max-body-zero", BASE + "limits:\n  max_body_bytes: 0\n",
     [(8, "limits.max_body_bytes", "0 is less than the minimum of 1")]),
    ("max-reply-too-small", BASE + "limits:\n  max_reply_bytes: 1023\n",
     [(8, "limits.max_reply_bytes", "1023 is less than the minimum of 1024")]),
    ("max-body-too-big", BASE + "limits:\n  max_body_bytes: 104857601\n",
     [(8, "limits.max_body_bytes", "greater than the maximum of 104857600")]),
    ("pool-size-zero", BASE + "upstream:\n  pool_size: 0\n",
     [(8, "upstream.pool_size", "0 is less than the minimum of 1")]),
    ("pool-wait-negative", BASE + "upstream:\n  pool_wait_ms: -1\n",
     [(8, "upstream.pool_wait_ms", "less than the minimum of 0")]),
    ("service-token-wrong-type", BASE + "upstream:\n  service_token: [a, b]\n",
     [(8, "upstream.service_token", "(not shown: a secret) must be a string, null, or {file: PATH}")]),
    ("service-token-space", BASE + "upstream:\n  service_token: 'abc def'\n",
     [(8, "upstream.service_token", "visible ASCII")]),
    ("backend-service-token-newline", BASE + '    service_token: "abcdefghijklmnop\\r\\nX-Evil: 1"\n',
     [(7, "backends.docker.service_token", "visible ASCII characters (no spaces or newlines)")]),
    ("ca-bundle-missing", BASE + "    ca_bundle: no-such-ca.pem\n",
     [(7, "backends.docker.ca_bundle", "CA bundle 'no-such-ca.pem' is not a readable file")]),
    # A bundle that is a file but verifies nothing (empty, cut short, a key): tried at load,
    # not at the first request, where it would be a 502 for every request.
    ("ca-bundle-not-pem", lambda d: _write(d, BASE + "    ca_bundle: ca.pem\n", {"ca.pem": "not a cert\n"}),
     [(7, "backends.docker.ca_bundle", "CA bundle 'ca.pem' holds no usable PEM certificate")]),
    ("ca-bundle-empty", lambda d: _write(d, BASE + "    ca_bundle: ca.pem\n", {"ca.pem": ""}),
     [(7, "backends.docker.ca_bundle", "holds no usable PEM certificate")]),
    # A trailing newline (what a ${VAR} from a Kubernetes secret often ends in) passes the
    # schema's patterns (Python's "$" matches before a last newline): refused here.
    ("knative-host-trailing-newline", KNATIVE + '    host: "runner.example.com\\n"\n',
     [(7, "backends.k.host", "holds a control character")]),
    ("asset-prefix-trailing-newline", BASE + 'routes:\n  asset_prefixes: ["ext-ui/\\n"]\n',
     [(8, "routes.asset_prefixes[0]", "holds a control character")]),
    ("url-trailing-newline", with_url('"http://127.0.0.1:8085/base\\n"'),
     [(6, "backends.docker.url", "holds a control character")]),
    ("url-not-ascii", with_url("http://127.0.0.1:8085/café"),
     [(6, "backends.docker.url", "must be ASCII: it goes into request lines (percent-encode")]),
    ("url-port-zero", with_url("http://127.0.0.1:0"),
     [(6, "backends.docker.url", "'http://127.0.0.1:0' names port 0")]),
    # --- access
    ("network-not-cidr", BASE + "access:\n  networks: [10.0.0.0/33]\n",
     [(8, "access.networks[0]", "'10.0.0.0/33' is not a network")]),
    ("network-host-bits", BASE + "access:\n  networks:\n    - 127.0.0.1/32\n    - 10.0.0.1/8\n",
     [(10, "access.networks[1]", "has host bits set")]),
    ("network-not-a-string", BASE + "access:\n  networks: [10]\n",
     [(8, "access.networks[0]", "10 is not of type 'string'")]),
    ("trusted-proxy-bad", BASE + "access:\n  trusted_proxies:\n    - 10.0.0.0/8\n    - proxy.local\n",
     [(10, "access.trusted_proxies[1]", "'proxy.local' is not a network")]),
    ("token-short", BASE + "access:\n  tokens: [tooshort]\n",
     [(8, "access.tokens[0]", "at least 16 characters")]),
    ("token-newline", BASE + 'access:\n  tokens:\n    - "abcdefghijklmnopq\\nr"\n',
     [(9, "access.tokens[0]", "visible ASCII characters (no spaces or newlines)")]),
    ("tokens-not-a-list", BASE + "access:\n  tokens: abcdefghijklmnopqrstuvwxyz\n",
     [(8, "access.tokens", "the value (not shown: a secret) is invalid (type)")]),
    ("access-unknown-key", BASE + "access:\n  allow: [10.0.0.0/8]\n",
     [(8, "access.allow",
       "unknown key 'allow' (expected one of: hosts, networks, tokens, trusted_proxies)")]),
    # --- version
    ("version-2", BASE.replace("version: 1", "version: 2"),
     [(1, "version", "2 unsupported version: this runner_mw reads version 1")]),
    ("version-missing", BASE.replace("version: 1\n", ""),
     [(1, "", "missing required key 'version'")]),
    ("version-string", BASE.replace("version: 1", "version: '1'"),
     [(1, "version", "'1' unsupported version")]),
    # --- knative
    ("knative-retry-zero", KNATIVE + "    retry: {attempts: 0}\n",
     [(7, "backends.k.retry.attempts", "0 is less than the minimum of 1")]),
    ("knative-retry-unknown-key", KNATIVE + "    retry:\n      attempts: 2\n      jitter: true\n",
     [(9, "backends.k.retry.jitter", "unknown key 'jitter'")]),
    ("knative-host-with-path", KNATIVE + "    host: runner.example.com/x\n",
     [(7, "backends.k.host", "'runner.example.com/x' does not match")]),
    # --- metrics, logging, routes
    ("metrics-enabled-not-bool", BASE + "metrics:\n  enabled: 1\n",
     [(8, "metrics.enabled", "1 is not of type 'boolean'")]),
    ("logging-format-enum", BASE + "logging:\n  format: xml\n",
     [(8, "logging.format", "'xml' is not one of ['text', 'json']")]),
    ("asset-prefix-pattern", BASE + "routes:\n  asset_prefixes: [ext-ui/, Ext-UI]\n",
     [(8, "routes.asset_prefixes[1]", "'Ext-UI' does not match")]),
    ("asset-prefixes-empty", BASE + "routes:\n  asset_prefixes: []\n",
     [(8, "routes.asset_prefixes", "should be non-empty")]),
    # --- interpolation
    ("env-unset", BASE + "upstream:\n  service_token: ${GATEWAY_SECRET_UNSET}\n",
     [(8, "upstream.service_token", "environment variable GATEWAY_SECRET_UNSET is not set")]),
    # --- YAML level
    ("duplicate-key", BASE + "timeouts:\n  read_ms: 1000\n  connect_ms: 100\n  read_ms: 2000\n",
     [(10, "timeouts.read_ms", "duplicate key 'read_ms' (first at line 8)")]),
    ("duplicate-backend", BASE + "  docker:\n    kind: docker\n    url: http://x\n",
     [(7, "backends.docker", "duplicate key 'docker' (first at line 4)")]),
    ("anchor", BASE + "timeouts: &t\n  read_ms: 1000\n",
     [(7, "", "anchors (&name) are not allowed")]),
    ("alias", BASE + "  other: *docker\n",
     [(7, "", "aliases (*name) are not allowed")]),
    ("alias-bomb", billion_laughs(), [(1, "", "anchors (&name) are not allowed")]),
    ("empty-file", "", [(1, "", "the file is empty")]),
    ("whitespace-and-comments", "\n   \n# nothing here\n\n", [(1, "", "the file is empty")]),
    ("top-level-list", "- version: 1\n- backend: docker\n",
     [(1, "", "the top level must be a mapping, not a list")]),
    ("top-level-scalar", "version 1\n", [(1, "", "the top level must be a mapping, not a string")]),
    ("syntax-error", "version: 1\nbackend: [docker\nbackends: {}\n",
     [(3, "", "YAML syntax error: column")]),
    ("syntax-error-indent", "version: 1\n  backend: docker\n",
     [(2, "", "YAML syntax error: column 10: mapping values are not allowed here")]),
    ("two-documents", BASE + "---\nversion: 1\n", [(7, "", "YAML syntax error: column 1")]),
    ("non-utf8", BASE.encode() + b"# caf\xe9\n",
     [(7, "", "not UTF-8 text (invalid continuation byte at column 6")]),
    # PyYAML's composer recurses per level: 1 KB of brackets was a RecursionError.
    ("deep-nesting", BASE + "metrics: " + "[" * 500 + "]" * 500 + "\n",
     [(7, "", "YAML syntax error: column 41: nested deeper than 32 levels")]),
    ("larger-than-cap", _oversize, [(None, "", f"larger than {MAX_CONFIG_BYTES} bytes")]),
    ("missing-file", _missing, [(None, "", "cannot read file: No such file or directory")]),
    ("directory", _directory, [(None, "", "cannot read file: Is a directory")]),
    # --- everything at once, in file order
    ("several-errors",
     BASE.replace("version: 1", "version: 3")
     + "    colour: red\n"                    # 7
     + "timeouts:\n"                          # 8
     + "  read_ms: 1\n"                       # 9
     + "access:\n"                            # 10
     + "  networks: 10.0.0.0/8\n"             # 11
     + "logging:\n"                           # 12
     + "  format: xml\n",                     # 13
     [(1, "version", "unsupported version"),
      (7, "backends.docker.colour", "unknown key 'colour'"),
      (9, "timeouts.read_ms", "less than the minimum of 100"),
      (11, "access.networks", "is not of type 'array'"),
      (13, "logging.format", "is not one of")]),
    ("several-semantic-errors",
     BASE.replace("backend: docker", "backend: nope")
     + "access:\n"                            # 7
     + "  networks: [10.0.0.1/8]\n"           # 8
     + "  tokens: [short]\n",                 # 9
     [(2, "backend", "'nope' is not an entry of backends"),
      (8, "access.networks[0]", "has host bits set"),
      (9, "access.tokens[0]", "at least 16 characters")]),
]


def _write(folder: Path, text: str, files: dict[str, str]) -> Path:
    for name, content in files.items():
        (folder / name).write_text(content, encoding="utf-8")
    target = folder / "runner.yaml"
    target.write_text(text, encoding="utf-8")
    return target


PARAMS = [case if hasattr(case, "marks") else pytest.param(*case, id=case[0]) for case in CASES]


def test_the_table_is_big_enough() -> None:
    ids = [param.id for param in PARAMS]
    assert len(ids) >= 35
    assert len(ids) == len(set(ids))
    assert all(param.id == param.values[0] for param in PARAMS)


@pytest.mark.parametrize(("name", "content", "expected"), PARAMS)
def test_invalid_config(tmp_path: Path, name: str, content: Any, expected: list[tuple[Any, ...]]) -> None:
    if callable(content):
        target = content(tmp_path)
    else:
        target = tmp_path / "runner.yaml"
        target.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))

    with pytest.raises(ConfigError) as info:
        load_config(target, env={})

    error = info.value
    issues = error.issues
    assert len(issues) == len(expected), f"{name}: {issues}"
    text = str(error)
    for issue, (line, path, message) in zip(issues, expected, strict=True):
        paths = path if isinstance(path, tuple) else (path,)
        assert issue.file == str(target)
        assert issue.line == line, issue
        assert issue.path in paths, issue
        assert message in issue.message, issue
        where = f"{target}:{line}" if line is not None else str(target)
        assert f"{where}: {issue.path or '(top level)'}: {issue.message}" in text
    assert [i.line or 0 for i in issues] == sorted(i.line or 0 for i in issues)


def test_messages_read_file_line_path(tmp_path: Path) -> None:
    """The exact shape the issue asks for, e.g. for a misspelled key and a bad URL."""
    target = tmp_path / "runner.yaml"
    target.write_text(with_url("htp://x") + "    urll: http://y\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(target, env={})
    assert str(info.value).splitlines() == [
        f"{target}:6: backends.docker.url: 'htp://x' is not an http(s) URL with a host "
        "(no user:password@, query or fragment)",
        f"{target}:7: backends.docker.urll: unknown key 'urll' (expected one of: ca_bundle, kind, "
        "public_base, service_token, timeouts, url)",
    ]


def test_alias_bomb_fails_fast_without_allocating(tmp_path: Path) -> None:
    target = tmp_path / "bomb.yaml"
    target.write_text(billion_laughs(), encoding="utf-8")
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match="anchors"):
            load_config(target, env={})
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 5 * 1024 * 1024


def test_file_exactly_at_the_cap_loads(tmp_path: Path) -> None:
    target = tmp_path / "runner.yaml"
    body = BASE.encode()
    target.write_bytes(body + b"#" * (MAX_CONFIG_BYTES - len(body)))
    assert target.stat().st_size == MAX_CONFIG_BYTES
    assert load_config(target, env={}).active.url == "http://127.0.0.1:8085"


def test_integral_float_is_not_smuggled_into_int_fields() -> None:
    try:
        cfg = config_from_text(BASE + "timeouts:\n  read_ms: 1000.0\n", env={})
    except ConfigError:
        return  # refusing it is fine too
    assert type(cfg.timeouts.read_ms) is int


def test_error_messages_never_echo_a_secret_value() -> None:
    # A secret is never re-read as YAML: an all-digit token stays a string.
    secret = "7302945816273645"
    for text in (
        BASE + "upstream:\n  service_token: ${TOK}\n",
        BASE + "access:\n  tokens:\n    - abcdefghijklmnopq\n    - ${TOK}\n",
    ):
        cfg = config_from_text(text, env={"TOK": secret})
        assert secret in (cfg.active.service_token, *cfg.access.tokens)
    # A secret of the wrong shape is refused without showing it.
    for text in (
        BASE + "access:\n  tokens: ${TOK}\n",
        BASE + "upstream:\n  service_token:\n    - ${TOK}\n",
    ):
        with pytest.raises(ConfigError) as info:
            config_from_text(text, env={"TOK": secret})
        assert secret not in str(info.value)
        assert "not shown: a secret" in str(info.value)


# --------------------------------------------------------------------------- valid configs


def _clear_deployment_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in DEPLOYMENT_VARS:
        monkeypatch.delenv(name, raising=False)


def test_every_error_at_once_but_one_message_per_key(tmp_path: Path) -> None:
    # A schema error used to hide the semantic ones until it was fixed: one more run of
    # `runner-mw check` per mistake. A key the schema refused still gets one message only.
    target = _write(tmp_path, "version: 1\nbackend: nope\nbackends:\n  docker:\n    kind: docker\n"
                    "    url: htp://127.0.0.1:8085\n    ca_bundle: ca.pem\nupstream:\n  pool_size: 0\n"
                    "access:\n  networks: [10.0.0.1/8, 7]\n  tokens: [short]\n", {"ca.pem": "no cert"})
    with pytest.raises(ConfigError) as info:
        load_config(target, env={})
    assert [(i.line, i.path, i.message[:24]) for i in info.value.issues] == [
        (2, "backend", "'nope' is not an entry o"),
        (6, "backends.docker.url", "'htp://127.0.0.1:8085' i"),
        (7, "backends.docker.ca_bundle", "CA bundle 'ca.pem' holds"),
        (9, "upstream.pool_size", "0 is less than the minim"),
        (11, "access.networks[0]", "'10.0.0.1/8' is not a ne"),
        (11, "access.networks[1]", "7 is not of type 'string"),
        (12, "access.tokens[0]", "a token must be at least"),
    ]
    assert sum(i.path == "backends.docker.url" for i in info.value.issues) == 1


def test_a_missing_key_does_not_hide_a_bad_one_beside_it(tmp_path: Path) -> None:
    target = _write(tmp_path, "version: 1\nbackend: docker\nbackends:\n  docker:\n    kind: docker\n"
                    "    ca_bundle: ca.pem\n", {"ca.pem": "no cert"})
    with pytest.raises(ConfigError) as info:
        load_config(target, env={})
    assert [(i.path, i.message[:28]) for i in info.value.issues] == [
        ("backends.docker", "missing required key 'url'"),
        ("backends.docker.ca_bundle", "CA bundle 'ca.pem' holds no "),
    ]


def test_semantic_checks_read_any_shape_the_schema_refused(tmp_path: Path) -> None:
    shapes = ["backends: [a]\n", "backends: {d: 7}\n", "backends: {d: {url: 7, ca_bundle: [x]}}\n",
              "access: 7\n", "access: {networks: 7, tokens: {a: b}}\n", "upstream: [1]\n", "backend: [x]\n"]
    for shape in shapes:
        with pytest.raises(ConfigError):  # never another exception
            config_from_text("version: 1\n" + shape, env={})


def test_a_public_base_is_for_browsers_and_may_name_an_international_host() -> None:
    cfg = config_from_text(BASE + "    public_base: https://bücher.example/ext\n", env={})
    assert cfg.active.public_base == "https://bücher.example/ext"


def test_a_value_from_the_environment_with_a_trailing_newline_is_refused() -> None:
    # Kubernetes configMapKeyRef/secretKeyRef values often end in one; as a Host header or an
    # asset prefix it would fail every request, long after the check said ok.
    text = KNATIVE + "    host: ${KN_HOST}\nroutes:\n  asset_prefixes: ['${PREFIX}']\n"
    with pytest.raises(ConfigError) as info:
        config_from_text(text, file="r.yaml", env={"KN_HOST": "svc.ns.example.com\n", "PREFIX": "ext-ui/\n"})
    assert [(i.line, i.path) for i in info.value.issues] == [(7, "backends.k.host"),
                                                              (9, "routes.asset_prefixes[0]")]
    assert config_from_text(text, env={"KN_HOST": "svc.ns.example.com", "PREFIX": "ext-ui/"}).active.host


def test_shipped_config_loads_with_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_deployment_env(monkeypatch)
    for cfg in (load_config(RUNNER_YAML), load_config(RUNNER_YAML, env={})):
        active = cfg.active
        assert cfg.backend == "docker"
        assert (active.name, active.kind) == ("docker", "docker")
        assert active.url == "http://127.0.0.1:8085"
        assert active.public_base == "/runner"
        assert type(cfg.timeouts.read_ms) is int
        assert cfg.timeouts.read_ms == 30000
        assert active.timeouts == c.Timeouts(connect_ms=2000, read_ms=30000)
        assert active.service_token is None  # ${RUNNER_SERVICE_TOKEN:-} -> empty -> not sent
        assert sorted(cfg.backends) == ["docker", "knative"]
        assert cfg.backends["knative"].retry == c.Retry(attempts=3, budget_ms=10000, backoff_ms=100)
        assert cfg.access.networks == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
        assert cfg.access.tokens == ()
        assert cfg.source == str(RUNNER_YAML)
        assert len(cfg.sha256) == 64


DEPLOYMENT_ENV = {
    "RUNNER_BACKEND": "knative",
    "RUNNER_BASE_URL": "http://kourier-internal.kourier-system.svc.cluster.local:8080",
    "RUNNER_PUBLIC_BASE": "https://runner.example.com",
    "RUNNER_SERVICE_TOKEN": "svc-token-0123456789abcdef",
    "EXT_GATEWAY_TIMEOUT_MS": "1234",
}


def _assert_deployment(cfg: c.Config) -> None:
    active = cfg.active
    assert cfg.backend == "knative"
    assert active.kind == "knative"
    assert active.url == DEPLOYMENT_ENV["RUNNER_BASE_URL"]
    assert active.public_base == "https://runner.example.com"
    assert active.service_token == "svc-token-0123456789abcdef"
    assert type(active.timeouts.read_ms) is int
    assert active.timeouts.read_ms == 1234
    assert cfg.timeouts.read_ms == 1234
    assert active.retry.attempts == 3
    # The docker entry still gets its default URL and the global token.
    assert cfg.backends["docker"].url == "http://127.0.0.1:8085"
    assert cfg.backends["docker"].service_token == "svc-token-0123456789abcdef"


def test_shipped_config_with_the_reference_deployment_env(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_deployment_env(monkeypatch)
    _assert_deployment(load_config(RUNNER_YAML, env=DEPLOYMENT_ENV))
    for name, value in DEPLOYMENT_ENV.items():
        monkeypatch.setenv(name, value)
    _assert_deployment(load_config(RUNNER_YAML))
    monkeypatch.setenv("RUNNER_BACKEND", "docker")
    monkeypatch.setenv("RUNNER_DOCKER_HOST", "http://runner:8080")
    assert load_config(RUNNER_YAML).active.url == "http://runner:8080"


def _knative_example(tmp_path: Path) -> Path:
    text = KNATIVE_YAML.read_text(encoding="utf-8")
    assert "/var/run/secrets/runner/service-token" in text
    assert "/var/run/secrets/runner/gateway-token" in text
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "service-token").write_text("svc-abcdefghijklmnop\n", encoding="utf-8")
    (secrets / "gateway-token").write_text("gw-abcdefghijklmnopqrstu\n", encoding="utf-8")
    text = text.replace("/var/run/secrets/runner/service-token", "secrets/service-token")
    text = text.replace("/var/run/secrets/runner/gateway-token", str(secrets / "gateway-token"))
    target = tmp_path / "knative.yaml"
    target.write_text(text, encoding="utf-8")
    return target


def test_knative_example_loads_with_secret_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _knative_example(tmp_path)
    monkeypatch.chdir(REPO)  # the relative secret path must not depend on the cwd
    cfg = load_config(target, env={})
    active = cfg.active
    assert (cfg.backend, active.kind) == ("knative", "knative")
    assert active.url == "http://kourier-internal.kourier-system.svc.cluster.local"
    assert active.host == "alga-ext-runner.default.example.com"
    assert active.public_base == "https://runner.example.com"
    assert active.service_token == "svc-abcdefghijklmnop"
    assert active.retry == c.Retry(attempts=4, budget_ms=15000, backoff_ms=200)
    assert active.pool_size == 32
    assert cfg.access.tokens == ("gw-abcdefghijklmnopqrstu",)
    # In a cluster any pod reaches the app: no address is let in by itself, only the token
    # (a pod network trusted as proxies could name any client address, loopback included).
    assert cfg.access.networks == () and cfg.access.trusted_proxies == ()
    assert config_warnings(cfg.access) == []
    assert cfg.log_format == "json"
    # Per-backend timeouts merge with the shared ones: connect from the entry, read shared.
    assert cfg.timeouts == c.Timeouts(connect_ms=2000, read_ms=30000)
    assert active.timeouts == c.Timeouts(connect_ms=5000, read_ms=30000)


def test_backend_timeouts_override_merges_with_shared() -> None:
    text = (
        "version: 1\nbackend: a\nbackends:\n"
        "  a: {kind: docker, url: 'http://a', timeouts: {read_ms: 5000}}\n"
        "  b: {kind: docker, url: 'http://b', timeouts: {connect_ms: 300}}\n"
        "  c: {kind: docker, url: 'http://c'}\n"
        "timeouts: {connect_ms: 700, read_ms: 9000}\n"
    )
    cfg = config_from_text(text, env={})
    assert cfg.backends["a"].timeouts == c.Timeouts(connect_ms=700, read_ms=5000)
    assert cfg.backends["b"].timeouts == c.Timeouts(connect_ms=300, read_ms=9000)
    assert cfg.backends["c"].timeouts == c.Timeouts(connect_ms=700, read_ms=9000)
    bare = config_from_text("version: 1\nbackend: a\nbackends:\n  a: {kind: docker, url: 'http://a'}\n",
                            env={})
    assert bare.active.timeouts == c.Timeouts() == c.Timeouts(c.DEFAULT_CONNECT_MS, c.DEFAULT_READ_MS)


def test_backend_service_token_beats_the_global_one() -> None:
    text = (
        "version: 1\nbackend: a\nbackends:\n"
        "  a: {kind: docker, url: 'http://a', service_token: own-token-1234}\n"
        "  b: {kind: docker, url: 'http://b'}\n"
        "  c: {kind: docker, url: 'http://c', service_token: ''}\n"
        "upstream: {service_token: global-token-5678}\n"
    )
    cfg = config_from_text(text, env={})
    assert cfg.backends["a"].service_token == "own-token-1234"
    assert cfg.backends["b"].service_token == "global-token-5678"
    assert cfg.backends["c"].service_token == "global-token-5678"  # empty means "not set"
    assert "own-token-1234" not in repr(cfg)
    assert "global-token-5678" not in repr(cfg.backends["b"])


def test_config_is_frozen() -> None:
    cfg = config_from_text(BASE + "access: {tokens: [abcdefghijklmnopqr]}\n", env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.backend = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.active.url = "http://evil"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.timeouts.read_ms = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.access.tokens = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.backends["other"] = cfg.active  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.data["backend"] = "other"  # type: ignore[index]
    assert isinstance(cfg.asset_prefixes, tuple)
    assert isinstance(cfg.access.tokens, tuple)


MAPPING: dict[str, Any] = {
    "version": 1,
    "backend": "knative",
    "backends": {
        "docker": {"kind": "docker", "url": "http://127.0.0.1:8085"},
        "knative": {
            "kind": "knative",
            "url": "http://kourier.internal",
            "host": "runner.example.com",
            "public_base": "https://runner.example.com",
            "timeouts": {"connect_ms": 4000},
            "retry": {"attempts": 5},
        },
    },
    "timeouts": {"read_ms": 12000},
    "upstream": {"service_token": "tok-abcdefghijklmnop", "pool_size": 8},
}
MAPPING_YAML = """\
version: 1
backend: knative
backends:
  docker: {kind: docker, url: "http://127.0.0.1:8085"}
  knative:
    kind: knative
    url: http://kourier.internal
    host: runner.example.com
    public_base: https://runner.example.com
    timeouts: {connect_ms: 4000}
    retry: {attempts: 5}
timeouts: {read_ms: 12000}
upstream: {service_token: tok-abcdefghijklmnop, pool_size: 8}
"""


def test_config_from_mapping_matches_the_yaml_equivalent() -> None:
    from_code = config_from_mapping(MAPPING)
    from_yaml = config_from_text(MAPPING_YAML, env={})
    assert from_code.active == from_yaml.active
    assert from_code.backends == from_yaml.backends
    assert from_code.timeouts == from_yaml.timeouts
    assert from_code.source == "<mapping>"
    assert from_code.active.retry == c.Retry(attempts=5, budget_ms=10000, backoff_ms=100)
    assert from_code.active.timeouts == c.Timeouts(connect_ms=4000, read_ms=12000)
    # A tuple where YAML would have a list is fine in code.
    as_tuple = {**MAPPING, "routes": {"asset_prefixes": ("ext-ui/", "static/")}}
    assert config_from_mapping(as_tuple).asset_prefixes == ("ext-ui/", "static/")
    # A list given in code, past the loader, becomes a tuple too (the middleware needs one).
    replaced = dataclasses.replace(config_from_mapping(MAPPING), asset_prefixes=["ext-ui/", "static/"])
    assert replaced.asset_prefixes == ("ext-ui/", "static/")
    # The caller's mapping is not modified.
    assert MAPPING["backends"]["knative"]["timeouts"] == {"connect_ms": 4000}


def test_config_from_mapping_reports_errors_without_lines() -> None:
    bad = {**MAPPING, "backend": "nope", "timeouts": {"read_ms": 1},
           "backends": {**MAPPING["backends"], "docker": {"kind": "docker", "url": "htp://x"}}}
    with pytest.raises(ConfigError) as info:
        config_from_mapping(bad)
    issues = info.value.issues
    assert {(i.file, i.line) for i in issues} == {("<mapping>", None)}
    # Every error at once: the schema's two and the entry that does not exist.
    assert {i.path for i in issues} == {"backends.docker.url", "timeouts.read_ms", "backend"}
    assert "<mapping>: timeouts.read_ms: 1 is less than the minimum of 100" in str(info.value)

    with pytest.raises(ConfigError) as info:
        config_from_mapping({**MAPPING, "backend": "nope"})
    assert info.value.issues == [ConfigIssue("<mapping>", None, "backend",
                                             "'nope' is not an entry of backends (entries: docker, knative)")]

    with pytest.raises(ConfigError, match="the top level must be a mapping, not a list"):
        config_from_mapping([MAPPING])  # type: ignore[arg-type]


def test_config_from_mapping_does_not_interpolate_but_reads_secret_files(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file-abcdefghij\n", encoding="utf-8")
    data = {**MAPPING, "upstream": {"service_token": {"file": "token"}}}
    assert config_from_mapping(data, base_dir=tmp_path).active.service_token == "from-file-abcdefghij"
    literal = {**MAPPING, "upstream": {"service_token": "${NOT_EXPANDED}"}}
    assert config_from_mapping(literal).active.service_token == "${NOT_EXPANDED}"


def test_plugin_kinds_are_validated_by_their_own_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    class LambdaBackend:
        @classmethod
        def settings_schema(cls) -> dict[str, Any]:
            return {
                "type": "object",
                "additionalProperties": False,
                "required": ["kind", "url", "function"],
                "properties": {
                    "kind": {"const": "lambda"},
                    "url": {"type": "string"},
                    "function": {"type": "string", "minLength": 1},
                },
            }

    kinds = {**loader.known_kinds(), "lambda": LambdaBackend}
    monkeypatch.setattr(loader, "known_kinds", lambda: kinds)
    good = BASE + "  fn:\n    kind: lambda\n    url: http://lambda.internal\n    function: run\n"
    cfg = config_from_text(good, env={})
    assert cfg.backends["fn"].kind == "lambda"
    assert cfg.backends["fn"].options["function"] == "run"
    bad = BASE + "  fn:\n    kind: lambda\n    url: http://lambda.internal\n    functoin: run\n"
    with pytest.raises(ConfigError) as info:
        config_from_text(bad, file="p.yaml", env={})
    assert [(i.line, i.path) for i in info.value.issues] == [(7, "backends.fn"), (10, "backends.fn.functoin")]
    assert "missing required key 'function'" in str(info.value)
    unknown = BASE + "  x:\n    kind: nope\n    url: http://x\n"
    with pytest.raises(ConfigError, match=r"known kinds: docker, knative, lambda\)"):
        config_from_text(unknown, env={})


# --------------------------------------------------------------------------- defaults


def _schema_defaults(node: Any, pointer: str = "") -> dict[str, Any]:
    found: dict[str, Any] = {}
    if isinstance(node, dict):
        if "default" in node:
            found[pointer] = node["default"]
        for key, value in node.items():
            found.update(_schema_defaults(value, f"{pointer}/{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.update(_schema_defaults(value, f"{pointer}/{i}"))
    return found


def test_python_defaults_equal_the_schema_defaults() -> None:
    cfg = config_from_text(
        "version: 1\nbackend: d\nbackends:\n"
        "  d: {kind: docker, url: 'http://d'}\n"
        "  k: {kind: knative, url: 'http://k', retry: {}}\n",
        env={},
    )
    d, k = cfg.backends["d"], cfg.backends["k"]
    p = "/properties"
    expected = {
        f"{p}/limits{p}/max_body_bytes": (c.DEFAULT_MAX_BODY_BYTES, cfg.max_body_bytes),
        f"{p}/limits{p}/max_reply_bytes": (c.DEFAULT_MAX_REPLY_BYTES, cfg.max_reply_bytes, d.max_reply_bytes),
        f"{p}/upstream{p}/pool_size": (c.DEFAULT_POOL_SIZE, d.pool_size, k.pool_size),
        f"{p}/upstream{p}/pool_wait_ms": (c.DEFAULT_POOL_WAIT_MS, d.pool_wait_ms),
        f"{p}/routes{p}/asset_prefixes": (list(c.DEFAULT_ASSET_PREFIXES), list(cfg.asset_prefixes)),
        f"{p}/routes{p}/expose_runner_errors": (cfg.expose_runner_errors, c.Config.expose_runner_errors),
        f"{p}/access{p}/networks": (list(c.DEFAULT_NETWORKS), [str(n) for n in cfg.access.networks],
                                    [str(n) for n in c.Access().networks]),
        f"{p}/access{p}/tokens": (list(cfg.access.tokens), list(c.Access().tokens)),
        f"{p}/access{p}/trusted_proxies": ([str(n) for n in cfg.access.trusted_proxies],
                                           list(c.Access().trusted_proxies)),
        f"{p}/access{p}/hosts": (sorted(cfg.access.hosts), sorted(c.Access().hosts)),
        f"{p}/metrics{p}/enabled": (cfg.metrics_enabled, c.Config.metrics_enabled),
        f"{p}/logging{p}/format": (cfg.log_format, c.Config.log_format),
        f"{p}/logging{p}/access_log": (cfg.access_log, c.Config.access_log),
        f"/$defs/timeouts{p}/connect_ms": (c.DEFAULT_CONNECT_MS, cfg.timeouts.connect_ms,
                                            d.timeouts.connect_ms, c.Timeouts().connect_ms),
        f"/$defs/timeouts{p}/read_ms": (c.DEFAULT_READ_MS, cfg.timeouts.read_ms, d.timeouts.read_ms,
                                         c.Timeouts().read_ms),
        f"/$defs/knativeBackend{p}/retry{p}/attempts": (c.DEFAULT_RETRY_ATTEMPTS, k.retry.attempts,
                                                        c.Retry().attempts),
        f"/$defs/knativeBackend{p}/retry{p}/budget_ms": (c.DEFAULT_RETRY_BUDGET_MS, k.retry.budget_ms,
                                                         c.Retry().budget_ms),
        f"/$defs/knativeBackend{p}/retry{p}/backoff_ms": (c.DEFAULT_RETRY_BACKOFF_MS, k.retry.backoff_ms,
                                                          c.Retry().backoff_ms),
    }
    documented = _schema_defaults(main_schema())
    assert set(documented) == set(expected), "a schema default without a check here (or the reverse)"
    for pointer, values in expected.items():
        for value in values:
            assert value == documented[pointer], pointer
            assert type(value) is type(documented[pointer]), pointer
    # Documented in prose only: public_base defaults to /runner; docker never retries.
    assert d.public_base == c.DEFAULT_PUBLIC_BASE == "/runner"
    assert d.retry.attempts == 1


def test_sha256_is_of_the_file_bytes(tmp_path: Path) -> None:
    import hashlib

    target = tmp_path / "runner.yaml"
    shutil.copyfile(RUNNER_YAML, target)
    cfg = load_config(target, env={})
    assert cfg.sha256 == hashlib.sha256(target.read_bytes()).hexdigest()
    assert cfg.source == str(target)


# -- files the config names: found through the config folder's links, part of its digest ----------

CONFIGMAP_YAML = """version: 1
backend: k
backends:
  k:
    kind: knative
    url: https://runner.internal
    ca_bundle: ca.pem
    service_token: {file: svc-token}
"""


def _configmap_version(mount: Path, name: str, token: str, ca: bytes) -> None:
    """One version of a Kubernetes ConfigMap/Secret mount: files in a timestamped folder, made
    current by an atomic swap of the ``..data`` link (the kubelet's own steps)."""
    folder = mount / name
    folder.mkdir()
    (folder / "runner.yaml").write_text(CONFIGMAP_YAML, encoding="utf-8")
    (folder / "svc-token").write_text(token + "\n", encoding="utf-8")
    (folder / "ca.pem").write_bytes(ca)
    link = mount / "..data_tmp"
    link.symlink_to(name)
    link.rename(mount / "..data")
    for file in ("runner.yaml", "svc-token", "ca.pem"):
        if not (mount / file).is_symlink():
            (mount / file).symlink_to(f"..data/{file}")


def test_files_are_found_through_a_configmap_mount_and_rotating_them_changes_the_config(
        tmp_path: Path, self_signed: tuple[Path, Path]) -> None:
    ca_one = self_signed[0].read_bytes()
    ca_two = ca_one + ca_one  # other bytes, still a bundle that loads
    mount = tmp_path / "runner-config"
    mount.mkdir()
    _configmap_version(mount, "..2026_11_27_a", "first-service-token-0001", ca_one)
    first = load_config(mount / "runner.yaml")
    # Through the mount's own links, never pinned in the timestamped folder.
    assert first.active.ca_bundle == str(mount / "ca.pem")
    assert first.active.service_token == "first-service-token-0001"
    assert load_config(mount / "runner.yaml").sha256 == first.sha256  # same files: same digest

    # The kubelet's update: a new folder, the link swapped, the old folder deleted.
    _configmap_version(mount, "..2026_11_27_b", "second-service-token-002", ca_one)
    shutil.rmtree(mount / "..2026_11_27_a")
    second = load_config(mount / "runner.yaml")  # the YAML did not change: the secret did
    assert second.active.service_token == "second-service-token-002"
    assert second.sha256 != first.sha256
    assert Path(second.active.ca_bundle or "").read_bytes() == ca_one

    _configmap_version(mount, "..2026_11_27_c", "second-service-token-002", ca_two)
    shutil.rmtree(mount / "..2026_11_27_b")
    third = load_config(mount / "runner.yaml")  # only the CA bundle changed
    assert third.sha256 not in (first.sha256, second.sha256)


def test_a_config_naming_no_file_keeps_its_own_sha256(tmp_path: Path) -> None:
    import hashlib

    file = tmp_path / "runner.yaml"
    file.write_text("version: 1\nbackend: a\nbackends:\n  a:\n    kind: docker\n    url: http://127.0.0.1:1\n")
    assert load_config(file).sha256 == hashlib.sha256(file.read_bytes()).hexdigest()


@pytest.mark.parametrize(("key", "url", "shown"), [
    ("url", "http://admin:Hunter2Secret@127.0.0.1:8085", "'http://***@127.0.0.1:8085'"),
    ("url", "http://127.0.0.1:8085/?token=Hunter2Secret", "'http://127.0.0.1:8085/?***'"),
    ("url", "http://127.0.0.1:8085/x#Hunter2Secret", "'http://127.0.0.1:8085/x#***'"),
    ("public_base", "https://u:Hunter2Secret@cdn.example/ext?Hunter2Secret", "'https://***@cdn.example/ext?***'"),
    # A password may hold "/", "#" or "?" (base64): masked up to the last "@".
    ("url", "https://svc:Zm9v/Hunter2Secret+Kw==@runner.example", "'https://***@runner.example'"),
    ("url", "https://svc:pa#Hunter2Secret@runner.example", "'https://***@runner.example'"),
    ("url", "https://svc:pa?Hunter2Secret@runner.example", "'https://***@runner.example'"),
    ("url", "https://svc:Hunter2Secret@runner.example:80a", "'https://***@runner.example:80a'"),
    # No scheme (a ${RUNNER_BASE_URL} without one), scheme-relative, a leading space.
    ("url", "user:Hunter2Secret@runner:8080", "'***@runner:8080'"),
    ("url", "//user:Hunter2Secret@runner:8080/", "'***@runner:8080/'"),
    ("url", " http://user:Hunter2Secret@runner", "' http://***@runner'"),
])
def test_a_refused_url_is_not_echoed_with_its_credentials(
        tmp_path: Path, key: str, url: str, shown: str) -> None:
    # The error goes to a terminal, the master's journal line and every worker's status.
    file = tmp_path / "runner.yaml"
    entry = {"kind": "docker", "url": "http://127.0.0.1:8085", key: url}
    file.write_text(json.dumps({"version": 1, "backend": "d", "backends": {"d": entry}}), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(file)
    assert "Hunter2Secret" not in str(err.value)
    (issue,) = err.value.issues
    assert issue.path == f"backends.d.{key}" and issue.line == 1 and issue.message.startswith(shown), issue
