"""Whether PostgreSQL answers right now, so that requests fail fast while it does not.

Without it, a request arriving during an outage waits on the connection pools and the
event store's own retries (up to ten attempts of five seconds each) before failing.
The watch probes on a connection of its own a few times a second; while the last probe
failed, the API answers 503 at once (`app/api/availability.py`). Requests already in
flight when the database went away still wait for it, as they must: they may commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import psycopg

log = logging.getLogger("jobledger.database")


class DatabaseDown(Exception):
    """The watch saw PostgreSQL fail to answer, so the request was refused untried."""


class DatabaseWatch:
    """A background probe of PostgreSQL (`SELECT 1` every `interval` seconds)."""

    def __init__(self, dsn: str, *, interval: float = 0.25, timeout: float = 5.0) -> None:
        self._dsn = dsn
        self._interval = interval
        self._timeout = timeout
        self._up = True
        self._since = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        """False from the first failed probe until the next one that succeeds."""
        return self._up

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="database-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        connection: psycopg.AsyncConnection[Any] | None = None
        try:
            while True:
                try:
                    if connection is None or connection.closed:
                        connection = await psycopg.AsyncConnection.connect(
                            self._dsn, autocommit=True, connect_timeout=int(self._timeout)
                        )
                    async with asyncio.timeout(self._timeout):
                        await connection.execute("SELECT 1")
                    self._record(True, None)
                except (psycopg.Error, OSError, TimeoutError) as error:
                    self._record(False, error)
                    if connection is not None:
                        await connection.close()
                        connection = None
                await asyncio.sleep(self._interval)
        finally:
            if connection is not None:
                await connection.close()

    def _record(self, up: bool, error: BaseException | None) -> None:
        if up == self._up:
            return
        now = time.monotonic()
        if up:
            log.warning("PostgreSQL answers again after %.1f s", now - self._since)
        else:
            log.warning("PostgreSQL does not answer (%s); answering 503 until it does", error)
        self._up = up
        self._since = now
