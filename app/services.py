"""The long-lived resources of one API process, opened together and closed in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from anyio import to_thread
from nats.js.errors import NotFoundError as StreamMessageNotFound
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool

from app import keys, ratelimit, scheduler
from app.audit import sealer
from app.audit.sealer import Sealer
from app.audit.signing import LedgerKey
from app.backoff import Backoff
from app.blobs import Blobs
from app.bus import NATS_DOWN, Bus
from app.config import Settings
from app.database_watch import DatabaseWatch
from app.group_commit import GroupCommit
from app.heartbeats import HeartbeatListener
from app.ingestor import Ingestor
from app.keys import ApiKeys, KeyCache
from app.metrics import LedgerMetrics, LedgerProbe
from app.projector import Projector, ViewPosition
from app.protocol import Namespace
from app.ratelimit import RateLimiter
from app.relay import Relay
from app.scheduler import Scheduler, lease_settings
from app.store import JobLedger, postgres_env
from app.tasks import cancel_all
from app.wakeups import JobWakeups
from projections import tables
from projections.queries import JobQueries, MinerQueries

log = logging.getLogger("jobledger.services")
T = TypeVar("T")
# Serialises schema creation when several processes start against one database.
_SCHEMA_LOCK_ID = 0x6A6F626C  # "jobl"


@dataclass(frozen=True, slots=True)
class Services:
    """What request handlers use; built once per process by `open_services`."""

    settings: Settings
    pool: AsyncConnectionPool[Any]
    ledger: JobLedger
    # Submissions go through here: saved in batches, one commit per batch.
    submissions: GroupCommit
    queries: JobQueries
    miners: MinerQueries
    keys: ApiKeys
    limiter: RateLimiter | None
    views: ViewPosition
    bus: Bus
    namespace: Namespace
    # Wakes the watch streams (GET /v1/jobs/{id}/watch) when a job's events are published.
    watches: JobWakeups
    blobs: Blobs
    audit_key: LedgerKey
    database: DatabaseWatch
    # The process's Prometheus registry and instruments (GET /metrics).
    metrics: LedgerMetrics

    async def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking ledger call in a worker thread, keeping the event loop free."""
        return await to_thread.run_sync(lambda: function(*args, **kwargs))


