"""Read-side queries over the job and miner views; each answers from indexed queries, never N+1."""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
from psycopg import AsyncCursor
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from domain.pricing import RuntimeStats
from projections.jobs import JobRow
from projections.miners import MinerStats, MinerView
from projections.tables import COLUMNS, MINER_COLUMNS, MINER_STATS_COLUMNS, PROJECTION_NAME

_SELECT_ROWS = f"SELECT {', '.join(COLUMNS)} FROM jobledger_job_views"


class JobPage(msgspec.Struct, frozen=True):
    """One page of jobs, newest first, and whether more follow."""

    rows: list[JobRow]
    total: int
    has_more: bool


class HistoryTotals(msgspec.Struct, frozen=True):
    """Totals over every job in a history window, not just the page shown."""

    jobs: int
    by_status: dict[str, int]
    total_cost: Decimal
    total_estimated_cost: Decimal


# The sizes a throughput bucket may have, and their lengths.
BUCKET_LENGTHS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}


def bucket_start(moment: datetime, bucket: str) -> datetime:
    """The start of the UTC hour or day holding `moment` (what PostgreSQL's date_trunc gives)."""
    moment = moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0) if bucket == "day" else moment


def bucket_count(start: datetime, end: datetime, bucket: str) -> int:
    """How many buckets a window [start, end] touches, the partial first and last included."""
    span = bucket_start(end, bucket) - bucket_start(start, bucket)
    return span // BUCKET_LENGTHS[bucket] + 1


class ThroughputBucket(msgspec.Struct, frozen=True):
    """Jobs submitted in one bucket [start, start + length), counted by their status now."""

    start: datetime
    by_status: dict[str, int]


class JobQueries:
    """The status, list and history views, for one owner or (owner=None) for everyone."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    async def get(self, job_id: str) -> JobRow | None:
        """One job's row, or None if the views do not have it (yet)."""
        async with (
            self._pool.connection() as conn,
            conn.cursor(row_factory=class_row(JobRow)) as cur,
        ):
            await cur.execute(f"{_SELECT_ROWS} WHERE job_id = %s", (job_id,))
            row: JobRow | None = await cur.fetchone()
            return row

    async def pending_reason(self, job_id: str) -> str | None:
        """Why the scheduler left a pending job waiting, if it said."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT reason FROM jobledger_pending_reasons WHERE job_id = %s", (job_id,)
            )
            found = await cur.fetchone()
        return str(found[0]) if found else None

    async def page(
        self, *, owner: str | None, status: str | None, limit: int, before_seq: int | None
    ) -> JobPage:
        """Jobs newest first; `before_seq` continues after the last job of the previous page."""
        where, params = _filters(owner=owner, status=status)
        async with self._pool.connection() as conn:
            async with conn.cursor(row_factory=class_row(JobRow)) as cur:
                rows = await _fetch_page(cur, where, params, limit, before_seq)
            total = await _total(conn.cursor(), owner=owner, status=status)
        return JobPage(rows=rows[:limit], total=total, has_more=len(rows) > limit)

    async def history(
        self,
        *,
        owner: str | None,
        start: datetime,
        end: datetime,
        limit: int,
        before_seq: int | None,
    ) -> tuple[JobPage, HistoryTotals]:
        """Jobs created in [start, end], newest first, with totals over the whole window."""
        where, params = _filters(owner=owner, status=None)
        where.append("created_at BETWEEN %s AND %s")
        params += [start, end]
        async with self._pool.connection() as conn:
            async with conn.cursor(row_factory=class_row(JobRow)) as cur:
                rows = await _fetch_page(cur, where, params, limit, before_seq)
            totals = await conn.execute(
                "SELECT status, count(*), coalesce(sum(cost), 0), coalesce(sum(estimated_cost), 0) "
                f"FROM jobledger_job_views WHERE {' AND '.join(where)} GROUP BY status",
                params,
            )
            by_status: dict[str, int] = {}
            cost = estimated = Decimal(0)
            for status, count, status_cost, status_estimated in await totals.fetchall():
                by_status[status] = count
                cost += status_cost
                estimated += status_estimated
        jobs = sum(by_status.values())
        return (
            JobPage(rows=rows[:limit], total=jobs, has_more=len(rows) > limit),
            HistoryTotals(
                jobs=jobs, by_status=by_status, total_cost=cost, total_estimated_cost=estimated
            ),
        )

    async def throughput(
        self, *, owner: str | None, start: datetime, end: datetime, bucket: str
    ) -> list[ThroughputBucket]:
        """Jobs created in [start, end] per UTC hour or day and status; empty buckets included.

        Counted in one GROUP BY over the window (the `(created_at, seq)` index), so the
        answer holds one row per bucket and status whatever the number of jobs.
        """
        where, params = _filters(owner=owner, status=None)
        where.append("created_at BETWEEN %s AND %s")
        params += [start, end]
        async with self._pool.connection() as conn:
            found = await conn.execute(
                "SELECT date_trunc(%s, created_at, 'UTC') AS bucket, status, count(*) "
                f"FROM jobledger_job_views WHERE {' AND '.join(where)} GROUP BY 1, 2",
                [bucket, *params],
            )
            counted = await found.fetchall()
        by_bucket: dict[datetime, dict[str, int]] = {}
        for moment, status, count in counted:
            by_bucket.setdefault(moment.astimezone(UTC), {})[status] = count
        first, length = bucket_start(start, bucket), BUCKET_LENGTHS[bucket]
        starts = (first + index * length for index in range(bucket_count(start, end, bucket)))
        return [ThroughputBucket(start=s, by_status=by_bucket.get(s, {})) for s in starts]

    async def runtime_stats(
        self, kinds: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], RuntimeStats]:
        """What completed jobs took, per (model, gpu_type) asked about that has completed any."""
        if not kinds:
            return {}
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT model, gpu_type, completed, mean_seconds FROM jobledger_runtime_stats "
                "WHERE (model, gpu_type) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
                ([model for model, _ in kinds], [gpu_type for _, gpu_type in kinds]),
            )
            rows = await cur.fetchall()
        return {(model, gpu): RuntimeStats(completed, mean) for model, gpu, completed, mean in rows}

    async def position(self) -> int:
        """The last log position the views include."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT position FROM jobledger_projection_tracking WHERE projection = %s",
                (PROJECTION_NAME,),
            )
            found = await cur.fetchone()
        return int(found[0]) if found else 0


