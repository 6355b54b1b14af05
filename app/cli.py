"""The `jobledger` command: serve the API, manage keys, rebuild projections.

Each command is its own composition root: it reads Settings from the environment,
opens what it needs and closes it before returning.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import eventsourcing.persistence
import msgspec
import psycopg

from app.config import ConfigError, Settings
from app.embedded import (
    EMBEDDED_DATABASE,
    EmbeddedPostgres,
    EmbeddedServiceError,
    embedded_services,
    ensure_database,
)

log = logging.getLogger("jobledger.cli")
RUNTIME_FILE = "serve.json"


def _runtime_path(settings: Settings) -> Path:
    return settings.home / RUNTIME_FILE


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def ledger_database(settings: Settings) -> Iterator[str]:
    """The ledger's DSN: the configured one, a running `serve`'s, or an embedded server's."""
    if settings.database_url:
        yield settings.database_url
        return
    runtime = _runtime_path(settings)
    if runtime.exists():
        running = json.loads(runtime.read_text())
        if _pid_alive(int(running["pid"])):
            yield str(running["database_url"])
            return
    postgres = EmbeddedPostgres(settings.home / "postgres")
    try:
        yield ensure_database(postgres.start(), EMBEDDED_DATABASE)
    finally:
        postgres.stop()


class StopRequested(Exception):
    """SIGINT or SIGTERM arrived: unwind, stopping everything we started on the way out."""


def _request_stop(signum: int, _: object) -> None:
    raise StopRequested(signal.Signals(signum).name)


def serve(settings: Settings, port: int | None, host: str | None) -> int:
    """Run the API (and its projector) until Ctrl-C or SIGTERM, then stop what we started."""
    # uvicorn handles the signal itself (a graceful shutdown of the API), then restores
    # these handlers and raises the signal again: that unwinds the embedded servers.
    previous = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(settings, port, host)
    except StopRequested as stop:
        log.info("stopped by %s", stop)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(settings: Settings, port: int | None, host: str | None) -> int:
    import uvicorn

    from app.api import create_app

    settings = msgspec.structs.replace(
        settings, http_port=port or settings.http_port, http_host=host or settings.http_host
    )
    settings.home.mkdir(parents=True, exist_ok=True)
    runtime = _runtime_path(settings)
    with embedded_services(settings.home, settings.database_url, settings.nats_url) as urls:
        settings = msgspec.structs.replace(settings, database_url=urls[0], nats_url=urls[1])
        runtime.write_text(
            json.dumps({"pid": os.getpid(), "database_url": urls[0], "nats_url": urls[1]})
        )
        try:
            log.info("serving on http://%s:%d", settings.http_host, settings.http_port)
            config = uvicorn.Config(
                create_app(settings),
                host=settings.http_host,
                port=settings.http_port,
                log_level="info",
                access_log=False,
            )
            server = uvicorn.Server(config)
            server.run()
            return 0 if server.started else 1
        finally:
            runtime.unlink(missing_ok=True)


def create_key(settings: Settings, role: str, name: str) -> int:
    """Create an API key and print it as JSON (the key is shown this once)."""
    from psycopg_pool import AsyncConnectionPool

    from app import keys

    async def create(dsn: str) -> dict[str, str]:
        async with AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False) as pool:
            await keys.create_schema(pool)
            principal, key = await keys.ApiKeys(pool).create(keys.Role(role), name)
        return {"key_id": principal.key_id, "key": key, "role": role, "name": principal.name}

    with ledger_database(settings) as dsn:
        print(json.dumps(asyncio.run(create(dsn)), indent=2))
    return 0


def revoke_key(settings: Settings, key_id: str) -> int:
    """Revoke an API key."""
    from psycopg_pool import AsyncConnectionPool

    from app import keys

    async def revoke(dsn: str) -> bool:
        async with AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False) as pool:
            return await keys.ApiKeys(pool).revoke(key_id)

    with ledger_database(settings) as dsn:
        if not asyncio.run(revoke(dsn)):
            print(f"jobledger: key {key_id!r} not found or already revoked", file=sys.stderr)
            return 1
    print(f"revoked {key_id}")
    return 0


def rebuild_projections(settings: Settings) -> int:
    """Rebuild the job views from the whole log and report what they hold."""
    from app.projector import rebuild
    from app.store import JobLedger, postgres_env

    with ledger_database(settings) as dsn:
        ledger = JobLedger(postgres_env(dsn))
        try:
            position = rebuild(ledger, dsn)
        finally:
            ledger.close()
        with psycopg.connect(dsn) as conn:
            found = conn.execute("SELECT count(*) FROM jobledger_job_views").fetchone()
    jobs = found[0] if found else 0
    print(f"rebuilt job views: {jobs} jobs, log position {position}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line, documented in README.md and docs/operations.md."""
    top = argparse.ArgumentParser(
        prog="jobledger",
        description="jobledger: an event-sourced ledger for GPU compute jobs.",
        epilog="Configured by JOBLEDGER_* environment variables; see docs/operations.md.",
    )
    commands = top.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run the API with its workers")
    serve_cmd.add_argument("--port", type=int, help="HTTP port (JOBLEDGER_HTTP_PORT, 8000)")
    serve_cmd.add_argument("--host", help="HTTP bind address (JOBLEDGER_HTTP_HOST, 127.0.0.1)")

    keys_cmd = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys_cmd.add_parser("create", help="create a key and print it once")
    create.add_argument(
        "--role", required=True, choices=["client", "miner", "auditor", "admin"], help="its role"
    )
    create.add_argument("--name", required=True, help="who holds it (1-100 characters)")
    revoke = keys_cmd.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")

    projections_cmd = commands.add_parser("projections", help="manage read models")
    projections_sub = projections_cmd.add_subparsers(dest="projections_command", required=True)
    projections_sub.add_parser("rebuild", help="rebuild the views from the event log")
    return top


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Dispatch a parsed command line."""
    match args.command:
        case "serve":
            return serve(settings, args.port, args.host)
        case "keys" if args.keys_command == "create":
            return create_key(settings, args.role, args.name)
        case "keys":
            return revoke_key(settings, args.key_id)
        case _:
            return rebuild_projections(settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jobledger` console script; exit 2 for bad input, 3 for no database."""
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return run(args, Settings.from_env(os.environ))
    except (ConfigError, EmbeddedServiceError, ValueError) as error:
        print(f"jobledger: {error}", file=sys.stderr)
        return 2
    except (psycopg.OperationalError, eventsourcing.persistence.OperationalError) as error:
        print(f"jobledger: cannot reach PostgreSQL: {error}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
