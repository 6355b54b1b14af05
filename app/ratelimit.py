"""Per-key request limits that hold across every API process sharing one PostgreSQL.

Windows are fixed and aligned: a minute window starts at unix seconds divisible
by 60, an hour window at seconds divisible by 3600. Fixed windows are exact
across processes and need no clock agreement beyond the minute; the known price
is that a key can send up to twice the per-minute limit across a minute boundary,
which the hourly limit still caps.

A request is admitted only when both windows have room, and then counts once in
each. A rejected request changes no counter, so a client retrying while limited
does not burn its hourly budget, and its retries succeed as soon as the binding
window resets.

One row per key holds both windows (start and count), so a single
`INSERT ... ON CONFLICT DO UPDATE` decides and increments both under the row lock:
one round trip per request, no race between processes. Window starts only move
forward (`GREATEST`), so a process whose clock lags a little counts against the
newer window instead of resetting it.

Rows of keys idle for more than an hour hold nothing useful; each limiter deletes
them at most once a minute with one indexed statement that skips locked rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

DEFAULT_PER_MINUTE: Final = 60
DEFAULT_PER_HOUR: Final = 1000
MINUTE: Final = 60
HOUR: Final = 3600
PURGE_INTERVAL_SECONDS: Final = 60
# Serialises concurrent schema creation by several processes starting at once.
_SCHEMA_LOCK_ID: Final = 0x6A6C_726C  # "jlrl"

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobledger_rate_limits (
    key_id       text PRIMARY KEY,
    minute_start bigint NOT NULL,   -- unix seconds, a multiple of 60
    minute_count integer NOT NULL,
    hour_start   bigint NOT NULL,   -- unix seconds, a multiple of 3600
    hour_count   integer NOT NULL,
    allowed      boolean NOT NULL   -- the decision on the latest request
);
CREATE INDEX IF NOT EXISTS jobledger_rate_limits_hour_start
    ON jobledger_rate_limits (hour_start)
"""

# Under the row lock: roll each window forward if this request is in a newer
# one (its count restarts at zero), admit only if both have room, and count an
# admitted request once in each window.
_HIT = """
INSERT INTO jobledger_rate_limits AS c
    (key_id, minute_start, minute_count, hour_start, hour_count, allowed)
VALUES (%(key_id)s, %(minute_start)s, 1, %(hour_start)s, 1, true)
ON CONFLICT (key_id) DO UPDATE SET
    (minute_start, minute_count, hour_start, hour_count, allowed) = (
        SELECT minute_start, minute_count + ok::int, hour_start, hour_count + ok::int, ok
        FROM (
            SELECT *, minute_count < %(per_minute)s AND hour_count < %(per_hour)s AS ok
            FROM (
                SELECT
                    GREATEST(c.minute_start, excluded.minute_start) AS minute_start,
                    CASE WHEN excluded.minute_start <= c.minute_start
                         THEN c.minute_count ELSE 0 END AS minute_count,
                    GREATEST(c.hour_start, excluded.hour_start) AS hour_start,
                    CASE WHEN excluded.hour_start <= c.hour_start
                         THEN c.hour_count ELSE 0 END AS hour_count
            ) AS current_windows
        ) AS decided
    )
RETURNING minute_start, minute_count, hour_start, hour_count, allowed
"""

# SKIP LOCKED: a row locked by a request in flight is live anyway, and the purge
# never waits on (or deadlocks with) requests or other processes' purges.
_PURGE = """
DELETE FROM jobledger_rate_limits WHERE key_id IN (
    SELECT key_id FROM jobledger_rate_limits
    WHERE hour_start < %s
    FOR UPDATE SKIP LOCKED
)
"""


class RateLimitDecision(msgspec.Struct, frozen=True):
    """Whether a request may proceed, and the X-RateLimit-* numbers of the binding window."""

    allowed: bool
    limit: int
    remaining: int
    reset_epoch: int
    retry_after: int


class _Window(msgspec.Struct, frozen=True):
    """One window's state after a request, to pick the binding one."""

    limit: int
    remaining: int
    reset_epoch: int


async def create_schema(pool: AsyncConnectionPool[AsyncConnection[Any]]) -> None:
    """Create the counters table if missing; safe when several processes start together."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_ID,))
        await conn.execute(SCHEMA)


class RateLimiter:
    """Counts requests per key in PostgreSQL so the limits hold across API processes."""

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConnection[Any]],
        per_minute: int = DEFAULT_PER_MINUTE,
        per_hour: int = DEFAULT_PER_HOUR,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if per_minute < 1 or per_hour < 1:
            raise ValueError(
                f"rate limits must be at least 1, got {per_minute}/minute and {per_hour}/hour"
            )
        self._pool = pool
        self._per_minute = per_minute
        self._per_hour = per_hour
        self._clock = clock
        self._next_purge = -math.inf

    async def hit(self, key_id: str) -> RateLimitDecision:
        """Count one request for key_id if both windows have room, and say whether it may run."""
        now = self._clock()
        minute_start = int(now // MINUTE) * MINUTE
        hour_start = int(now // HOUR) * HOUR
        async with (
            self._pool.connection() as conn,
            conn.cursor(row_factory=tuple_row) as cur,
        ):
            await cur.execute(
                _HIT,
                {
                    "key_id": key_id,
                    "minute_start": minute_start,
                    "hour_start": hour_start,
                    "per_minute": self._per_minute,
                    "per_hour": self._per_hour,
                },
            )
            row = await cur.fetchone()
        if row is None:
            raise RuntimeError("rate limit upsert returned no row")
        if now >= self._next_purge:
            self._next_purge = now + PURGE_INTERVAL_SECONDS
            await self._purge(hour_start - HOUR)
        stored_minute_start, minute_count, stored_hour_start, hour_count, allowed = row
        windows = (
            _Window(
                limit=self._per_minute,
                remaining=max(0, self._per_minute - minute_count),
                reset_epoch=stored_minute_start + MINUTE,
            ),
            _Window(
                limit=self._per_hour,
                remaining=max(0, self._per_hour - hour_count),
                reset_epoch=stored_hour_start + HOUR,
            ),
        )
        # Fewest remaining binds; on a tie the later reset does, since nothing
        # frees up before it.
        binding = min(windows, key=lambda w: (w.remaining, -w.reset_epoch))
        retry_after = 0 if allowed else max(1, math.ceil(binding.reset_epoch - now))
        return RateLimitDecision(
            allowed=bool(allowed),
            limit=binding.limit,
            remaining=binding.remaining,
            reset_epoch=binding.reset_epoch,
            retry_after=retry_after,
        )

    async def _purge(self, older_than_hour_start: int) -> None:
        """Delete counters whose hour window ended at least an hour ago."""
        async with self._pool.connection() as conn:
            await conn.execute(_PURGE, (older_than_hour_start,))
