"""The deployment files agree with each other and with the configs, checked statically (no Docker).

docker-compose.runner-dev.yml (validated by ``docker-compose config`` when the binary is there),
config/runner.yaml, config/compose.yaml, the Dockerfile, deploy/knative/*.yaml,
deploy/systemd/runner-mw.service and scripts/dev-runner.sh: same ports, same variables, same
paths, the Compose subnet admitted by ``access.networks``, every config valid.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from requires import missing

from runner_mw import load_config
from runner_mw.access import config_warnings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.runner-dev.yml"
RUNNER_IMAGE = "ghcr.io/alga/runner"
APP_CMD = ["gunicorn", "-c", "config/gunicorn.conf.py", "examples.wsgi_app:application"]
T = 60.0


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return doc


def resolve(value: str) -> str:
    """A Compose value as with nothing set in the environment: ``${X:-default}`` is the default."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m[1] or "", str(value))


def gateway_env() -> dict[str, str]:
    return {k: resolve(v) for k, v in compose()["services"]["gateway"]["environment"].items()}


def port_mapping(text: str) -> tuple[str, int, int]:
    """``"127.0.0.1:8085:8080"`` -> (host ip, published, container port)."""
    host, published, target = text.split("/")[0].rsplit(":", 2)
    return host, int(published), int(target)


def subnet() -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    (network,) = compose()["networks"].values()
    (pool,) = network["ipam"]["config"]
    return ipaddress.ip_network(pool["subnet"])


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def instruction(name: str) -> list[str]:
    return [rest for word, rest in dockerfile() if word == name]


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=T, check=False).returncode == 0:
        return ["docker", "compose"]
    return None


# --------------------------------------------------------------------------- Compose


