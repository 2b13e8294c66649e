"""`runner-mw check FILE`: exit 0 + redacted summary, exit 1 + every error, exit 2 on usage errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runner_mw.cli import main
from runner_mw.errors import ConfigError
from runner_mw.loader import load_config

REPO = Path(__file__).resolve().parent.parent
RUNNER_YAML = REPO / "config" / "runner.yaml"
DEPLOYMENT_VARS = (
    "RUNNER_BACKEND",
    "RUNNER_BASE_URL",
    "RUNNER_DOCKER_HOST",
    "RUNNER_PUBLIC_BASE",
    "RUNNER_SERVICE_TOKEN",
    "EXT_GATEWAY_TIMEOUT_MS",
)
SECRET = "s3cr3t-Service-Token-0123456789"
GATEWAY_TOKEN = "gw-Bearer-Token-abcdefghijklmnop"

BAD = (
    "version: 1\n"
    "backend: docker\n"
    "backends:\n"
    "  docker:\n"
    "    kind: docker\n"
    "    url: htp://127.0.0.1:8085\n"
    "    urll: http://x\n"
    "timeouts:\n"
    "  read_ms: 5\n"
)


@pytest.fixture(autouse=True)
def _no_deployment_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in DEPLOYMENT_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    target = tmp_path / "bad.yaml"
    target.write_text(BAD, encoding="utf-8")
    return target


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """A valid config with a bearer token from a file and the service token from the env."""
    (tmp_path / "gateway-token").write_text(GATEWAY_TOKEN + "\n", encoding="utf-8")
    target = tmp_path / "secret.yaml"
    target.write_text(
        "version: 1\nbackend: k\nbackends:\n"
        "  k:\n    kind: knative\n    url: http://kourier.internal\n"
        "    service_token: ${RUNNER_SERVICE_TOKEN}\n"
        "access:\n  tokens:\n    - {file: gateway-token}\n",
        encoding="utf-8",
    )
    return target


def test_check_ok_prints_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(RUNNER_YAML)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"{RUNNER_YAML}: ok"
    text = "\n".join(lines)
    assert "backend      docker (kind docker)" in text
    assert "url          http://127.0.0.1:8085" in text
    assert "public_base  /runner" in text
    assert "timeouts     connect 2000 ms, read 30000 ms" in text
    assert "backends     docker, knative" in text
    assert len(lines) < 15  # short


def test_check_warns_about_claimable_loopback_but_still_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "proxied.yaml"
    target.write_text("version: 1\nbackend: d\nbackends:\n  d: {kind: docker, url: 'http://127.0.0.1:8085'}\n"
                      "access:\n  trusted_proxies: [127.0.0.1/32]\n", encoding="utf-8")
    assert main(["check", str(target)]) == 0  # valid: a warning is not an error
    out, err = capsys.readouterr()
    assert out.startswith(f"{target}: ok")
    (line,) = err.splitlines()
    assert line.startswith(f"runner-mw: {target}: warning: access.networks: ::1/128 holds loopback")
    assert main(["check", "--json", str(target)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert [w.split()[1] for w in report["summary"]["warnings"]] == ["::1/128"]


def test_check_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RUNNER_BACKEND", "knative")
    monkeypatch.setenv("RUNNER_BASE_URL", "http://kourier.internal:8080")
    monkeypatch.setenv("EXT_GATEWAY_TIMEOUT_MS", "4321")
    assert main(["check", str(RUNNER_YAML)]) == 0
    out = capsys.readouterr().out
    assert "backend      knative (kind knative)" in out
    assert "url          http://kourier.internal:8080" in out
    assert "read 4321 ms" in out


def test_secrets_are_shown_as_stars(
    secret_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RUNNER_SERVICE_TOKEN", SECRET)
    assert main(["check", str(secret_file)]) == 0
    out, err = capsys.readouterr()
    assert "service token ***" in out
    assert "1 token(s)" in out
    for secret in (SECRET, GATEWAY_TOKEN):
        assert secret not in out + err

    assert main(["check", "--json", str(secret_file)]) == 0
    out, err = capsys.readouterr()
    for secret in (SECRET, GATEWAY_TOKEN):
        assert secret not in out + err
    summary = json.loads(out)["summary"]
    assert summary["service_token"] == "***"
    assert summary["access"]["tokens"] == ["***"]
    assert summary["config"]["backends"]["k"]["service_token"] == "***"
    assert summary["config"]["access"]["tokens"] == ["***"]


def test_shipped_config_secret_from_env_is_redacted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RUNNER_SERVICE_TOKEN", SECRET)
    for argv in (["check", str(RUNNER_YAML)], ["check", "--json", str(RUNNER_YAML)]):
        assert main(argv) == 0
        out, err = capsys.readouterr()
        assert "***" in out
        assert SECRET not in out + err


def test_check_bad_file_lists_every_error(bad_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(bad_file)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == f"runner-mw: {bad_file}: invalid configuration"
    assert lines[1].startswith(f"{bad_file}:6: backends.docker.url: 'htp://127.0.0.1:8085' ")
    assert lines[2].startswith(f"{bad_file}:7: backends.docker.urll: unknown key 'urll'")
    assert lines[3].startswith(f"{bad_file}:9: timeouts.read_ms: 5 is less than the minimum of 100")
    assert len(lines) == 4


def test_check_json_ok_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--json", str(RUNNER_YAML)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    report = json.loads(out)
    assert set(report) == {"ok", "errors", "summary"}
    assert report["ok"] is True
    assert report["errors"] == []
    summary = report["summary"]
    assert summary["backend"] == "docker"
    assert summary["kind"] == "docker"
    assert summary["url"] == "http://127.0.0.1:8085"
    assert summary["public_base"] == "/runner"
    assert summary["timeouts"] == {"connect_ms": 2000, "read_ms": 30000}
    assert summary["file"] == str(RUNNER_YAML)
    assert len(summary["sha256"]) == 64
    assert summary["backends"] == ["docker", "knative"]
    assert summary["warnings"] == []  # the shipped file: nothing to warn about


def test_check_json_error_shape(bad_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(bad_file), "--json"]) == 1
    out, _ = capsys.readouterr()
    report = json.loads(out)
    assert report["ok"] is False
    assert report["summary"] is None
    assert [set(e) for e in report["errors"]] == [{"file", "line", "path", "message"}] * 3
    assert [(e["file"], e["line"], e["path"]) for e in report["errors"]] == [
        (str(bad_file), 6, "backends.docker.url"),
        (str(bad_file), 7, "backends.docker.urll"),
        (str(bad_file), 9, "timeouts.read_ms"),
    ]
    assert "unknown key 'urll'" in report["errors"][1]["message"]


def test_check_missing_file_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["check", str(missing)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{missing}: (top level): cannot read file: No such file or directory" in err
    assert main(["check", "--json", str(missing)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == [{"file": str(missing), "line": None, "path": "",
                                 "message": "cannot read file: No such file or directory"}]


def test_check_unreadable_file_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An open() that fails for another reason than a missing file. (Permission bits would
    # not do: CI runs as root, which reads any file.) Its folder is a regular file here.
    folder = tmp_path / "not-a-folder"
    folder.write_text("", encoding="utf-8")
    target = folder / "runner.yaml"
    assert main(["check", str(target)]) == 1
    assert f"{target}: (top level): cannot read file: Not a directory" in capsys.readouterr().err


def test_check_directory_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path)]) == 1
    assert "cannot read file: Is a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["check"], ["check", "a.yaml", "b.yaml"], ["check", "--nope", "a.yaml"]],
    ids=["no-args", "unknown-command", "check-no-file", "check-two-files", "check-unknown-option"],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "usage: runner-mw" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["check", "--help"])
    assert info.value.code == 0
    assert "--json" in capsys.readouterr().out


# --------------------------------------------------------------------------- as a real process


def _cli(*args: str, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in DEPLOYMENT_VARS and not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "runner_mw.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_real_process_ok_missing_and_usage(tmp_path: Path) -> None:
    ok = _cli("check", str(RUNNER_YAML), cwd=tmp_path, extra_env={"RUNNER_SERVICE_TOKEN": SECRET})
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"{RUNNER_YAML}: ok\n")
    assert "service token ***" in ok.stdout
    assert SECRET not in ok.stdout + ok.stderr

    missing = _cli("check", "missing.yaml", cwd=tmp_path)
    assert missing.returncode == 1
    assert "missing.yaml: (top level): cannot read file" in missing.stderr
    assert "Traceback" not in missing.stderr

    usage = _cli(cwd=tmp_path)
    assert usage.returncode == 2
    assert "usage: runner-mw" in usage.stderr


def test_check_never_raises_on_odd_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head = "version: 1\nbackend: d\nbackends:\n  d: {kind: docker, url: 'http://x'}\n"
    failures = []
    odd = [
        ("control", "logging: {format: \x07}\n"),
        ("merge", "metrics:\n  <<: {enabled: true}\n"),
        ("tag", "metrics: {enabled: !maybe x}\n"),
        ("bad-int", "upstream: {pool_size: !!int x}\n"),
        ("deep", "metrics: " + "[" * 5000 + "]" * 5000 + "\n"),
    ]
    for name, tail in odd:
        target = tmp_path / f"{name}.yaml"
        target.write_text(head + tail, encoding="utf-8")
        try:
            code = main(["check", str(target)])
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}")
            continue
        if code != 1 or not re.search(rf"{re.escape(str(target))}:[56]:", capsys.readouterr().err):
            failures.append(name)
    assert failures == []


def test_a_duplicate_secret_key_says_so_without_the_values(tmp_path: Path) -> None:
    target = tmp_path / "dup.yaml"
    target.write_text("version: 1\nbackend: d\nbackends:\n  d: {kind: docker, url: 'http://x'}\n"
                      "upstream:\n  service_token: aaaaaaaaaaaaaaaaaaaa\n"
                      "  service_token: bbbbbbbbbbbbbbbbbbbb\n",
                      encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(target)
    (issue,) = err.value.issues
    assert issue.line == 7 and issue.message == "duplicate key 'service_token' (first at line 6)"
    assert "aaaa" not in str(err.value) and "bbbb" not in str(err.value)


def test_check_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    target = tmp_path / "bad.yaml"
    target.write_text("version: 2\n" * 1 + "backends: {}\n" + "".join(f"x{i}: 1\n" for i in range(3000)),
                      encoding="utf-8")
    code = f"import sys; from runner_mw.cli import main; sys.exit(main(['check', '--json', {str(target)!r}]))"
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.read(10)
        proc.stdout.close()  # as "| head -c 10" does
        err = proc.stderr.read().decode()
        assert proc.wait(60) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
