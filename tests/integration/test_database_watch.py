"""The database watch: down within a probe or two of PostgreSQL going away, up once it answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import psycopg

from app.database_watch import DatabaseWatch
from tests.e2e.conftest import free_port


async def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> float:
    """Seconds until `predicate()` held; fails after `timeout`."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "watch never changed its mind"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_database_that_answers_is_up(database_url: str) -> None:
    watch = DatabaseWatch(database_url, interval=0.05)
    await watch.start()
    try:
        await asyncio.sleep(0.3)
        assert watch.up
    finally:
        await watch.stop()


async def test_nothing_listening_is_down_at_the_first_probe() -> None:
    watch = DatabaseWatch(f"postgresql://postgres@127.0.0.1:{free_port()}/x", interval=0.05)
    await watch.start()
    try:
        assert await wait_until(lambda: not watch.up) < 2
    finally:
        await watch.stop()


async def test_a_terminated_session_is_noticed_and_a_new_one_opened(database_url: str) -> None:
    """The watch's connection killed under it (as in a restart): it reconnects, staying up."""
    watch = DatabaseWatch(database_url, interval=0.05)
    await watch.start()
    try:
        await asyncio.sleep(0.2)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        # One probe fails on the dead session, the next reconnects.
        await wait_until(lambda: watch.up)
        await asyncio.sleep(0.3)
        assert watch.up
    finally:
        await watch.stop()
