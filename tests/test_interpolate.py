"""runner_mw.interpolate: ${VAR} / ${VAR:-default} / $${ and {file: PATH} secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner_mw.config import SECRET_KEYS
from runner_mw.errors import ConfigError
from runner_mw.interpolate import MAX_SECRET_FILE_BYTES, interpolate, interpolate_scalar, resolve_files
from runner_mw.loader import config_from_text, load_config

ENV = {"HOST": "runner.internal", "PORT": "8085", "EMPTY": "", "FLAG": "false", "NOTHING": "null"}

# Lines 1-6; what a test appends starts on line 7.
BASE = (
    "version: 1\n"
    "backend: docker\n"
    "backends:\n"
    "  docker:\n"
    "    kind: docker\n"
    "    url: http://127.0.0.1:8085\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${HOST}", "runner.internal"),
        ("http://${HOST}:${PORT}/v1", "http://runner.internal:8085/v1"),
        ("${UNSET:-fallback}", "fallback"),
        ("${HOST:-fallback}", "runner.internal"),
        ("${EMPTY:-fallback}", "fallback"),  # like the shell's :- an empty value takes the default
        ("${EMPTY}", ""),  # set but empty, no default: empty
        ("${UNSET:-}", ""),
        ("${UNSET:-a:-b c}", "a:-b c"),
        ("$${HOST}", "${HOST}"),
        ("$${HOST} is ${HOST}", "${HOST} is runner.internal"),
        ("$${", "${"),
        ("cost: $5 {x}", "cost: $5 {x}"),
        ("$HOST", "$HOST"),
        ("${_UNDER_9:-ok}", "ok"),
        ("no dollars at all", "no dollars at all"),
    ],
)
def test_interpolate(text: str, expected: str) -> None:
    assert interpolate(text, ENV) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${HOST", "unterminated '${'"),
        ("http://${HOST", "write '$${' for a literal"),
        ("${}", "invalid expression '${}'"),
        ("${1ABC}", "invalid expression '${1ABC}'"),
        ("${A-B}", "invalid expression"),
        ("${A B}", "invalid expression"),
        ("${A:default}", "invalid expression"),
        ("${UNSET_VAR}", "environment variable UNSET_VAR is not set and has no default"),
        # Compose and shells nest defaults; read here, the default was the text "${B" + "}".
        ("${UNSET_VAR:-${HOST}}", "a ${...} inside a ${...} is not supported"),
        ("x${A:-${B:-c}}y", "a ${...} inside a ${...} is not supported"),
    ],
)
def test_interpolate_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        interpolate(text, ENV)
    assert message in str(info.value)


def test_unset_variable_message_suggests_a_default() -> None:
    with pytest.raises(ValueError, match=r"write \$\{MISSING:-default\} to give one"):
        interpolate("${MISSING}", {})


@pytest.mark.parametrize(
    ("text", "plain", "expected"),
    [
        ("${PORT}", True, 8085),
        ("${PORT}", False, "8085"),  # quoted: stays a string
        ("${UNSET:-30000}", True, 30000),
        ("${FLAG}", True, False),
        ("${UNSET:-true}", True, True),
        ("${NOTHING}", True, None),
        ("${EMPTY}", True, None),
        ("${UNSET:-}", True, None),
        ("${UNSET:-1.5}", True, 1.5),
        ("${HOST}", True, "runner.internal"),
        ("${UNSET:-[1, 2]}", True, "[1, 2]"),  # only scalars are re-read
        ("${UNSET:-a: b}", True, "a: b"),
        ("${UNSET:-*alias}", True, "*alias"),  # not valid YAML: kept as text
        ("port ${PORT}", True, "port 8085"),  # mixed: a string
        ("${PORT}${PORT}", True, "80858085"),  # two expressions: a string
        ("$${PORT}", True, "${PORT}"),
        ("plain text", True, "plain text"),
    ],
)
def test_interpolate_scalar_rereads_a_lone_plain_expression(text: str, plain: bool, expected: object) -> None:
    value = interpolate_scalar(text, plain, ENV)
    assert value == expected
    assert type(value) is type(expected)


def test_read_ms_from_the_environment_is_an_int() -> None:
    text = BASE + "timeouts:\n  read_ms: ${EXT_GATEWAY_TIMEOUT_MS:-30000}\n"
    assert config_from_text(text, env={}).timeouts.read_ms == 30000
    cfg = config_from_text(text, env={"EXT_GATEWAY_TIMEOUT_MS": "4500"})
    assert cfg.timeouts.read_ms == 4500
    assert type(cfg.timeouts.read_ms) is int
    text = BASE + "metrics:\n  enabled: ${METRICS:-true}\n"
    assert config_from_text(text, env={"METRICS": "false"}).metrics_enabled is False


def test_quoted_expression_stays_a_string_and_fails_the_schema() -> None:
    for quote in ("'", '"'):
        text = BASE + f"timeouts:\n  read_ms: {quote}${{T:-30000}}{quote}\n"
        with pytest.raises(ConfigError) as info:
            config_from_text(text, file="q.yaml", env={})
        assert [str(i) for i in info.value.issues] == [
            "q.yaml:8: timeouts.read_ms: '30000' is not of type 'integer'"
        ]


def test_mixed_string_stays_a_string() -> None:
    cfg = config_from_text(BASE.replace("http://127.0.0.1:8085", "http://${HOST}:${PORT}"), env=ENV)
    assert cfg.active.url == "http://runner.internal:8085"


def test_literal_dollar_brace_in_a_config() -> None:
    text = BASE + "access:\n  tokens:\n    - $${NOT_A_VAR}-0123456789\n"
    assert config_from_text(text, env={}).access.tokens == ("${NOT_A_VAR}-0123456789",)


def test_unset_variable_error_names_variable_key_path_and_line() -> None:
    text = BASE + "upstream:\n  pool_size: 4\n  service_token: ${RUNNER_TOKEN_NOT_SET}\n"
    with pytest.raises(ConfigError) as info:
        config_from_text(text, file="cfg.yaml", env={})
    [issue] = info.value.issues
    assert (issue.file, issue.line, issue.path) == ("cfg.yaml", 9, "upstream.service_token")
    assert "RUNNER_TOKEN_NOT_SET" in issue.message
    assert str(info.value).startswith(
        "cfg.yaml:9: upstream.service_token: environment variable RUNNER_TOKEN_NOT_SET is not set")


def test_interpolation_errors_in_list_items_and_nested_keys() -> None:
    text = BASE + "    public_base: ${PB\n" + "access:\n  networks:\n    - 127.0.0.1/32\n    - ${NET}\n"
    with pytest.raises(ConfigError) as info:
        config_from_text(text, file="cfg.yaml", env={})
    assert [(i.line, i.path) for i in info.value.issues] == [
        (7, "backends.docker.public_base"),
        (11, "access.networks[1]"),
    ]
    assert "unterminated" in info.value.issues[0].message
    assert "environment variable NET is not set" in info.value.issues[1].message


def test_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_MW_TEST_URL", "http://from-environ:9000")
    text = BASE.replace("http://127.0.0.1:8085", "${RUNNER_MW_TEST_URL}")
    assert config_from_text(text).active.url == "http://from-environ:9000"
    assert config_from_text(text, env={"RUNNER_MW_TEST_URL": "http://given"}).active.url == "http://given"


# --------------------------------------------------------------------------- {file: PATH} secrets


def _secret_file_problem(folder: Path) -> str:
    """The one issue loading ``_config(folder, "token")`` gives, at the reference's key."""
    with pytest.raises(ConfigError) as info:
        load_config(_config(folder, "token"), env={})
    [issue] = info.value.issues
    assert (issue.line, issue.path) == (8, "upstream.service_token.file")
    return issue.message


