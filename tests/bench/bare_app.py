"""The submit benchmark's baseline: a bare Litestar POST doing one psycopg INSERT + COMMIT.

What the plainest durable job endpoint costs on the same machine and server software:
Litestar decodes and validates a 10-field msgspec body, one pooled psycopg connection
inserts one row and commits it (the pool's connection block commits on exit), and the
answer names the new row. No idempotency, no events, no projections, no NATS.

`python -m tests.bench.bare_app --database-url DSN --port N` creates its table and
serves the app the way `jobledger serve` does: one uvicorn process with its default
settings, access log off.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import uuid4

import httpx
import msgspec
from litestar import Litestar, get, post
from psycopg_pool import AsyncConnectionPool

from app.cli import stop_process

if TYPE_CHECKING:  # the served app needs none of the lab
    from tests.chaos.lab import Lab


# Like the API's async pool (app/services.py: max_size 10).
POOL_SIZE = 10
STARTUP_SECONDS = 30
REPO_ROOT = Path(__file__).resolve().parents[2]

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS bare_jobs (
    job_id uuid PRIMARY KEY,
    model text NOT NULL,
    input text NOT NULL,
    output_destination text NOT NULL,
    output_format text NOT NULL,
    gpu_type text NOT NULL,
    gpu_count integer NOT NULL,
    min_vram_gb integer NOT NULL,
    priority text NOT NULL,
    timeout_seconds integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""
INSERT = """
INSERT INTO bare_jobs (
    job_id, model, input, output_destination, output_format,
    gpu_type, gpu_count, min_vram_gb, priority, timeout_seconds
) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


class OutputConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    destination: str = "local"
    format: str = "json"


class Requirements(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    gpu_type: str
    gpu_count: int = 1
    min_vram_gb: int = 0


class NewJob(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The same body jobledger's POST /v1/jobs takes: ten fields, two of them nested."""

    model: str
    input: str
    requirements: Requirements
    output_config: OutputConfig = msgspec.field(default_factory=OutputConfig)
    priority: str = "normal"
    timeout_seconds: int = 3600


class Created(msgspec.Struct):
    job_id: str


def create_app(database_url: str) -> Litestar:
    """The bare app: its pool opens (and its table is made) in the lifespan."""
    pool = AsyncConnectionPool(database_url, min_size=POOL_SIZE, max_size=POOL_SIZE, open=False)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await pool.open(wait=True)
        try:
            async with pool.connection() as connection:
                await connection.execute(CREATE_TABLE)
            yield
        finally:
            await pool.close()

    @post("/jobs", status_code=201)
    async def submit(data: NewJob) -> Created:
        job_id = uuid4()
        async with pool.connection() as connection:
            await connection.execute(
                INSERT,
                (
                    job_id,
                    data.model,
                    data.input,
                    data.output_config.destination,
                    data.output_config.format,
                    data.requirements.gpu_type,
                    data.requirements.gpu_count,
                    data.requirements.min_vram_gb,
                    data.priority,
                    data.timeout_seconds,
                ),
            )
        return Created(job_id=str(job_id))

    @get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return Litestar([submit, healthz], lifespan=[lifespan])


@dataclass
class BareServer:
    """The bare app running in its own process."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process, grace=30)


def serve_bare(lab: Lab) -> BareServer:
    """Start the bare app on a fresh database of the lab's server; the lab stops it."""
    from tests.e2e.conftest import free_port

    port = free_port()
    log_path = lab.directory("bare") / "bare-app.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.bench.bare_app",
                "--database-url",
                lab.database(),
                "--port",
                str(port),
            ],
            cwd=REPO_ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = BareServer(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    lab.track(server)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the bare app exited early:\n{server.log()}")
        try:
            if httpx.get(server.url + "/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the bare app was not up after {STARTUP_SECONDS} s:\n{server.log()}")


def main(argv: list[str]) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m tests.bench.bare_app")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    # As app/cli.py serves jobledger: one process, uvicorn's defaults, no access log.
    config = uvicorn.Config(
        create_app(args.database_url),
        host="127.0.0.1",
        port=args.port,
        log_level="info",
        access_log=False,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
