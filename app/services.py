"""The long-lived resources of one API process, opened together and closed in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from anyio import to_thread
from psycopg_pool import AsyncConnectionPool

from app import keys, ratelimit
from app.bus import Bus
from app.config import Settings
from app.keys import ApiKeys
from app.projector import Projector, ViewPosition
from app.ratelimit import RateLimiter
from app.store import JobLedger, postgres_env
from projections import tables
from projections.queries import JobQueries

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
    queries: JobQueries
    keys: ApiKeys
    limiter: RateLimiter | None
    views: ViewPosition
    bus: Bus

    async def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking ledger call in a worker thread, keeping the event loop free."""
        return await to_thread.run_sync(lambda: function(*args, **kwargs))


def _prepare_database(dsn: str) -> JobLedger:
    """Create the event store and view tables (under an advisory lock) and open the ledger."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK_ID,))
        try:
            ledger = JobLedger(postgres_env(dsn))
            tables.create_schema(conn)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK_ID,))
    return ledger


@contextlib.asynccontextmanager
async def open_services(settings: Settings) -> AsyncIterator[Services]:
    """Open the pool, ledger, NATS connection and background workers; close them in reverse."""
    if settings.database_url is None or settings.nats_url is None:
        raise ValueError("open_services needs database_url and nats_url (serve resolves them)")
    dsn = settings.database_url
    async with contextlib.AsyncExitStack() as stack:
        ledger = await to_thread.run_sync(_prepare_database, dsn)
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
        api_keys = ApiKeys(pool)
        if settings.admin_key:
            await api_keys.ensure_bootstrap_admin(settings.admin_key)

        views = ViewPosition(dsn)
        await views.start()
        stack.push_async_callback(views.stop)

        stop = threading.Event()
        worker = threading.Thread(
            target=Projector(ledger, dsn).run, args=(stop,), name="projector", daemon=True
        )
        worker.start()
        stack.callback(worker.join, 10)
        stack.callback(stop.set)

        bus = Bus([url.strip() for url in settings.nats_url.split(",")], name="jobledger-api")
        await bus.start()
        stack.push_async_callback(bus.close)

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
            queries=JobQueries(pool),
            keys=api_keys,
            limiter=limiter,
            views=views,
            bus=bus,
        )


async def database_reachable(pool: AsyncConnectionPool[Any], timeout: float = 2.0) -> bool:
    """True if a trivial query answers within `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout), pool.connection(timeout=timeout) as conn:
            await conn.execute("SELECT 1")
    except (psycopg.Error, TimeoutError) as error:  # PoolTimeout is a psycopg.Error too
        log.info("database check failed: %s", error)
        return False
    return True
