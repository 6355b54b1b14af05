"""Rate limits against a real PostgreSQL, with a clock the tests move by hand."""

import asyncio
from typing import Any

import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from app.ratelimit import RateLimitDecision, RateLimiter, create_schema

pytestmark = pytest.mark.integration

Pool = AsyncConnectionPool[AsyncConnection[Any]]

HOUR_START = 1_700_002_800  # a whole hour in unix seconds (and so a whole minute)


class Clock:
    """A settable stand-in for time.time."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def schema(pg_pool: Pool) -> Pool:
    await create_schema(pg_pool)
    return pg_pool


async def _hits(limiter: RateLimiter, key_id: str, count: int) -> list[RateLimitDecision]:
    return [await limiter.hit(key_id) for _ in range(count)]


async def test_sixty_first_request_in_a_minute_is_rejected(schema: Pool) -> None:
    clock = Clock(HOUR_START + 10.5)
    limiter = RateLimiter(schema, clock=clock)

    admitted = await _hits(limiter, "k1", 60)
    clock.now += 5
    rejected = await limiter.hit("k1")

    assert all(d.allowed for d in admitted)
    assert [d.remaining for d in admitted] == list(range(59, -1, -1))
    assert {(d.limit, d.reset_epoch, d.retry_after) for d in admitted} == {(60, HOUR_START + 60, 0)}
    assert rejected == RateLimitDecision(
        allowed=False, limit=60, remaining=0, reset_epoch=HOUR_START + 60, retry_after=45
    )


async def test_next_minute_allows_again_and_rejections_cost_nothing(schema: Pool) -> None:
    clock = Clock(HOUR_START)
    limiter = RateLimiter(schema, clock=clock)
    await _hits(limiter, "k1", 60)
    refused = await _hits(limiter, "k1", 25)

    clock.now = HOUR_START + 60
    decision = await limiter.hit("k1")

    assert not any(d.allowed for d in refused)
    assert decision == RateLimitDecision(
        allowed=True, limit=60, remaining=59, reset_epoch=HOUR_START + 120, retry_after=0
    )
    # The 25 refused requests did not touch the hourly budget: 61 admitted so far.
    hourly = RateLimiter(schema, per_minute=1000, per_hour=62, clock=clock)
    assert await hourly.hit("k1") == RateLimitDecision(
        allowed=True, limit=62, remaining=0, reset_epoch=HOUR_START + 3600, retry_after=0
    )
    assert not (await hourly.hit("k1")).allowed


async def test_retry_after_is_at_least_one_second(schema: Pool) -> None:
    clock = Clock(HOUR_START + 59.9)
    limiter = RateLimiter(schema, per_minute=1, clock=clock)
    await limiter.hit("k1")

    decision = await limiter.hit("k1")

    assert not decision.allowed
    assert decision.retry_after == 1
    assert decision.reset_epoch == HOUR_START + 60


async def test_hour_limit_binds_when_minute_windows_are_fresh(schema: Pool) -> None:
    clock = Clock(HOUR_START + 1)
    limiter = RateLimiter(schema, per_minute=5, per_hour=12, clock=clock)
    await _hits(limiter, "k1", 5)
    clock.now += 60
    await _hits(limiter, "k1", 5)
    clock.now += 60  # minute 2 of the hour: a fresh minute, 2 left in the hour

    eleventh = await limiter.hit("k1")
    twelfth = await limiter.hit("k1")
    thirteenth = await limiter.hit("k1")

    hour_reset = HOUR_START + 3600
    assert eleventh == RateLimitDecision(
        allowed=True, limit=12, remaining=1, reset_epoch=hour_reset, retry_after=0
    )
    assert twelfth == RateLimitDecision(
        allowed=True, limit=12, remaining=0, reset_epoch=hour_reset, retry_after=0
    )
    assert thirteenth == RateLimitDecision(
        allowed=False, limit=12, remaining=0, reset_epoch=hour_reset, retry_after=3600 - 121
    )

    clock.now = hour_reset
    assert await limiter.hit("k1") == RateLimitDecision(
        allowed=True, limit=5, remaining=4, reset_epoch=hour_reset + 60, retry_after=0
    )


async def test_minute_binds_while_it_has_fewer_left(schema: Pool) -> None:
    clock = Clock(HOUR_START)
    limiter = RateLimiter(schema, per_minute=3, per_hour=100, clock=clock)

    decisions = await _hits(limiter, "k1", 4)

    assert [(d.allowed, d.limit, d.remaining) for d in decisions] == [
        (True, 3, 2),
        (True, 3, 1),
        (True, 3, 0),
        (False, 3, 0),
    ]
    assert decisions[-1].retry_after == 60


async def test_keys_are_independent(schema: Pool) -> None:
    clock = Clock(HOUR_START)
    limiter = RateLimiter(schema, per_minute=2, clock=clock)
    await _hits(limiter, "alice", 2)

    assert not (await limiter.hit("alice")).allowed
    bob = await limiter.hit("bob")
    assert bob.allowed
    assert bob.remaining == 1


async def test_processes_sharing_a_database_share_the_limit(
    schema: Pool, database_url: str
) -> None:
    clock = Clock(HOUR_START + 30)
    async with AsyncConnectionPool(database_url, open=False, max_size=10) as other_pool:
        first = RateLimiter(schema, per_minute=60, clock=clock)
        second = RateLimiter(other_pool, per_minute=60, clock=clock)

        decisions = await asyncio.gather(
            *(first.hit("shared") for _ in range(50)),
            *(second.hit("shared") for _ in range(50)),
        )

    admitted = [d for d in decisions if d.allowed]
    assert len(admitted) == 60
    # Every admitted request saw its own count: the increments were atomic.
    assert sorted(d.remaining for d in admitted) == list(range(60))
    assert all(d.retry_after >= 1 for d in decisions if not d.allowed)
    async with schema.connection() as conn:
        cur = await conn.execute(
            "SELECT minute_count, hour_count FROM jobledger_rate_limits WHERE key_id = 'shared'"
        )
        assert await cur.fetchone() == (60, 60)


async def test_a_lagging_process_clock_does_not_reset_the_window(schema: Pool) -> None:
    ahead = RateLimiter(schema, per_minute=2, clock=Clock(HOUR_START + 61))
    behind = RateLimiter(schema, per_minute=2, clock=Clock(HOUR_START + 59))
    await _hits(ahead, "k1", 2)

    decision = await behind.hit("k1")

    assert not decision.allowed
    assert decision.reset_epoch == HOUR_START + 120


async def test_counters_of_idle_keys_are_purged(schema: Pool) -> None:
    clock = Clock(HOUR_START)
    limiter = RateLimiter(schema, clock=clock)
    await limiter.hit("idle")
    clock.now = HOUR_START + 2 * 3600
    await limiter.hit("recent")
    clock.now = HOUR_START + 3 * 3600 + 5

    await limiter.hit("active")

    async with schema.connection() as conn:
        cur = await conn.execute("SELECT key_id FROM jobledger_rate_limits ORDER BY key_id")
        assert [r[0] for r in await cur.fetchall()] == ["active", "recent"]
    # The idle key starts over with its full budget.
    assert (await limiter.hit("idle")).remaining == 59


async def test_purge_runs_at_most_once_a_minute(schema: Pool) -> None:
    clock = Clock(HOUR_START)
    limiter = RateLimiter(schema, clock=clock)
    await limiter.hit("active")  # purges now; the next purge is due a minute later
    other = RateLimiter(schema, clock=Clock(HOUR_START - 3 * 3600))
    await other.hit("stale")

    clock.now = HOUR_START + 30
    await limiter.hit("active")
    async with schema.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM jobledger_rate_limits")
        assert await cur.fetchone() == (2,)

    clock.now = HOUR_START + 61
    await limiter.hit("active")
    async with schema.connection() as conn:
        cur = await conn.execute("SELECT key_id FROM jobledger_rate_limits")
        assert await cur.fetchall() == [("active",)]


@pytest.mark.parametrize(("per_minute", "per_hour"), [(0, 1000), (60, 0), (-1, -1)])
async def test_limits_below_one_are_rejected(schema: Pool, per_minute: int, per_hour: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RateLimiter(schema, per_minute=per_minute, per_hour=per_hour)


async def test_defaults_are_sixty_a_minute_and_a_thousand_an_hour(schema: Pool) -> None:
    clock = Clock(HOUR_START + 3599)  # last second of the hour
    limiter = RateLimiter(schema, clock=clock)

    decision = await limiter.hit("k1")

    assert (decision.limit, decision.remaining) == (60, 59)
    await _hits(limiter, "k1", 59)
    assert (await limiter.hit("k1")).retry_after == 1
    hourly = RateLimiter(schema, per_minute=10_000, clock=clock)
    assert (await hourly.hit("k1")) == RateLimitDecision(
        allowed=True, limit=1000, remaining=939, reset_epoch=HOUR_START + 3600, retry_after=0
    )