def test_compose_file_validates_offline() -> None:
    command = compose_command()
    if command is None:
        missing("docker-compose is not installed (Debian/Ubuntu: apt-get install docker-compose); "
                    "the file's contents are still checked by the other tests of this module")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNNER_", "DOCKER_", "COMPOSE_"))}
    done = subprocess.run([*command, "-f", str(COMPOSE), "config"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=T, check=False)
    assert done.returncode == 0, done.stderr
    normalized = yaml.safe_load(done.stdout)
    runner, gateway = normalized["services"]["runner"], normalized["services"]["gateway"]
    assert runner["image"].startswith(RUNNER_IMAGE)
    assert [port_mapping(p) if isinstance(p, str) else (p.get("host_ip"), int(p["published"]), p["target"])
            for p in runner["ports"]] == [("127.0.0.1", 8085, 8080)]
    assert gateway["environment"]["RUNNER_DOCKER_HOST"] == "http://runner:8080"


def test_compose_ports_and_variables_agree_with_the_configs() -> None:
    services = compose()["services"]
    runner, gateway = services["runner"], services["gateway"]
    assert runner["image"].startswith(RUNNER_IMAGE)
    (runner_ports,) = runner["ports"]
    host_ip, published, container_port = port_mapping(runner_ports)
    # Loopback only: the runner checks no credential.
    assert (host_ip, published, container_port) == ("127.0.0.1", 8085, 8080)

    # On the host: config/runner.yaml's default docker URL is the published port.
    local = load_config(ROOT / "config" / "runner.yaml", env={})
    assert local.active.kind == "docker"
    assert urlsplit(local.active.url).port == published

    # In Compose: the gateway reaches the runner by service name on the container port.
    env = gateway_env()
    upstream = urlsplit(env["RUNNER_DOCKER_HOST"])
    assert upstream.hostname in services and upstream.hostname == "runner"
    assert upstream.port == container_port
    assert env["RUNNER_BACKEND"] == "docker"
    assert env["RUNNER_MW_CONFIG"] == "/app/config/compose.yaml"  # the Dockerfile copies config/ to /app
    assert (ROOT / "config" / "compose.yaml").is_file()
    bind_port = int(env["RUNNER_MW_BIND"].rsplit(":", 1)[1])
    (gateway_ports,) = gateway["ports"]
    assert port_mapping(gateway_ports)[0] == "127.0.0.1"
    assert port_mapping(gateway_ports)[2] == bind_port == int(instruction("EXPOSE")[0])
    assert {*runner["networks"], *gateway["networks"]} == set(compose()["networks"])


def test_compose_config_checks_and_admits_the_compose_subnet(tmp_path: Path) -> None:
    env = gateway_env()
    config = load_config(ROOT / "config" / "compose.yaml", env=env)
    assert config.active.url == env["RUNNER_DOCKER_HOST"]
    net = subnet()
    assert any(net.version == n.version and net.subnet_of(n)  # type: ignore[arg-type]
               for n in config.access.networks), f"{net} is not inside access.networks"

    # `runner-mw check` passes with the Compose environment (and only that).
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RUNNER_", "EXT_GATEWAY_"))}
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-m", "runner_mw.cli", "check", "--json", "config/compose.yaml"],
                          cwd=ROOT, env={**base, **env, "PYTHONPATH": path}, capture_output=True, text=True,
                          timeout=T, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["summary"]["url"] == "http://runner:8080"
    assert str(net) in report["summary"]["access"]["networks"]


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_agrees_with_compose_and_gunicorn_config() -> None:
    assert instruction("FROM") == ["python:3.11-slim"]
    (cmd,) = instruction("CMD")
    assert json.loads(cmd) == APP_CMD
    assert (ROOT / APP_CMD[2]).is_file() and (ROOT / "examples" / "wsgi_app.py").is_file()
    assert instruction("WORKDIR")[-1] == "/app"  # where CMD's relative paths are found
    (expose,) = instruction("EXPOSE")
    env = " ".join(instruction("ENV"))
    bind = re.search(r"RUNNER_MW_BIND=(\S+)", env)
    assert bind and bind[1] == f"0.0.0.0:{expose}"
    (health,) = instruction("HEALTHCHECK")
    assert f"http://127.0.0.1:{expose}/runner/-/healthz" in health
    users = instruction("USER")
    assert users and users[-1] not in ("root", "0")
    # `pip install .` or `pip install ".[extras]"`: the package from the copied sources.
    assert any(re.search(r'pip install\b.*\s"?\.(\[[\w,]+\])?"?(\s|$)', run) for run in instruction("RUN"))
    for copy in instruction("COPY"):
        for source in shlex.split(copy)[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


# --------------------------------------------------------------------------- Kubernetes / Knative


def manifests(name: str) -> list[dict[str, Any]]:
    text = (ROOT / "deploy" / "knative" / name).read_text(encoding="utf-8")
    return [doc for doc in yaml.safe_load_all(text) if doc]


def test_knative_runner_service() -> None:
    (service,) = manifests("runner.yaml")
    assert (service["apiVersion"], service["kind"]) == ("serving.knative.dev/v1", "Service")
    (container,) = service["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith(RUNNER_IMAGE)
    assert [p["containerPort"] for p in container["ports"]] == [8080]


def test_knative_gateway_mounts_config_and_secret(tmp_path: Path) -> None:
    docs = {doc["kind"]: doc for doc in manifests("gateway.yaml")}
    # No Secret in what `kubectl apply` applies: placeholders would overwrite the real one.
    assert set(docs) == {"ConfigMap", "Deployment", "Service"}
    text = (ROOT / "deploy" / "knative" / "gateway.yaml").read_text(encoding="utf-8")
    create = re.search(r"kubectl create secret generic (\S+) \\\n#\s+(.*)", text)
    assert create, "the file says how to create the Secret"
    secret = {"metadata": {"name": create[1]},
              "stringData": {key: f"{key}-value-0123456789abcdef"
                             for key in re.findall(r"--from-literal=([\w-]+)=", create[2])}}
    (runner,) = manifests("runner.yaml")
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts: dict[str, str] = {}  # ConfigMap or Secret name -> where it is mounted
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            mounts[volume["configMap"]["name"]] = mount["mountPath"]
        elif "secret" in volume:
            mounts[volume["secret"]["secretName"]] = mount["mountPath"]
    config_map = docs["ConfigMap"]
    config_dir = mounts[config_map["metadata"]["name"]]
    secret_dir = mounts[secret["metadata"]["name"]]
    config_file = Path(env["RUNNER_MW_CONFIG"])
    assert str(config_file.parent) == config_dir and config_file.name in config_map["data"]

    # Every {file: ...} of the config is a key of the mounted Secret; with them, the config is valid.
    text = config_map["data"][config_file.name]
    refs = re.findall(r"\{file:\s*([^}\s]+)\s*\}", text)
    assert refs, "the service token is read from the mounted Secret"
    for ref in refs:
        assert str(Path(ref).parent) == secret_dir and Path(ref).name in secret["stringData"], ref
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for key, value in secret["stringData"].items():
        (secrets / key).write_text(value)
    (tmp_path / "runner.yaml").write_text(text.replace(secret_dir, str(secrets)))
    config = load_config(tmp_path / "runner.yaml", env={})
    assert config.active.kind == "knative"
    assert config.active.service_token == secret["stringData"]["service-token"]
    # Any pod can reach the gateway: the token opens /v1/execute, no address does.
    assert config.access.networks == () and config.access.tokens
    assert config_warnings(config.access) == []
    host = urlsplit(config.active.url).hostname or ""
    meta = runner["metadata"]
    assert host.startswith(f"{meta['name']}.{meta.get('namespace', 'default')}.svc")

    bind_port = int(env["RUNNER_MW_BIND"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert list(ports.values()) == [bind_port]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/runner/-/healthz"
        assert container[probe]["httpGet"]["port"] in (*ports, bind_port)
    service = docs["Service"]
    assert service["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert all(p["targetPort"] in (*ports, bind_port) for p in service["spec"]["ports"])


# --------------------------------------------------------------------------- systemd, scripts


def test_systemd_unit_runs_gunicorn_and_reloads_with_hup() -> None:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in (ROOT / "deploy" / "systemd" / "runner-mw.service").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, line
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    service = sections["Service"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    (start,) = service["ExecStart"]
    argv = shlex.split(start)
    assert argv[0].endswith("/gunicorn") and argv[1] == "-c" and argv[2].endswith("/config/gunicorn.conf.py")
    assert any(v.startswith("RUNNER_MW_CONFIG=") for v in service["Environment"])
    # The hooks' state folder in a runtime directory, which tmp cleaners do not age.
    assert service["RuntimeDirectory"] == ["runner-mw"]
    assert "TMPDIR=%t/runner-mw" in service["Environment"]
    assert "Install" in sections and "Unit" in sections


def test_dev_runner_script_is_valid_bash() -> None:
    script = ROOT / "scripts" / "dev-runner.sh"
    assert os.access(script, os.X_OK)
    bash = shutil.which("bash")
    assert bash is not None, "bash runs .ci/run and scripts/dev-runner.sh: it must be here"
    done = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True, timeout=T, check=False)
    assert done.returncode == 0, done.stderr
    text = script.read_text(encoding="utf-8")
    assert COMPOSE.name in text and "127.0.0.1:8085/healthz" in text
