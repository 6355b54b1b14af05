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
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import eventsourcing.persistence
import msgspec
import psycopg

from app.config import ROLES, ConfigError, Role, Settings
from app.embedded import (
    EMBEDDED_DATABASE,
    EmbeddedPostgres,
    EmbeddedServiceError,
    embedded_services,
    ensure_database,
)
from app.logs import configure_logging

log = logging.getLogger("jobledger.cli")
# Commands whose output is for a person at a terminal: they log warnings only.
TERMINAL_COMMANDS = frozenset({"jobs"})
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


def serve(
    settings: Settings,
    port: int | None,
    host: str | None,
    with_miner: bool = False,
    role: Role | None = None,
) -> int:
    """Run the API (and its workers) until Ctrl-C or SIGTERM, then stop what we started."""
    # uvicorn handles the signal itself (a graceful shutdown of the API), then restores
    # these handlers and raises the signal again: that unwinds the embedded servers.
    previous = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if role is not None:
            settings = msgspec.structs.replace(settings, role=role)
        return _serve(settings, port, host, with_miner)
    except StopRequested as stop:
        log.info("stopped by %s", stop)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(settings: Settings, port: int | None, host: str | None, with_miner: bool) -> int:
    import uvicorn

    from app.api.server import LedgerServer, create_app

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
        miner = _start_local_miner(settings) if with_miner else None
        try:
            log.info("serving on http://%s:%d", settings.http_host, settings.http_port)
            config = uvicorn.Config(
                create_app(settings),
                host=settings.http_host,
                port=settings.http_port,
                log_level="info",
                access_log=False,
                # Our handler (app/logs.py) formats uvicorn's lines like every other.
                log_config=None,
            )
            server = LedgerServer(config)  # ends open watch streams when it stops
            server.run()
            return 0 if server.started else 1
        finally:
            if miner is not None:
                stop_process(miner, grace=LOCAL_MINER_DRAIN_SECONDS + 5)
            runtime.unlink(missing_ok=True)


LOCAL_MINER_FILE = "local-miner.json"
LOCAL_MINER_DRAIN_SECONDS = 10


def _start_local_miner(settings: Settings) -> subprocess.Popen[bytes]:
    """Start `jobledger miner` for this machine, registering it on first use."""
    from app.gpu import NvmlUnavailable, open_nvml
    from app.local_miner import local_miner_key

    try:
        open_nvml().close()
        gpu_type: list[str] = []
    except NvmlUnavailable as why:
        log.info("local miner: %s; it offers the pseudo GPU type 'cpu'", why.reason)
        gpu_type = ["--gpu-type", "cpu"]
    assert settings.database_url is not None and settings.nats_url is not None
    key = local_miner_key(settings.home / LOCAL_MINER_FILE, settings.database_url)
    wildcard = settings.http_host in ("0.0.0.0", "::")  # noqa: S104 - recognising, not binding
    host = "127.0.0.1" if wildcard else settings.http_host
    command = [
        sys.executable,
        "-m",
        "app.cli",
        "miner",
        "--api",
        f"http://{host}:{settings.http_port}",
        "--nats",
        settings.nats_url,
        "--drain-seconds",
        str(LOCAL_MINER_DRAIN_SECONDS),
        *gpu_type,
    ]
    environment = os.environ | {
        "JOBLEDGER_MINER_KEY": key,
        "JOBLEDGER_NATS_PREFIX": settings.nats_prefix,
    }
    log.info("starting a local miner")
    return subprocess.Popen(command, env=environment)  # noqa: S603 - our own interpreter and CLI


