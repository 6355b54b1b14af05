"""compose.yaml: it parses, and what it runs exists (no Docker engine is needed to check)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from app import cli
from app.miner.agent import HEARTBEAT_FILE

ROOT = Path(__file__).resolve().parents[2]
ONE_SHOT = {"install", "minio-init"}  # they run to completion; the others stay up


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load((ROOT / "compose.yaml").read_text())  # resolves the << merges
    found: dict[str, dict[str, Any]] = document["services"]
    return found


def jobledger_commands(services: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Each service that runs our CLI, with the arguments after the executable."""
    commands = {}
    for name, service in services.items():
        command = service.get("command")
        if isinstance(command, list) and command[0].endswith("/jobledger"):
            commands[name] = command[1:]
    return commands


def test_it_holds_the_production_topology(services: dict[str, dict[str, Any]]) -> None:
    assert {
        "postgres",
        "nats-1",
        "nats-2",
        "nats-3",
        "minio",
        "api",
        "workers",
        "miner",
        "miner-cpu",
    } <= set(services)
    assert services["api"]["deploy"]["replicas"] == 2
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
        if name not in ONE_SHOT:
            assert service["healthcheck"]["test"], f"{name} has no health check"


def test_every_jobledger_command_is_one_the_cli_accepts(
    services: dict[str, dict[str, Any]],
) -> None:
    commands = jobledger_commands(services)
    assert set(commands) == {"api", "workers", "miner", "miner-cpu"}
    roles = {}
    for name, arguments in commands.items():
        parsed = cli.parser().parse_args(arguments)  # exits (fails the test) if unknown
        roles[name] = getattr(parsed, "role", None)
    assert roles == {"api": "api", "workers": "workers", "miner": None, "miner-cpu": None}
    # Health checks call what the role serves: /healthz answers in both serve roles.
    for name in ("api", "workers"):
        assert "/healthz" in " ".join(services[name]["healthcheck"]["test"])


def test_the_nats_nodes_form_one_jetstream_cluster_with_replicated_streams(
    services: dict[str, dict[str, Any]],
) -> None:
    nodes = [services[f"nats-{n}"] for n in (1, 2, 3)]
    flags = [dict(arg.split("=", 1) for arg in node["command"] if "=" in arg) for node in nodes]
    assert {f["--server_name"] for f in flags} == {"nats-1", "nats-2", "nats-3"}
    assert {f["--cluster_name"] for f in flags} == {"jobledger"}
    for node_flags, node in zip(flags, nodes, strict=True):
        assert "--jetstream" in node["command"]
        routes = set(node_flags["--routes"].split(","))
        assert routes == {f"nats://nats-{n}:6222" for n in (1, 2, 3)}
    environment = services["api"]["environment"]
    assert environment["JOBLEDGER_NATS_STREAM_REPLICAS"] == "3"
    assert set(environment["JOBLEDGER_NATS_URL"].split(",")) == {
        f"nats://nats-{n}:4222" for n in (1, 2, 3)
    }


def test_the_miner_reserves_nvidia_gpus_and_reaches_nvml(
    services: dict[str, dict[str, Any]],
) -> None:
    miner = services["miner"]
    devices = miner["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "utility" in miner["environment"]["NVIDIA_DRIVER_CAPABILITIES"]
    # Both miners are healthy while the heartbeat file in their work directory is fresh.
    for name in ("miner", "miner-cpu"):
        command = services[name]["command"]
        work_dir = command[command.index("--work-dir") + 1]
        check = " ".join(services[name]["healthcheck"]["test"])
        assert f"{work_dir}/{HEARTBEAT_FILE}" in check


def test_every_jobledger_variable_it_sets_is_one_jobledger_reads(
    services: dict[str, dict[str, Any]],
) -> None:
    read = set()
    for source in ("app/config.py", "app/cli.py"):
        read |= set(re.findall(r"JOBLEDGER_[A-Z0-9_]+", (ROOT / source).read_text()))
    set_here = {
        variable
        for service in services.values()
        for variable in service.get("environment", {})
        if variable.startswith("JOBLEDGER_")
    }
    assert set_here, "no JOBLEDGER_ variables found"
    assert set_here <= read, f"unknown: {sorted(set_here - read)}"
    # The replicas and the workers share what must be shared (docs/operations.md).
    volumes = {name: set(services[name]["volumes"]) for name in ("api", "workers")}
    assert volumes["api"] == volumes["workers"]
    assert any(v.startswith("ledger-data:/var/lib/jobledger") for v in volumes["api"])
