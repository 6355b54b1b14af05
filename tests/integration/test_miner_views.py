"""The miner registry on real PostgreSQL: rows, stats and liveness, folded exactly once."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from app.projector import Projector, rebuild
from app.store import JobLedger, postgres_env
from domain.miners import Capabilities
from projections import tables
from projections.queries import MinerQueries
from tests.integration.helpers import spec

pytestmark = pytest.mark.integration

LEASE = 30.0


@pytest.fixture
def ledger(database_url: str) -> Iterator[JobLedger]:
    ledger = JobLedger(postgres_env(database_url))
    with psycopg.connect(database_url, autocommit=True) as conn:
        tables.create_schema(conn)
    yield ledger
    ledger.close()


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def miners(pg_pool: AsyncConnectionPool[Any]) -> MinerQueries:
    return MinerQueries(pg_pool)


def capabilities(**changes: Any) -> Capabilities:
    fields: dict[str, Any] = {
        "gpu_type": "NVIDIA Tesla V100-SXM2-16GB",
        "gpu_count": 2,
        "vram_gb": 16,
        "location": "eu-west",
        "price_per_hour": Decimal("0.05"),
        "max_concurrent": 2,
    }
    return Capabilities(**(fields | changes))


def register(ledger: JobLedger, name: str = "rig") -> str:
    miner, _ = ledger.register_miner(name, capabilities())
    return miner.miner_id


def run_job(ledger: JobLedger, miner_id: str, outcome: str) -> str:
    """Submit a job and drive it on `miner_id` through the ledger's worker command."""
    job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    ledger.change_job(job_id, lambda job: job.assign(miner_id))
    ledger.change_job(job_id, lambda job: job.start(attempt=1, miner_id=miner_id))
    if outcome == "completed":
        ledger.change_job(
            job_id,
            lambda job: job.complete(
                attempt=1,
                result={"location": "local:results/x"},
                metrics={},
                gpu_seconds=Decimal("1800"),
                cost=Decimal("0.05"),
            ),
        )
    elif outcome == "failed":
        ledger.change_job(job_id, lambda job: job.fail(attempt=1, error="CUDA out of memory"))
    elif outcome == "timed_out":
        ledger.change_job(job_id, lambda job: job.time_out())
    return job_id


def catch_up(ledger: JobLedger, conn: psycopg.Connection[Any]) -> None:
    assert Projector(ledger, "unused").catch_up(conn) == ledger.head()


def beat(conn: psycopg.Connection[Any], miner_id: str, seconds_ago: float) -> None:
    """What the heartbeat listener writes when a miner's heartbeat arrives."""
    conn.execute(
        "INSERT INTO jobledger_miner_liveness "
        "(miner_id, last_heartbeat_at, reported_inflight, gpus, session) "
        "VALUES (%s, now() - make_interval(secs => %s), 1, %s, 's1') "
        "ON CONFLICT (miner_id) DO UPDATE SET last_heartbeat_at = EXCLUDED.last_heartbeat_at",
        (miner_id, seconds_ago, Jsonb([{"index": 0, "name": "Tesla V100"}])),
    )


def snapshot(conn: psycopg.Connection[Any]) -> tuple[list[Any], ...]:
    return tuple(
        conn.execute(f"SELECT * FROM {table} ORDER BY miner_id").fetchall()
        for table in ("jobledger_miner_views", "jobledger_miner_stats", "jobledger_miner_liveness")
    )


async def test_registration_updates_and_deregistration_are_folded(
    ledger: JobLedger, conn: psycopg.Connection[Any], miners: MinerQueries
) -> None:
    kept = register(ledger, "kept")
    retired = register(ledger, "retired")
    ledger.change_miner(
        kept, lambda miner: miner.update_capabilities(capabilities(gpu_type="h100", gpu_count=8))
    )
    ledger.change_miner(retired, lambda miner: miner.deregister("hardware returned"))
    catch_up(ledger, conn)

    view = await miners.get(kept, LEASE)
    assert view is not None
    assert (view.name, view.gpu_type, view.gpu_count, view.vram_gb) == ("kept", "h100", 8, 16)
    assert (view.price_per_hour, view.max_concurrent, view.location) == (
        Decimal("0.05"),
        2,
        "eu-west",
    )
    assert (view.status, view.active, view.version) == ("offline", True, 2)
    assert (view.inflight, view.reported_inflight, view.gpus, view.last_heartbeat_at) == (
        0,
        None,
        [],
        None,
    )
    assert view.updated_at > view.registered_at
    gone = await miners.get(retired, LEASE)
    assert gone is not None
    assert (gone.status, gone.active, gone.gpu_type) == ("deregistered", False, "v100")
    assert await miners.get("miner_" + "0" * 32, LEASE) is None


async def test_stats_come_from_the_jobs_each_miner_finished(
    ledger: JobLedger, conn: psycopg.Connection[Any], miners: MinerQueries
) -> None:
    busy = register(ledger, "busy")
    idle = register(ledger, "idle")
    for outcome in ("completed", "completed", "failed", "timed_out", "running"):
        run_job(ledger, busy, outcome)
    catch_up(ledger, conn)

    stats = await miners.stats(busy)
    assert stats is not None
    assert (stats.finished_jobs, stats.completed_jobs, stats.failed_jobs, stats.timed_out_jobs) == (
        4,
        2,
        1,
        1,
    )
    assert (stats.earnings, stats.gpu_seconds) == (Decimal("0.10"), Decimal("3600"))
    assert stats.success_rate == Decimal("0.5")
    assert stats.earnings_per_gpu_hour == Decimal("0.1")
    # Two real runs of a few milliseconds each.
    assert stats.average_completion_time is not None
    assert Decimal(0) <= stats.average_completion_time < 5
    assert stats.total_run_seconds > 0
    view = await miners.get(busy, LEASE)
    assert view is not None and view.inflight == 1  # the job still running
    assert await miners.stats(idle) is None


