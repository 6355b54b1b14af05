"""The `jobledger` command line against a real database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
from psycopg_pool import AsyncConnectionPool

from app.keys import ApiKeys, Role
from app.projector import Projector
from app.store import JobLedger, postgres_env
from projections import tables
from tests.integration.helpers import spec


def jobledger(*args: str, env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=clean | {"JOBLEDGER_HOME": str(home)} | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def authenticate(database_url: str, key: str) -> Role | None:
    async def check() -> Role | None:
        async with AsyncConnectionPool(database_url, min_size=1, open=False) as pool:
            principal = await ApiKeys(pool).authenticate(key)
        return principal.role if principal else None

    return asyncio.run(check())


def test_keys_create_prints_a_working_key_and_revoke_ends_it(
    database_url: str, tmp_path: Path
) -> None:
    env = {"JOBLEDGER_DATABASE_URL": database_url}
    created = jobledger(
        "keys", "create", "--role", "auditor", "--name", "carol", env=env, home=tmp_path
    )
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["role"] == "auditor" and key["name"] == "carol"
    assert authenticate(database_url, key["key"]) is Role.AUDITOR

    revoked = jobledger("keys", "revoke", key["key_id"], env=env, home=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    assert authenticate(database_url, key["key"]) is None
    again = jobledger("keys", "revoke", key["key_id"], env=env, home=tmp_path)
    assert again.returncode == 1 and "not found" in again.stderr


def test_bad_input_is_exit_code_2_with_a_message(database_url: str, tmp_path: Path) -> None:
    env = {"JOBLEDGER_DATABASE_URL": database_url}
    bad_role = jobledger("keys", "create", "--role", "root", "--name", "x", env=env, home=tmp_path)
    assert bad_role.returncode == 2 and "invalid choice" in bad_role.stderr
    bad_name = jobledger(
        "keys", "create", "--role", "client", "--name", " ", env=env, home=tmp_path
    )
    assert bad_name.returncode == 2 and "name" in bad_name.stderr
    bad_port = jobledger("serve", env=env | {"JOBLEDGER_HTTP_PORT": "eighty"}, home=tmp_path)
    assert bad_port.returncode == 2 and "JOBLEDGER_HTTP_PORT" in bad_port.stderr


def test_unreachable_database_is_exit_code_3(tmp_path: Path) -> None:
    env = {"JOBLEDGER_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none?connect_timeout=2"}
    answer = jobledger("projections", "rebuild", env=env, home=tmp_path)
    assert answer.returncode == 3 and "PostgreSQL" in answer.stderr


def test_projections_rebuild_reproduces_the_views(database_url: str, tmp_path: Path) -> None:
    ledger = JobLedger(postgres_env(database_url))
    try:
        for i in range(5):
            job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=f"k{i}").job_id
            if i % 2:
                ledger.cancel(job_id, owner="alice")
        with psycopg.connect(database_url, autocommit=True) as conn:
            tables.create_schema(conn)
            Projector(ledger, database_url).catch_up(conn)
            before = conn.execute("SELECT * FROM jobledger_job_views ORDER BY job_id").fetchall()
            conn.execute("DELETE FROM jobledger_job_views WHERE status = 'canceled'")

            rebuilt = jobledger(
                "projections",
                "rebuild",
                env={"JOBLEDGER_DATABASE_URL": database_url},
                home=tmp_path,
            )
            assert rebuilt.returncode == 0, rebuilt.stderr
            assert f"5 jobs, log position {ledger.head()}" in rebuilt.stdout
            after = conn.execute("SELECT * FROM jobledger_job_views ORDER BY job_id").fetchall()
        assert after == before
    finally:
        ledger.close()


def test_commands_start_the_embedded_database_when_none_is_running(tmp_path: Path) -> None:
    created = jobledger(
        "keys", "create", "--role", "client", "--name", "dave", env={}, home=tmp_path
    )
    assert created.returncode == 0, created.stderr
    assert (tmp_path / "postgres" / "pgdata" / "PG_VERSION").exists()
    # The next command finds the same data: the key from the first run can be revoked.
    key_id = json.loads(created.stdout)["key_id"]
    revoked = jobledger("keys", "revoke", key_id, env={}, home=tmp_path)
    assert revoked.returncode == 0, revoked.stderr


def test_a_miner_without_a_key_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    result = jobledger("miner", "--nats", "nats://127.0.0.1:1", env={}, home=tmp_path)
    assert result.returncode == 2
    assert "a miner key is needed" in result.stderr


def test_a_miner_without_nvml_needs_to_be_told_which_gpu_type_it_offers(tmp_path: Path) -> None:
    result = jobledger(
        "miner", "--nats", "nats://127.0.0.1:1", "--key", "jl_x", env={}, home=tmp_path
    )
    assert result.returncode == 2
    assert "no GPU found" in result.stderr
    assert "--gpu-type cpu" in result.stderr


def test_a_miner_with_a_key_the_api_refuses_says_so(tmp_path: Path, nats_url: str) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Refusing(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"error": {"status": 401, "message": "invalid or revoked API key"}}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = jobledger(
            "miner",
            "--api",
            f"http://127.0.0.1:{server.server_port}",
            "--nats",
            nats_url,
            "--key",
            "jl_revoked",
            "--gpu-type",
            "cpu",
            env={},
            home=tmp_path,
        )
    finally:
        server.shutdown()
    assert result.returncode == 2
    assert "the API refused the miner key: invalid or revoked API key" in result.stderr
