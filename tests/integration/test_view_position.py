"""ViewPosition: a writer waits until the views include its own write, and no longer."""

from __future__ import annotations

import asyncio

import psycopg

from app.projector import ViewPosition
from app.services import prepare_database
from projections import tables


async def announce(database_url: str, position: int) -> None:
    """What the projector does when it commits a batch: move the position and notify."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE jobledger_projection_tracking SET position = %s WHERE projection = %s",
            (position, tables.PROJECTION_NAME),
        )
        await conn.execute("SELECT pg_notify(%s, %s)", (tables.VIEWS_CHANNEL, str(position)))


async def test_waiters_wake_when_their_position_is_reached(database_url: str) -> None:
    prepare_database(database_url).close()
    views = ViewPosition(database_url)
    await views.start()
    try:
        await asyncio.sleep(0.2)  # listening
        low = asyncio.create_task(views.wait_for(3, timeout=10))
        high = asyncio.create_task(views.wait_for(7, timeout=10))
        await announce(database_url, 5)
        assert await low is True
        assert not high.done()  # 5 does not include 7
        await announce(database_url, 9)
        assert await high is True
        assert views.position == 9
        assert await views.wait_for(2, timeout=0) is True  # already there: no wait at all
        assert await views.wait_for(50, timeout=0.2) is False  # never announced: times out
    finally:
        await views.stop()
