"""Keeps the read model up to date with the log, and lets writers wait for it.

`Projector` runs in a background thread: it folds new events into the views in
batches, one transaction per batch with its tracking record, woken by the event
store's NOTIFY and polling once a second as a fallback. `ViewPosition` listens,
in the event loop, for the position each committed batch announces, so an API
request can wait until the views include its own write (read-your-writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
from typing import Any

import psycopg

from app.backoff import keep_running
from app.store import DATABASE_DOWN, JobLedger
from projections import tables

log = logging.getLogger("jobledger.projector")


class Projector:
    """Folds the event log into the job views, exactly once, resuming where it stopped."""

    def __init__(self, ledger: JobLedger, dsn: str, *, batch_size: int = 500) -> None:
        self._ledger = ledger
        self._dsn = dsn
        self._batch_size = batch_size

    def catch_up(self, conn: psycopg.Connection[Any]) -> int:
        """Apply every event the views lack; `conn` must be in autocommit mode."""
        position = tables.read_position(conn)
        while batch := self._ledger.read_log(position + 1, self._batch_size):
            position = tables.apply_batch(conn, batch)
        return position

    def run(self, stop: threading.Event) -> None:
        """Follow the log until `stop` is set, starting again after failures."""
        keep_running(self._follow, stop, name="projector", log=log, down=DATABASE_DOWN)

    def _follow(self, stop: threading.Event) -> None:
        channel = self._ledger.recorder.channel_name  # type: ignore[attr-defined]
        with (
            psycopg.connect(self._dsn, autocommit=True) as listener,
            psycopg.connect(self._dsn, autocommit=True) as conn,
        ):
            listener.execute(f'LISTEN "{channel}"')
            # The views are derived: a crash may lose the last batches' commits, and then
            # their tracking record with them, so they are folded again. Not waiting for
            # the WAL flush takes a disk sync off every batch, and off the path between a
            # write and its visibility in the views.
            conn.execute("SET synchronous_commit TO off")
            # Re-plan every batch's statements with their real parameters: a generic plan
            # cached while the views were empty (a sequential scan of a "tiny" table) stayed
            # on this connection as they grew, and each batch then read every row.
            conn.execute("SET plan_cache_mode TO force_custom_plan")
            while not stop.is_set():
                self.catch_up(conn)
                # Any NOTIFY wakes us at once; the timeout bounds a missed one.
                for _ in listener.notifies(timeout=1.0, stop_after=1):
                    pass


def rebuild(ledger: JobLedger, dsn: str) -> int:
    """Rebuild the views from the whole log in one transaction; returns the new position."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables.create_schema(conn)
        return tables.rebuild(conn, ledger.read_whole_log())


class ViewPosition:
    """The views' position as announced by the projector, for awaiting one's own writes."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._position = 0
        # Writers waiting for a position, lowest first: an advance wakes only those it
        # satisfies, not every waiter (many submissions wait at once under load).
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._tickets = itertools.count()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin listening in the background."""
        self._task = asyncio.create_task(self._listen(), name="view-position")

    async def stop(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def position(self) -> int:
        """The newest position the views announced."""
        return self._position

    async def wait_for(self, position: int, timeout: float) -> bool:
        """True once the views include `position`; False if `timeout` seconds pass first."""
        if self._position >= position:
            return True
        reached: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (position, next(self._tickets), reached))
        try:
            await asyncio.wait_for(asyncio.shield(reached), timeout)
        except TimeoutError:
            return False
        finally:
            reached.cancel()  # a no-op once set; a cancelled entry is dropped when passed
        return True

    async def _advance(self, position: int) -> None:
        if position <= self._position:
            return
        self._position = position
        while self._waiting and self._waiting[0][0] <= position:
            _, _, reached = heapq.heappop(self._waiting)
            if not reached.done():
                reached.set_result(None)

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {tables.VIEWS_CHANNEL}")
                    cur = await conn.execute(
                        "SELECT position FROM jobledger_projection_tracking WHERE projection = %s",
                        (tables.PROJECTION_NAME,),
                    )
                    found = await cur.fetchone()
                    await self._advance(int(found[0]) if found else 0)
                    backoff = 0.1
                    async for notify in conn.notifies():
                        await self._advance(int(notify.payload))
            except (psycopg.OperationalError, psycopg.InterfaceError) as error:
                log.warning("view listener lost the database (%s); retrying", error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