async def test_a_batch_applied_twice_counts_once(
    ledger: JobLedger, conn: psycopg.Connection[Any], miners: MinerQueries
) -> None:
    miner_id = register(ledger)
    run_job(ledger, miner_id, "completed")
    batch = ledger.read_log(1, 1000)
    tables.apply_batch(conn, batch)
    once = snapshot(conn)
    # The same events again, even past the tracking check: the version check skips them.
    tables.apply_batch(conn, batch)
    with conn.transaction(), conn.cursor() as cur:
        tables._apply(cur, batch)
    assert snapshot(conn) == once
    stats = await miners.stats(miner_id)
    assert stats is not None and stats.completed_jobs == 1


async def test_rebuild_reproduces_identical_miner_rows_and_keeps_liveness(
    ledger: JobLedger, conn: psycopg.Connection[Any], database_url: str, miners: MinerQueries
) -> None:
    first, second = register(ledger, "first"), register(ledger, "second")
    run_job(ledger, first, "completed")
    run_job(ledger, second, "failed")
    ledger.change_miner(second, lambda miner: miner.deregister("retired"))
    # Half the log first, the rest later, as a projector that restarted would.
    log = ledger.read_log(1, 1000)
    tables.apply_batch(conn, log[: len(log) // 2])
    catch_up(ledger, conn)
    beat(conn, first, seconds_ago=1)
    live = snapshot(conn)
    assert [len(rows) for rows in live] == [2, 2, 1]
    conn.execute("UPDATE jobledger_miner_views SET name = 'tampered'")
    conn.execute("UPDATE jobledger_miner_stats SET earnings = 1000")
    assert rebuild(ledger, database_url) == ledger.head()
    assert snapshot(conn) == live
    stats = await miners.stats(first)
    assert stats is not None
    assert (stats.completed_jobs, stats.gpu_seconds, stats.earnings) == (
        1,
        Decimal("1800"),
        Decimal("0.05"),
    )


async def test_a_recent_heartbeat_makes_a_miner_online(
    ledger: JobLedger, conn: psycopg.Connection[Any], miners: MinerQueries
) -> None:
    fresh, stale, retired = register(ledger, "fresh"), register(ledger, "stale"), register(ledger)
    ledger.change_miner(retired, lambda miner: miner.deregister("retired"))
    catch_up(ledger, conn)
    beat(conn, fresh, seconds_ago=2)
    beat(conn, stale, seconds_ago=LEASE + 5)
    beat(conn, retired, seconds_ago=1)

    online = await miners.get(fresh, LEASE)
    assert online is not None
    assert online.status == "online"
    assert online.last_heartbeat_at is not None
    assert (online.reported_inflight, online.gpus) == (1, [{"index": 0, "name": "Tesla V100"}])
    offline = await miners.get(stale, LEASE)
    assert offline is not None and offline.status == "offline"
    assert offline.last_heartbeat_at is not None
    # A longer lease keeps the same heartbeat good.
    longer = await miners.get(stale, LEASE * 2)
    assert longer is not None and longer.status == "online"
    gone = await miners.get(retired, LEASE)
    assert gone is not None and gone.status == "deregistered"


async def test_a_draining_miner_is_shown_draining_while_its_heartbeats_last(
    ledger: JobLedger, conn: psycopg.Connection[Any], miners: MinerQueries
) -> None:
    leaving = register(ledger, "leaving")
    catch_up(ledger, conn)
    beat(conn, leaving, seconds_ago=1)
    conn.execute(
        "UPDATE jobledger_miner_liveness SET draining = true WHERE miner_id = %s", (leaving,)
    )

    view = await miners.get(leaving, LEASE)
    assert view is not None and view.status == "draining"
    beat(conn, leaving, seconds_ago=LEASE + 5)
    silent = await miners.get(leaving, LEASE)
    assert silent is not None and silent.status == "offline"


async def test_pages_are_newest_first_and_hide_deregistered_miners_unless_asked(
    ledger: JobLedger, conn: psycopg.Connection[Any], miners: MinerQueries
) -> None:
    registered = [register(ledger, f"rig-{i}") for i in range(5)]
    ledger.change_miner(registered[2], lambda miner: miner.deregister("retired"))
    run_job(ledger, registered[4], "running")
    catch_up(ledger, conn)

    seen: list[str] = []
    cursor = None
    while True:
        page = await miners.page(limit=2, cursor_seq=cursor, lease_seconds=LEASE)
        assert page.total == 4
        seen += [view.miner_id for view in page.rows]
        if not page.has_more:
            break
        cursor = page.rows[-1].seq
    assert seen == [registered[i] for i in (4, 3, 1, 0)]
    everyone = await miners.page(
        limit=10, cursor_seq=None, lease_seconds=LEASE, include_deregistered=True
    )
    assert [view.miner_id for view in everyone.rows] == registered[::-1]
    assert (everyone.total, everyone.has_more) == (5, False)
    assert everyone.rows[0].inflight == 1
    assert everyone.rows[2].status == "deregistered"