def _filters(*, owner: str | None, status: str | None) -> tuple[list[str], list[Any]]:
    where: list[str] = ["TRUE"]
    params: list[Any] = []
    if owner is not None:
        where.append("owner = %s")
        params.append(owner)
    if status is not None:
        where.append("status = %s")
        params.append(status)
    return where, params


async def _fetch_page(
    cur: AsyncCursor[JobRow],
    where: list[str],
    params: list[Any],
    limit: int,
    before_seq: int | None,
) -> list[JobRow]:
    # One row more than asked tells whether another page follows.
    conditions = [*where, "seq < %s"] if before_seq is not None else where
    args = [*params, before_seq] if before_seq is not None else params
    await cur.execute(
        f"{_SELECT_ROWS} WHERE {' AND '.join(conditions)} ORDER BY seq DESC LIMIT %s",
        [*args, limit + 1],
    )
    return await cur.fetchall()


async def _total(cur: AsyncCursor[Any], *, owner: str | None, status: str | None) -> int:
    """How many jobs a list matches, from the counts the projection keeps (no row count)."""
    where, params = _filters(owner=owner, status=status)
    async with cur:
        await cur.execute(
            f"SELECT coalesce(sum(jobs), 0) FROM jobledger_job_counts WHERE {' AND '.join(where)}",
            params,
        )
        found = await cur.fetchone()
    return int(found[0]) if found else 0


# A miner's row with its liveness and the jobs it holds, in one statement. The
# first parameter is the lease in seconds: a heartbeat older than that is offline.
# A miner's status from its view row `m` and liveness row `l` (the one place that decides
# online; /metrics counts miners with it too). Its parameter is the lease in seconds.
MINER_STATUS = """CASE WHEN NOT m.active THEN 'deregistered'
         WHEN l.last_heartbeat_at > now() - make_interval(secs => %s)
              THEN CASE WHEN l.draining THEN 'draining' ELSE 'online' END
         ELSE 'offline' END"""
_SELECT_MINERS = (
    "SELECT "
    + ", ".join(f"m.{c}" for c in MINER_COLUMNS)
    + f""",
    {MINER_STATUS} AS status,
    l.last_heartbeat_at,
    (SELECT count(*) FROM jobledger_job_views j
      WHERE j.miner_id = m.miner_id
        AND j.status IN ('assigned', 'running', 'canceling'))::integer AS inflight,
    l.reported_inflight,
    coalesce(l.gpus, '[]'::jsonb) AS gpus
FROM jobledger_miner_views m
LEFT JOIN jobledger_miner_liveness l ON l.miner_id = m.miner_id"""
)


class MinerPage(msgspec.Struct, frozen=True):
    """One page of miners, newest registration first, and whether more follow."""

    rows: list[MinerView]
    total: int
    has_more: bool


class MinerQueries:
    """The miner registry: each miner with its liveness, and its job record."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    async def get(self, miner_id: str, lease_seconds: float) -> MinerView | None:
        """One miner as the registry shows it, or None if the views do not have it (yet)."""
        async with (
            self._pool.connection() as conn,
            conn.cursor(row_factory=class_row(MinerView)) as cur,
        ):
            await cur.execute(f"{_SELECT_MINERS} WHERE m.miner_id = %s", (lease_seconds, miner_id))
            view: MinerView | None = await cur.fetchone()
            return view

    async def page(
        self,
        *,
        limit: int,
        cursor_seq: int | None,
        lease_seconds: float,
        include_deregistered: bool = False,
    ) -> MinerPage:
        """Miners newest first; `cursor_seq` continues after the last miner of the previous page."""
        visible = "TRUE" if include_deregistered else "m.active"
        where, params = [visible], []
        if cursor_seq is not None:
            where.append("m.seq < %s")
            params.append(cursor_seq)
        async with self._pool.connection() as conn:
            async with conn.cursor(row_factory=class_row(MinerView)) as cur:
                # One row more than asked tells whether another page follows.
                await cur.execute(
                    f"{_SELECT_MINERS} WHERE {' AND '.join(where)} ORDER BY m.seq DESC LIMIT %s",
                    [lease_seconds, *params, limit + 1],
                )
                rows = await cur.fetchall()
            counted = await (
                await conn.execute(f"SELECT count(*) FROM jobledger_miner_views m WHERE {visible}")
            ).fetchone()
        total = int(counted[0]) if counted else 0
        return MinerPage(rows=rows[:limit], total=total, has_more=len(rows) > limit)

    async def stats(self, miner_id: str) -> MinerStats | None:
        """The miner's job record, or None if no job of it has finished yet."""
        async with (
            self._pool.connection() as conn,
            conn.cursor(row_factory=class_row(MinerStats)) as cur,
        ):
            await cur.execute(
                f"SELECT {', '.join(MINER_STATS_COLUMNS)} FROM jobledger_miner_stats "
                "WHERE miner_id = %s",
                (miner_id,),
            )
            stats: MinerStats | None = await cur.fetchone()
            return stats