def _config(folder: Path, token_ref: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "runner.yaml"
    target.write_text(BASE + f"upstream:\n  service_token: {{file: {token_ref}}}\n", encoding="utf-8")
    return target


def test_secret_file_absolute(tmp_path: Path) -> None:
    secret = tmp_path / "secrets" / "token"
    secret.parent.mkdir()
    secret.write_text("abs-secret-value\n", encoding="utf-8")
    cfg = load_config(_config(tmp_path / "conf", str(secret)), env={})
    assert cfg.active.service_token == "abs-secret-value"


def test_secret_file_relative_to_the_config_folder_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    (conf / "secrets").mkdir(parents=True)
    (conf / "secrets" / "token").write_text("right-one\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "secrets").mkdir(parents=True)
    (elsewhere / "secrets" / "token").write_text("wrong-one\n", encoding="utf-8")
    target = _config(conf, "secrets/token")
    monkeypatch.chdir(elsewhere)
    assert load_config(target, env={}).active.service_token == "right-one"
    # Also when the config file itself is named relative to the cwd.
    monkeypatch.chdir(tmp_path)
    assert load_config("conf/runner.yaml", env={}).active.service_token == "right-one"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"token\n", "token"),
        (b"token", "token"),
        (b"token\n\n", None),  # only one newline is stripped: the rest is refused as a token
        (b"to ken", None),
        (b"token\r\n", None),
    ],
)
def test_secret_file_one_trailing_newline_stripped(
    tmp_path: Path, content: bytes, expected: str | None
) -> None:
    (tmp_path / "token").write_bytes(content)
    target = _config(tmp_path, "token")
    if expected is not None:
        assert load_config(target, env={}).active.service_token == expected
        return
    with pytest.raises(ConfigError) as info:
        load_config(target, env={})
    assert [(i.line, i.path) for i in info.value.issues] == [(8, "upstream.service_token")]
    assert "visible ASCII" in str(info.value)


