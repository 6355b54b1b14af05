"""Where scenarios run: fresh databases, a NATS server, and the processes they start.

A `Lab` hands out brand-new databases and a NATS URL, starts `jobledger serve` and
`jobledger miner` processes, and stops every process it started when closed. Under
pytest it wraps the suite's fixtures; `open_lab` builds one for `scripts/chaos` from
`JOBLEDGER_DATABASE_URL` / `JOBLEDGER_NATS_URL`, else from embedded servers.
Scenarios that restart a server start their own (`restartable_postgres`,
`restartable_nats`) so that the shared ones are never disturbed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psycopg
from psycopg import sql

from app.embedded import EmbeddedNats, EmbeddedPostgres, database_dsn
from tests.e2e.conftest import Served, free_port, start_server
from tests.e2e.dispatch import Miner, start_miner
from tests.nats_names import fresh_prefix


class Stoppable(Protocol):
    """A server the lab stops when it closes (EmbeddedNats, NatsCluster, ...)."""

    def stop(self) -> None: ...


@dataclass
class Lab:
    """Fresh databases, a NATS server and process bookkeeping for one scenario run."""

    workdir: Path
    make_database: Callable[[], str]
    nats_url: str
    _served: list[Served] = field(default_factory=list)
    _miners: list[Miner] = field(default_factory=list)
    _servers: list[Stoppable] = field(default_factory=list)

    def directory(self, name: str) -> Path:
        path = self.workdir / f"{name}-{secrets.token_hex(3)}"
        path.mkdir(parents=True)
        return path

    def database(self) -> str:
        return self.make_database()

    def serve(
        self,
        database_url: str,
        *,
        prefix: str,
        nats_url: str | None = None,
        env: dict[str, str] | None = None,
        wait_healthy: bool = True,
    ) -> Served:
        """Start `jobledger serve`; processes sharing a database must share `prefix`."""
        served = start_server(
            self.directory("serve"),
            database_url=database_url,
            nats_url=nats_url or self.nats_url,
            env={"JOBLEDGER_NATS_PREFIX": prefix} | (env or {}),
            wait_healthy=wait_healthy,
        )
        self._served.append(served)
        return served

    def miner(
        self,
        served: Served,
        gpu_type: str,
        *,
        nats_url: str | None = None,
        max_concurrent: int = 2,
        key: tuple[str, str] | None = None,
        extra: list[str] | None = None,
    ) -> Miner:
        miner = start_miner(
            served,
            nats_url or self.nats_url,
            self.directory("miner"),
            gpu_type,
            max_concurrent=max_concurrent,
            key=key,
            extra=extra,
        )
        self._miners.append(miner)
        return miner

    def restartable_postgres(self) -> tuple[EmbeddedPostgres, str]:
        """A private PostgreSQL on a fixed port, to come back where it was: (server, dsn)."""
        server = EmbeddedPostgres(self.directory("postgres"), port=free_port())
        self._servers.append(server)
        server_dsn = server.start()
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("chaos")))
        return server, database_dsn(server_dsn, "chaos")

    def restartable_nats(self) -> tuple[EmbeddedNats, str]:
        """A private nats-server with JetStream on a fixed port: (server, url)."""
        server = EmbeddedNats(self.directory("nats"), port=free_port())
        self._servers.append(server)
        return server, server.start()

    def track(self, server: Stoppable) -> None:
        """Stop `server` when the lab closes."""
        self._servers.append(server)

    def close(self) -> None:
        for miner in reversed(self._miners):
            miner.kill()
        for served in reversed(self._served):
            served.stop()
        for server in reversed(self._servers):
            server.stop()


def new_prefix() -> str:
    """NATS subjects and streams of their own for the ledger processes of one scenario."""
    return fresh_prefix()


@contextlib.contextmanager
def open_lab(workdir: Path) -> Iterator[Lab]:
    """A lab for `scripts/chaos`: the configured servers, else embedded ones under `workdir`."""
    with contextlib.ExitStack() as stack:
        server_dsn = os.environ.get("JOBLEDGER_DATABASE_URL", "").strip()
        if not server_dsn:
            postgres = EmbeddedPostgres(workdir / "postgres")
            server_dsn = postgres.start()
            stack.callback(postgres.stop)
        nats_url = os.environ.get("JOBLEDGER_NATS_URL", "").strip()
        if not nats_url:
            nats = EmbeddedNats(workdir / "nats")
            nats_url = nats.start()
            stack.callback(nats.stop)
        created: list[str] = []

        def make_database() -> str:
            name = f"jobledger_chaos_{secrets.token_hex(6)}"
            with psycopg.connect(server_dsn, dbname="postgres", autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            created.append(name)
            return database_dsn(server_dsn, name)

        def drop_databases() -> None:
            with psycopg.connect(server_dsn, dbname="postgres", autocommit=True) as conn:
                for name in created:
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(name)
                        )
                    )

        stack.callback(drop_databases)
        lab = Lab(workdir=workdir, make_database=make_database, nats_url=nats_url)
        stack.callback(lab.close)
        yield lab