def prepare_database(dsn: str) -> JobLedger:
    """Create the event store and view tables (under an advisory lock) and open the ledger."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK_ID,))
        try:
            ledger = JobLedger(postgres_env(dsn))
            tables.create_schema(conn)
            sealer.create_schema(conn)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK_ID,))
    return ledger


@contextlib.asynccontextmanager
async def open_services(settings: Settings) -> AsyncIterator[Services]:  # noqa: PLR0915
    """Open the pool, ledger, NATS connection and background workers; close them in reverse."""
    if settings.database_url is None or settings.nats_url is None:
        raise ValueError("open_services needs database_url and nats_url (serve resolves them)")
    dsn = settings.database_url
    async with contextlib.AsyncExitStack() as stack:
        ledger = await to_thread.run_sync(prepare_database, dsn)
        stack.callback(ledger.close)
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn,
            min_size=2,
            max_size=10,
            open=False,
            kwargs={"options": "-c timezone=UTC"},
        )
        await pool.open(wait=True, timeout=30)
        stack.push_async_callback(pool.close)
        await keys.create_schema(pool)
        await ratelimit.create_schema(pool)
        key_cache = KeyCache(dsn)
        await key_cache.start()
        stack.push_async_callback(key_cache.stop)
        api_keys = ApiKeys(pool, key_cache)
        if settings.admin_key:
            await api_keys.ensure_bootstrap_admin(settings.admin_key)

        database = DatabaseWatch(dsn)
        await database.start()
        stack.push_async_callback(database.stop)

        views = ViewPosition(dsn)
        await views.start()
        stack.push_async_callback(views.stop)

        queries = JobQueries(pool)
        submissions = GroupCommit(ledger, queries.runtime_stats)
        await submissions.start()
        stack.push_async_callback(submissions.stop)

        audit_key = await to_thread.run_sync(LedgerKey.load_or_create, settings.audit_key_path)
        # An "api" process leaves the workers to "workers" processes; the views position
        # still reaches it (ViewPosition listens to the projector's notifications).
        runs_workers = settings.role != "api"
        if runs_workers:
            stop = threading.Event()
            seal = Sealer(
                ledger, dsn, audit_key, checkpoint_seconds=settings.audit_checkpoint_seconds
            )
            for name, target in (("projector", Projector(ledger, dsn).run), ("sealer", seal.run)):
                worker = threading.Thread(target=target, args=(stop,), name=name, daemon=True)
                worker.start()
                stack.callback(worker.join, 10)
            stack.callback(stop.set)  # registered last: on the way out it runs before the joins

        blobs = await stack.enter_async_context(
            Blobs.open(
                settings.blob_root,
                s3_endpoint_url=settings.s3_endpoint_url,
                allowed_buckets=settings.s3_allowed_buckets,
            )
        )

        bus = Bus(
            [url.strip() for url in settings.nats_url.split(",")],
            name="jobledger-api",
            stream_replicas=settings.nats_stream_replicas,
        )
        await bus.start()
        stack.push_async_callback(bus.close)
        namespace = Namespace(settings.nats_prefix)
        # Closed before the NATS connection: every watch stream ends, every subscription goes.
        watches = await stack.enter_async_context(JobWakeups(bus, namespace))
        await scheduler.create_schema(pool)
        # One registry per process, never the library's global one.
        metrics = LedgerMetrics(
            CollectorRegistry(),
            LedgerProbe(
                pool=pool,
                database=database,
                ledger=ledger,
                bus=bus,
                namespace=namespace,
                lease_seconds=settings.lease_seconds,
            ),
        )
        if runs_workers:
            workers = _dispatch_workers(
                settings, ledger, pool, dsn, views, bus, namespace, blobs, metrics
            )
            tasks = [asyncio.create_task(_supervise(n, work), name=n) for n, work in workers]
            stack.push_async_callback(cancel_all, tasks)

        limiter = (
            RateLimiter(
                pool,
                per_minute=settings.rate_limit_per_minute,
                per_hour=settings.rate_limit_per_hour,
            )
            if settings.rate_limits
            else None
        )
        yield Services(
            settings=settings,
            pool=pool,
            ledger=ledger,
            submissions=submissions,
            queries=queries,
            miners=MinerQueries(pool),
            keys=api_keys,
            limiter=limiter,
            views=views,
            bus=bus,
            namespace=namespace,
            watches=watches,
            blobs=blobs,
            audit_key=audit_key,
            database=database,
            metrics=metrics,
        )


def _dispatch_workers(
    settings: Settings,
    ledger: JobLedger,
    pool: AsyncConnectionPool[Any],
    dsn: str,
    views: ViewPosition,
    bus: Bus,
    namespace: Namespace,
    blobs: Blobs,
    metrics: LedgerMetrics,
) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    """The background workers that move jobs between the ledger and the miners."""

    async def has_unread_reports(job_id: str) -> bool:
        js = await bus.jetstream()
        try:
            await js.get_last_msg(
                namespace.stream_name("REPORTS"), namespace.reports_subject(job_id)
            )
        except StreamMessageNotFound:
            return False
        except NATS_DOWN:
            return True  # cannot tell: assume a report may still come, and look again later
        return True

    relay = Relay(ledger, dsn, bus, namespace)
    ingestor = Ingestor(ledger, bus, namespace, blobs, max_attempts=settings.max_attempts)
    listener = HeartbeatListener(bus, pool, namespace)
    planner = Scheduler(
        ledger,
        pool,
        dsn,
        views,
        leases=lease_settings(settings.lease_seconds, settings.cancel_grace_seconds),
        max_attempts=settings.max_attempts,
        view_wait_seconds=settings.view_wait_seconds,
        has_unread_reports=has_unread_reports,
        hearing_since=lambda: bus.up_since,
        on_dispatched=metrics.dispatch_latency.observe,
    )
    return [
        ("relay", relay.run),
        ("ingestor", ingestor.run),
        ("heartbeats", listener.run),
        ("scheduler", planner.run),
    ]


async def _supervise(name: str, work: Callable[[], Awaitable[None]]) -> None:
    """Run a worker forever: a crash is logged with its traceback and the worker restarts."""
    backoff = Backoff(first=0.5, most=30.0, calm=60.0)
    while True:
        try:
            await work()
        except Exception:
            delay = backoff.next_delay()
            log.exception("%s worker crashed; restarting in %.1f s", name, delay)
            await asyncio.sleep(delay)


async def database_reachable(pool: AsyncConnectionPool[Any], timeout: float = 2.0) -> bool:
    """True if a trivial query answers within `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout), pool.connection(timeout=timeout) as conn:
            await conn.execute("SELECT 1")
    except (psycopg.Error, TimeoutError) as error:  # PoolTimeout is a psycopg.Error too
        log.info("database check failed: %s", error)
        return False
    return True
