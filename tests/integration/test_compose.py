"""docker-compose.yml: a valid Compose file whose workers can scale and whose broker never deletes the log.

Needs the docker-compose binary (Debian's `docker-compose` package), not a Docker
daemon: `docker-compose config` only parses, interpolates and validates.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ledger.cli.main import cli
from ledger.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
APP_SERVICES = ("worker", "projector", "webhooks", "api")
# Read by the control plane once it exists; everything else is read by ledger/settings.py.
FUTURE_SETTINGS = {"LEDGER_DATABASE_URL"}


def compose_command() -> list[str]:
    """docker-compose (v1, Debian's package), else `docker compose` if that plugin answers offline."""
    exe = shutil.which("docker-compose")
    if exe:
        return [exe]
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return [docker, "compose"]
    pytest.fail("no docker-compose binary on PATH: run `apt-get install docker-compose` (`make test` does as root)",
                pytrace=False)


def compose_env() -> dict[str, str]:
    """The environment minus anything the Compose file interpolates, so the defaults in the file are what is checked."""
    prefixes = ("LEDGER_", "KAFKA_", "POSTGRES_", "COMPOSE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def compose(file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*compose_command(), "-f", str(file), *args], capture_output=True, text=True,
                          env=compose_env(), cwd=file.parent, timeout=120)


def mounts(service: dict[str, Any]) -> set[tuple[str, str]]:
    """(source, target) of each volume; docker-compose v1 prints "src:target:mode", `docker compose` a mapping."""
    out = set()
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out.add((str(v.get("source", "")), str(v["target"])))
        else:
            source, _, rest = str(v).partition(":")
            out.add((source, rest.split(":")[0]))
    return out


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The Compose file as Compose resolves it: anchors merged, variables interpolated."""
    result = compose(COMPOSE_FILE, "config")
    assert result.returncode == 0, result.stderr
    resolved: dict[str, Any] = yaml.safe_load(result.stdout)
    return resolved


def test_compose_file_is_valid() -> None:
    result = compose(COMPOSE_FILE, "config", "-q")
    assert result.returncode == 0, f"docker-compose config rejected {COMPOSE_FILE}:\n{result.stderr}"
    assert result.stdout == ""


@pytest.mark.parametrize(("breakage", "named"), [
    ("undefined_dependency", ["kafak", "undefined"]),
    ("unknown_key", ["replicas_count"]),
    ("bad_condition", ["service_ready"]),
])
def test_a_broken_copy_is_rejected(tmp_path: Path, breakage: str, named: list[str]) -> None:
    broken = copy.deepcopy(yaml.safe_load(COMPOSE_FILE.read_text()))
    worker = broken["services"]["worker"]
    if breakage == "undefined_dependency":
        worker["depends_on"] = {"kafak": {"condition": "service_healthy"}}
    elif breakage == "unknown_key":
        worker["replicas_count"] = 3
    else:
        worker["depends_on"]["kafka"]["condition"] = "service_ready"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken, sort_keys=False))

    result = compose(path, "config", "-q")

    assert result.returncode != 0, f"docker-compose accepted a file with {breakage}"
    message = result.stdout + result.stderr
    for word in named:
        assert word in message, f"the error does not name {word!r}:\n{message}"


def test_worker_can_scale(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    assert "container_name" not in worker, "a fixed container_name stops `--scale worker=N`"
    assert not worker.get("ports"), "a host port stops `--scale worker=N`"
    # Replicas sharing a named volume would share /data/worker/0 (the table store).
    shared = {source for source, _ in mounts(worker)} & set(config.get("volumes") or {})
    assert not shared, f"workers share the named volume(s) {shared}"


def test_dependants_wait_for_healthy_services(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in APP_SERVICES:
        assert "kafka" in services[name].get("depends_on", {}), f"{name} does not depend on kafka"
    for name, service in services.items():
        for dependency, how in (service.get("depends_on") or {}).items():
            if dependency == "kafka":
                assert how["condition"] == "service_healthy", f"{name} starts before kafka is healthy"
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}, which has no healthcheck"
    for name in ("kafka", "postgres", *APP_SERVICES):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_kafka_is_kraft_and_keeps_the_log_forever(config: dict[str, Any]) -> None:
    kafka = config["services"]["kafka"]
    env = kafka["environment"]
    assert kafka["image"].startswith("apache/kafka:4.")
    assert str(env["KAFKA_LOG_RETENTION_HOURS"]) == "-1"
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]) == "false"
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert str(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == "1"
    assert env["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"
    assert ("kafka-data", "/var/lib/kafka/data") in mounts(kafka), "the log is not on a named volume"


def test_app_settings_are_the_ones_the_project_reads(config: dict[str, Any]) -> None:
    read = set(re.findall(r'"((?:LEDGER|KAFKA)_[A-Z_]+)"', (ROOT / "ledger" / "settings.py").read_text()))
    assert "KAFKA_BOOTSTRAP_SERVERS" in read
    for name in APP_SERVICES:
        env = {k: str(v) for k, v in config["services"][name]["environment"].items()}
        unknown = set(env) - read - FUTURE_SETTINGS
        assert not unknown, f"{name} sets {unknown}, which the project does not read"
        settings = Settings.from_env(env)
        assert settings.bootstrap == "kafka:9092"
        assert settings.home == Path("/data")
        assert settings.history_path == Path(f"/data/{settings.namespace}.duckdb")
        assert env["LEDGER_DATABASE_URL"] == "postgresql+psycopg://ledger:ledger@postgres:5432/ledger"


def test_commands_exist(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in ("worker", "projector", "webhooks"):
        command = services[name]["command"]
        assert command[0] in cli.commands, f"{name} runs `ledger {' '.join(command)}`, which is no command"
    # Each app service's health check asks the process itself whether it is ready, on the port it serves.
    for name in APP_SERVICES:
        env = {k: str(v) for k, v in services[name]["environment"].items()}
        if name == "api":
            port = services[name]["command"][-1]
        else:  # Prometheus scrapes it from another container: it must listen beyond loopback
            port, host = Settings.from_env(env).metrics_port, Settings.from_env(env).metrics_host
            assert port and host == "0.0.0.0", f"{name} serves no metrics to the network"
        probe = " ".join(services[name]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/readyz" in probe, f"{name}'s health check does not ask its /readyz"
    assert Settings.from_env({str(k): str(v) for k, v in services["webhooks"]["environment"].items()}
                             ).webhook_allow_private is False, "deployed webhooks may call private addresses (SSRF)"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["ledger"]' in dockerfile
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the image runs as root"