def test_resolve_files_strips_exactly_one_newline(tmp_path: Path) -> None:
    (tmp_path / "two").write_text("value\n\n", encoding="utf-8")
    data, problems = resolve_files(
        {"service_token": {"file": "two"}, "tokens": [{"file": "two"}], "c": 3}, tmp_path,
        secret_keys=SECRET_KEYS)
    assert problems == []
    assert data == {"service_token": "value\n", "tokens": ["value\n"], "c": 3}


def test_file_reference_outside_a_secret_key_is_left_for_the_schema(tmp_path: Path) -> None:
    (tmp_path / "two").write_text("value\n", encoding="utf-8")
    data, problems = resolve_files({"timeouts": {"file": "two"}}, tmp_path, secret_keys=SECRET_KEYS)
    assert problems == []
    assert data == {"timeouts": {"file": "two"}}


def test_secret_file_missing_names_key_path_and_line(tmp_path: Path) -> None:
    target = _config(tmp_path, "no-such-token")
    with pytest.raises(ConfigError) as info:
        load_config(target, env={})
    [issue] = info.value.issues
    assert (issue.line, issue.path) == (8, "upstream.service_token.file")
    assert "cannot read secret file" in issue.message
    assert str(tmp_path / "no-such-token") in issue.message
    assert "No such file or directory" in issue.message
    assert str(info.value).startswith(f"{target}:8: upstream.service_token.file: ")


def test_secret_file_missing_in_a_list(tmp_path: Path) -> None:
    target = tmp_path / "runner.yaml"
    target.write_text(BASE + "access:\n  tokens:\n    - abcdefghijklmnopq\n    - {file: gone}\n",
                      encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(target, env={})
    assert [(i.line, i.path) for i in info.value.issues] == [(10, "access.tokens[1].file")]


def test_secret_file_oversize(tmp_path: Path) -> None:
    (tmp_path / "token").write_bytes(b"a" * (MAX_SECRET_FILE_BYTES + 1))
    assert f"larger than {MAX_SECRET_FILE_BYTES} bytes" in _secret_file_problem(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n"])
def test_secret_file_empty_is_an_error_not_no_token(tmp_path: Path, content: bytes) -> None:
    # Most likely a file caught while it is rewritten in place: a reload then kept the last
    # config but dropped its token, silently.
    (tmp_path / "token").write_bytes(content)
    assert "is empty" in _secret_file_problem(tmp_path)


def test_a_nested_default_in_a_secret_is_an_error_not_a_literal_token(tmp_path: Path) -> None:
    target = tmp_path / "runner.yaml"
    target.write_text(BASE + "upstream:\n  service_token: ${RUNNER_SERVICE_TOKEN:-${LEGACY_TOKEN}}\n",
                      encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(target, env={"LEGACY_TOKEN": "abcdefabcdefabcdef"})
    [issue] = info.value.issues
    assert (issue.line, issue.path) == (8, "upstream.service_token")


def test_secret_file_exactly_at_the_cap_is_read(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"a" * MAX_SECRET_FILE_BYTES)
    data, problems = resolve_files({"service_token": {"file": "big"}}, tmp_path, secret_keys=SECRET_KEYS)
    assert problems == []
    assert len(data["service_token"]) == MAX_SECRET_FILE_BYTES


def test_secret_file_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "token").write_bytes(b"\xff\xfe\x00binary")
    assert "is not UTF-8 text" in _secret_file_problem(tmp_path)


def test_secret_file_reference_must_be_a_path(tmp_path: Path) -> None:
    data, problems = resolve_files({"tokens": [{"file": ""}, {"file": 3}]}, tmp_path, secret_keys=SECRET_KEYS)
    assert problems == [(("tokens", 0, "file"), "must be a non-empty path string"),
                        (("tokens", 1, "file"), "must be a non-empty path string")]
    assert data == {"tokens": [None, None]}


def test_secret_file_path_is_interpolated(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("via-env-path\n", encoding="utf-8")
    target = _config(tmp_path / "conf", "'${SECRETS_DIR}/token'")  # quoted: `{` is flow syntax
    assert load_config(target, env={"SECRETS_DIR": str(tmp_path)}).active.service_token == "via-env-path"


def test_secret_file_content_is_not_interpolated(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("${NOT_EXPANDED}\n", encoding="utf-8")
    cfg = load_config(_config(tmp_path, "token"), env={"NOT_EXPANDED": "x"})
    assert cfg.active.service_token == "${NOT_EXPANDED}"
