"""A served jobledger: `jobledger serve` in a subprocess, driven over HTTP with httpx."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from app.cli import stop_process
from tests.nats_names import fresh_prefix

if TYPE_CHECKING:
    from tests.chaos.lab import Lab

STARTUP_SECONDS = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    """One running API process and how to talk to it."""

    url: str
    admin_key: str
    database_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    nats_prefix: str = "jobledger"
    _clients: list[httpx.Client] = field(default_factory=list)

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"X-Api-Key": key} if key else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self._clients.append(client)
        return client

    def new_key(self, role: str, name: str | None = None) -> str:
        """Create a key through the admin API and return its plaintext."""
        with httpx.Client(base_url=self.url, timeout=30) as admin:
            answer = admin.post(
                "/v1/admin/keys",
                json={"role": role, "name": name or f"{role}-{secrets.token_hex(3)}"},
                headers={"X-Api-Key": self.admin_key},
            )
        assert answer.status_code == 201, answer.text
        return str(answer.json()["key"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        stop_process(self.process, grace=30)


def start_server(
    tmp_path: Path,
    *,
    database_url: str | None,
    nats_url: str | None,
    env: dict[str, str] | None = None,
    wait_healthy: bool = True,
) -> Served:
    """Start `jobledger serve` on a free port and wait until /healthz answers 200."""
    port = free_port()
    admin_key = "admin-" + secrets.token_hex(16)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")} | {
        "JOBLEDGER_HOME": str(tmp_path / "home"),
        "JOBLEDGER_ADMIN_KEY": admin_key,
        "JOBLEDGER_HTTP_PORT": str(port),
        "JOBLEDGER_RATE_LIMITS": "off",
        # Each served ledger gets its own subjects and streams on the shared NATS server;
        # servers sharing a database must share the prefix too (pass it in `env`).
        "JOBLEDGER_NATS_PREFIX": fresh_prefix(),
    }
    if database_url:
        child_env["JOBLEDGER_DATABASE_URL"] = database_url
    if nats_url:
        child_env["JOBLEDGER_NATS_URL"] = nats_url
    child_env |= env or {}
    log_path = tmp_path / f"serve-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"],
            env=child_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    served = Served(
        url=f"http://127.0.0.1:{port}",
        admin_key=admin_key,
        database_url=database_url or "",
        process=process,
        log_path=log_path,
        nats_prefix=child_env["JOBLEDGER_NATS_PREFIX"],
    )
    if wait_healthy:
        wait_until_healthy(served)
    return served


def wait_until_healthy(served: Served, timeout: float = STARTUP_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            raise AssertionError(f"jobledger serve exited early:\n{served.log()}")
        try:
            if httpx.get(served.url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    served.stop()
    raise AssertionError(f"jobledger serve not healthy after {timeout}s:\n{served.log()}")


@pytest.fixture(scope="module")
def serve_factory(
    make_database: Callable[[], str], nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Served]]:
    """Start servers (each on its own fresh database unless one is given); all stop at the end."""
    started: list[Served] = []

    def start(
        *, database_url: str | None = None, env: dict[str, str] | None = None, **kwargs: object
    ) -> Served:
        served = start_server(
            tmp_path_factory.mktemp("served"),
            database_url=database_url or make_database(),
            nats_url=str(kwargs.pop("nats_url", nats_url)),
            env=env,
            **kwargs,  # type: ignore[arg-type]
        )
        started.append(served)
        return served

    yield start
    for served in reversed(started):
        served.stop()


@pytest.fixture(scope="module")
def served(serve_factory: Callable[..., Served]) -> Served:
    """One API process on a fresh database, shared by a test module; rate limits off."""
    return serve_factory()


SEED_JOB = {
    "model": "gpt2",
    "input": "string or file_id",
    "output_config": {"destination": "local", "format": "json"},
    "requirements": {"gpu_type": "v100", "gpu_count": 1, "min_vram_gb": 16},
    "priority": "normal",
    "timeout_seconds": 3600,
}


@pytest.fixture
def lab(make_database: Callable[[], str], nats_url: str, tmp_path: Path) -> Iterator[Lab]:
    """A chaos/bench lab on the suite's servers: fresh databases, processes stopped after."""
    from tests.chaos.lab import Lab  # here: tests.chaos.lab itself imports this module

    lab = Lab(workdir=tmp_path, make_database=make_database, nats_url=nats_url)
    yield lab
    lab.close()
