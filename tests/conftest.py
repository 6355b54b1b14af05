"""Real PostgreSQL and NATS for the suite: the servers named by the environment, else embedded ones.

`JOBLEDGER_DATABASE_URL` names a server (any database on it; the fixtures connect to its
`postgres` database). Tests only ever see databases the fixtures created, each dropped at
the end of the session, so the server may hold other people's data.
"""

import asyncio
import os
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import nats
import psycopg
import pytest
from psycopg import sql

from app.embedded import EmbeddedNats, EmbeddedPostgres, database_dsn
from tests.nats_names import created_this_session
from tests.s3server import s3_server  # noqa: F401  (a real S3-compatible server on loopback)


@pytest.fixture(scope="session")
def postgres_server_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A DSN for the PostgreSQL server the tests create their databases on."""
    configured = os.environ.get("JOBLEDGER_DATABASE_URL", "").strip()
    if configured:
        yield configured
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres"))
    dsn = server.start()
    try:
        yield dsn
    finally:
        server.stop()


@pytest.fixture(scope="session")
def make_database(postgres_server_dsn: str) -> Iterator[Callable[[], str]]:
    """A factory for brand-new, empty databases; all of them are dropped at session end."""
    created: list[str] = []

    def create() -> str:
        name = f"jobledger_test_{secrets.token_hex(6)}"
        with psycopg.connect(postgres_server_dsn, dbname="postgres", autocommit=True) as conn:
            # Fails rather than reuse a database that already exists.
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        created.append(name)
        return database_dsn(postgres_server_dsn, name)

    def drop(name: str) -> None:
        with psycopg.connect(postgres_server_dsn, dbname="postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    yield create
    # Each DROP DATABASE waits for a checkpoint; concurrent drops share checkpoints.
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(drop, created))


@pytest.fixture
def database_url(make_database: Callable[[], str]) -> str:
    """A fresh, empty database for one test."""
    return make_database()


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A NATS server with JetStream: `JOBLEDGER_NATS_URL`, else an embedded one."""
    configured = os.environ.get("JOBLEDGER_NATS_URL", "").strip()
    if configured:
        yield configured
        asyncio.run(_delete_session_streams(configured))
        return
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


async def _delete_session_streams(url: str) -> None:
    """Leave a shared NATS server as we found it: drop the streams this session made."""
    connection = await nats.connect(url)
    try:
        js = connection.jetstream()
        names: list[str] = []
        while page := await js.streams_info(offset=len(names)):
            names += [info.config.name or "" for info in page]
        for name in names:
            if created_this_session(name):
                await js.delete_stream(name)
    finally:
        await connection.close()