def stop_process(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_miner(args: argparse.Namespace, settings: Settings) -> int:
    """Run a miner agent until SIGTERM or Ctrl-C, then drain."""
    from app.gpu import NvmlUnavailable, open_nvml
    from app.miner.agent import AgentConfig, AgentError, MinerAgent
    from app.miner.executors import ExecutorRegistry

    key = args.key or os.environ.get("JOBLEDGER_MINER_KEY") or os.environ.get("JOBLEDGER_API_KEY")
    if not key:
        raise ConfigError("a miner key is needed: --key, or JOBLEDGER_MINER_KEY")
    nats_url = args.nats or settings.nats_url
    if not nats_url:
        raise ConfigError("the NATS URL is needed: --nats, or JOBLEDGER_NATS_URL")
    # Inputs and results of any size live here while they run: a disk, not /tmp.
    work_dir = (
        args.work_dir or os.environ.get("JOBLEDGER_MINER_WORK_DIR") or settings.home / "miner-work"
    )
    config = AgentConfig(
        api_url=args.api or os.environ.get("JOBLEDGER_URL") or "http://127.0.0.1:8000",
        nats_urls=[url.strip() for url in nats_url.split(",") if url.strip()],
        key=key,
        prefix=settings.nats_prefix,
        gpu_type=args.gpu_type or os.environ.get("JOBLEDGER_MINER_GPU_TYPE") or None,
        gpu_count=args.gpu_count,
        vram_gb=args.vram_gb,
        max_concurrent=args.max_concurrent,
        heartbeat_seconds=args.heartbeat_seconds,
        drain_seconds=args.drain_seconds,
        work_dir=Path(work_dir).expanduser().resolve(),
    )
    probe = None
    gpus = []
    try:
        probe = open_nvml()
        gpus = probe.gpus()
        log.info("NVML found %d GPU(s): %s", len(gpus), ", ".join(g.name for g in gpus))
    except NvmlUnavailable as why:
        log.info("no GPUs: %s", why.reason)
        if config.gpu_type is None:
            raise ConfigError(
                f"no GPU found ({why.reason}); to run anyway, pass --gpu-type cpu "
                "(or any type name for testing)"
            ) from None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        agent = MinerAgent(config, ExecutorRegistry.from_entry_points(), probe, gpus)
        await agent.run(stop)

    try:
        asyncio.run(main())
    except AgentError as error:
        print(f"jobledger miner: {error}", file=sys.stderr)
        return 2
    finally:
        if probe is not None:
            probe.close()
    return 0


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


def run_audit(args: argparse.Namespace, settings: Settings) -> int:
    """The auditors' commands."""
    match args.audit_command:
        case "verify":
            from app.audit.commands import run_verify

            return run_verify(
                settings, job_id=args.job, export_file=args.file, key=args.key, as_json=args.json
            )
        case "replay":
            from app.audit.replay import run_replay

            return run_replay(settings, args.job, args.as_of, as_json=args.json)
        case _:
            from app.audit.drift import run_drift

            return run_drift(settings, as_json=args.json)


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
    serve_cmd.add_argument(
        "--with-miner",
        action="store_true",
        help="also run a miner on this machine (its GPUs, else the pseudo type 'cpu')",
    )
    serve_cmd.add_argument(
        "--role",
        choices=ROLES,
        help="what this process runs: all (the API and its workers), api (the HTTP API "
        "only) or workers (projector, sealer, relay, ingestor, heartbeats, scheduler, with "
        "only /healthz on HTTP); JOBLEDGER_ROLE, default all",
    )

    miner_cmd = commands.add_parser("miner", help="run a miner agent that executes jobs")
    miner_cmd.add_argument("--api", help="the ledger API (JOBLEDGER_URL, http://127.0.0.1:8000)")
    miner_cmd.add_argument("--nats", help="NATS URL(s), comma separated (JOBLEDGER_NATS_URL)")
    miner_cmd.add_argument("--key", help="this miner's API key (JOBLEDGER_MINER_KEY)")
    miner_cmd.add_argument(
        "--gpu-type",
        help="offer this GPU type instead of what NVML finds; needed without NVML "
        "(JOBLEDGER_MINER_GPU_TYPE; 'cpu' for a machine without GPUs)",
    )
    miner_cmd.add_argument("--gpu-count", type=int, help="GPUs offered (default: NVML's count)")
    miner_cmd.add_argument("--vram-gb", type=int, help="VRAM per GPU in GB (default: NVML's)")
    miner_cmd.add_argument(
        "--max-concurrent", type=int, help="jobs run at once (default: as registered)"
    )
    miner_cmd.add_argument(
        "--heartbeat-seconds", type=float, default=5.0, help="seconds between heartbeats (5)"
    )
    miner_cmd.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds running jobs may finish before they are handed back (30)",
    )
    miner_cmd.add_argument(
        "--work-dir",
        help="where jobs' input and result files are kept while they run, in a directory "
        "per miner emptied at start (JOBLEDGER_MINER_WORK_DIR, default "
        "$JOBLEDGER_HOME/miner-work)",
    )

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

    audit_cmd = commands.add_parser(
        "audit", help="verify the log, replay a job, check the views (docs/audit.md)"
    )
    audit_sub = audit_cmd.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify",
        help="recompute the hash chains; report every modified, deleted, "
        "inserted or reordered event (exit 1 if any)",
    )
    verify.add_argument("--job", help="verify only this job")
    verify.add_argument("--file", help="verify an export (NDJSON) offline, without a database")
    verify.add_argument(
        "--key",
        help="the ledger public key to trust (base64 or PEM, or a file holding it), as "
        "GET /v1/audit/key gave it",
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    replay = audit_sub.add_parser("replay", help="show a job as it stood at a time or event")
    replay.add_argument("--job", required=True, help="the job id")
    replay.add_argument(
        "--as-of", required=True, help="an RFC 3339 time with offset, or an event sequence number"
    )
    replay.add_argument("--json", action="store_true", help="print JSON")
    drift = audit_sub.add_parser(
        "drift", help="rebuild the views aside from the log and compare (exit 1 on drift)"
    )
    drift.add_argument("--json", action="store_true", help="print the report as JSON")

    projections_cmd = commands.add_parser("projections", help="manage read models")
    projections_sub = projections_cmd.add_subparsers(dest="projections_command", required=True)
    projections_sub.add_parser("rebuild", help="rebuild the views from the event log")

    from app.client.cli import add_jobs_parser

    add_jobs_parser(commands)
    return top


def run(args: argparse.Namespace, settings: Settings) -> int:  # noqa: PLR0911 - one per command
    """Dispatch a parsed command line."""
    match args.command:
        case "serve":
            return serve(settings, args.port, args.host, args.with_miner, args.role)
        case "miner":
            return run_miner(args, settings)
        case "keys" if args.keys_command == "create":
            return create_key(settings, args.role, args.name)
        case "keys":
            return revoke_key(settings, args.key_id)
        case "audit":
            return run_audit(args, settings)
        case "jobs":
            from app.client.cli import run_jobs

            return run_jobs(args)
        case _:
            return rebuild_projections(settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jobledger` console script; exit 2 for bad input, 3 for no database."""
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env(os.environ)
        # Client commands print their answers to the terminal: only warnings are logged.
        quiet = args.command in TERMINAL_COMMANDS
        configure_logging(settings.log_format, logging.WARNING if quiet else logging.INFO)
        return run(args, settings)
    except (ConfigError, EmbeddedServiceError, ValueError) as error:
        print(f"jobledger: {error}", file=sys.stderr)
        return 2
    except (psycopg.OperationalError, eventsourcing.persistence.OperationalError) as error:
        print(f"jobledger: cannot reach PostgreSQL: {error}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
