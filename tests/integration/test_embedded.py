"""The embedded PostgreSQL and NATS servers: they start, keep data, and leave nothing running."""

import secrets
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

import nats
import psutil
import psycopg
import pytest
from psycopg import sql

from app.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedServiceError,
    embedded_services,
    ensure_database,
)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def postmaster_family(data_dir: Path) -> list[psutil.Process]:
    """The postmaster serving `data_dir` (found by its command line) and all its backends."""
    pgdata = str(data_dir.resolve() / "pgdata")
    family = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "postgres" and pgdata in (process.info["cmdline"] or []):
            family += [process, *process.children(recursive=True)]
    return family


def nats_servers_on(data_dir: Path) -> list[psutil.Process]:
    """nats-server processes whose store is `data_dir`."""
    store = str(data_dir.resolve())
    return [
        process
        for process in psutil.process_iter(["name", "cmdline"])
        if process.info["name"] == "nats-server" and store in (process.info["cmdline"] or [])
    ]


def gone(processes: list[psutil.Process]) -> bool:
    """Whether every process has exited (zombies count as exited)."""
    return not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def start_and_crash(service: str, data_dir: Path) -> str:
    """Start an embedded server in another Python process that then dies without stopping it."""
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from app.embedded import {service}
        print({service}(Path(sys.argv[1])).start(), flush=True)
        os._exit(0)
    """)
    done = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


def test_postgres_keeps_data_across_restart_and_stops_completely(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg")
    dsn = server.start()
    try:
        assert urlsplit(dsn).hostname == "127.0.0.1"
        assert urlsplit(dsn).port not in (None, 5432)
        with pytest.raises(EmbeddedServiceError, match="in use by another process"):
            EmbeddedPostgres(tmp_path / "pg").start()
        with psycopg.connect(dsn) as conn:
            conn.execute("CREATE TABLE entries (id int PRIMARY KEY, note text)")
            conn.execute("INSERT INTO entries VALUES (1, 'committed before stop')")
        running = postmaster_family(tmp_path / "pg")
        assert len(running) > 1  # the postmaster and its background processes
    finally:
        server.stop()
    assert gone(running)
    assert postmaster_family(tmp_path / "pg") == []

    dsn = server.start()
    try:
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT id, note FROM entries").fetchall()
        assert rows == [(1, "committed before stop")]
    finally:
        server.stop()
    assert postmaster_family(tmp_path / "pg") == []


def test_postgres_start_failure_names_the_server_log(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg")
    server.start()
    server.stop()
    with (server.pgdata / "postgresql.conf").open("a") as conf:
        conf.write("\nshared_buffers = 'not a size'\n")

    with pytest.raises(EmbeddedServiceError, match=r"postgres\.log") as failure:
        server.start()

    assert "shared_buffers" in str(failure.value)
    assert postmaster_family(tmp_path / "pg") == []


def test_postgres_replaces_a_server_left_running_by_a_crashed_owner(tmp_path: Path) -> None:
    orphan_dsn = start_and_crash("EmbeddedPostgres", tmp_path / "pg")
    orphans = postmaster_family(tmp_path / "pg")
    assert orphans, "the crashed owner's postmaster should still be running"
    orphan_socket_dir = Path((tmp_path / "pg/pgdata/postmaster.pid").read_text().splitlines()[4])
    assert orphan_socket_dir.is_dir()

    server = EmbeddedPostgres(tmp_path / "pg")
    dsn = server.start()
    try:
        assert gone(orphans)
        assert not orphan_socket_dir.exists()
        assert dsn != orphan_dsn
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        server.stop()
    assert postmaster_family(tmp_path / "pg") == []


def test_ensure_database_creates_once_and_returns_its_dsn(postgres_server_dsn: str) -> None:
    name = f"jobledger_test_{secrets.token_hex(6)}"
    try:
        dsn = ensure_database(postgres_server_dsn, name)
        with psycopg.connect(dsn) as conn:
            conn.execute("CREATE TABLE marker (id int)")
        assert ensure_database(postgres_server_dsn, name) == dsn
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
            assert conn.execute("SELECT count(*) FROM marker").fetchone() == (0,)
    finally:
        with psycopg.connect(postgres_server_dsn, dbname="postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def test_nats_jetstream_keeps_messages_across_restart_and_stops(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats")
    url = server.start()
    try:
        assert urlsplit(url).port not in (None, 4222)
        client = await nats.connect(url)
        try:
            jetstream = client.jetstream()
            await jetstream.add_stream(name="LEDGER", subjects=["ledger.>"])
            ack = await jetstream.publish("ledger.entry", b"first")
            assert (ack.stream, ack.seq) == ("LEDGER", 1)
        finally:
            await client.close()
        running = nats_servers_on(tmp_path / "nats")
        assert len(running) == 1
    finally:
        server.stop()
    assert gone(running)

    url = server.start()
    try:
        client = await nats.connect(url)
        try:
            stored = await client.jetstream().get_msg("LEDGER", 1)
            assert stored.data == b"first"
        finally:
            await client.close()
    finally:
        server.stop()
    assert nats_servers_on(tmp_path / "nats") == []


def test_nats_replaces_a_server_left_running_by_a_crashed_owner(tmp_path: Path) -> None:
    start_and_crash("EmbeddedNats", tmp_path / "nats")
    orphans = nats_servers_on(tmp_path / "nats")
    assert len(orphans) == 1

    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        assert gone(orphans)
        assert len(nats_servers_on(tmp_path / "nats")) == 1
    finally:
        server.stop()
    assert nats_servers_on(tmp_path / "nats") == []


async def test_embedded_services_start_what_is_missing_and_stop_it_on_error(
    tmp_path: Path,
) -> None:
    with (
        pytest.raises(KeyboardInterrupt),
        embedded_services(tmp_path, None, None) as (database_url, nats_url),
    ):
        with psycopg.connect(database_url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("jobledger",)
        client = await nats.connect(nats_url)
        try:
            assert (await client.jetstream().account_info()).streams == 0
        finally:
            await client.close()
        running = postmaster_family(tmp_path / "postgres") + nats_servers_on(tmp_path / "nats")
        raise KeyboardInterrupt

    assert gone(running)
    assert postmaster_family(tmp_path / "postgres") == []
    assert nats_servers_on(tmp_path / "nats") == []


def test_embedded_services_use_given_urls_as_they_are(tmp_path: Path) -> None:
    given = ("postgresql://ledger@db.example:5432/ledger", "nats://bus.example:4222")

    with embedded_services(tmp_path / "home", *given) as urls:
        assert urls == given

    assert not (tmp_path / "home").exists()
