"""The scheduler: matches pending jobs to live miners and keeps held jobs honest.

One scheduler acts at a time (a PostgreSQL advisory lock; the others stand by), and
every decision is still a domain command saved with optimistic concurrency, so even
two acting schedulers could not assign one attempt twice. Each round it

1. applies, at most four times a second, what held jobs need
   (`domain.scheduling.verdict`): timeouts, requeues when a miner went silent for a
   lease, was deregistered or lost the job, and cancels whose miner never confirmed.
   A job counts as lost only once its miner's heartbeats left it out for a lease
   after the relay published the assignment: one still in the outbox (NATS or the
   relay stalled) cannot be held yet;
2. plans and writes assignments (`domain.scheduling.plan`), then waits until the views
   include them, so the next round counts its own assignments against capacity. When
   no live miner has a free slot there is nothing to plan, and the pending queue is
   not read at all, unless the reasons are due;
3. records, at most once a second, why each job left pending waits (`pending_reason`).

Rounds run whenever the views move and at least twice a second. A round that assigned
nothing rests as long as it worked before the next: with thousands of jobs pending and
no free miner, rounds then take at most about half of a core instead of all of it, and
an idle ledger still reacts to a submission within milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from anyio import to_thread
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from app.backoff import Backoff
from app.logs import log_context
from app.projector import ViewPosition
from app.relay import RELAY_NAME
from app.store import DATABASE_DOWN, JobLedger
from domain.errors import DomainError
from domain.jobs import Job, JobStatus, RequeueCause
from domain.pricing import Priority
from domain.scheduling import (
    Action,
    HeldJob,
    Leases,
    MinerOffer,
    PendingJob,
    Plan,
    Verdict,
    plan,
    verdict,
)
from projections.tables import PROJECTION_NAME

log = logging.getLogger("jobledger.scheduler")

_LEADER_LOCK_ID = 0x6A6C_7363  # "jlsc"
_SCHEMA_LOCK_ID = 0x6A6C_7364  # "jlsd"
ROUND_SECONDS = 0.5
# Pending reasons are rewritten at most this often.
REASONS_SECONDS = 1.0
# Held jobs are judged at most this often: leases, timeouts and cancel graces are
# seconds long, and a round comes every few milliseconds under load.
HELD_SECONDS = 0.25
# Pending jobs considered per round, in queue order; the rest wait for the next round.
PENDING_WINDOW = 2000

# Queue order, spelt once: the index below serves the pending query only if they match.
_RANK = "(CASE priority WHEN 'urgent' THEN 3 WHEN 'high' THEN 2 WHEN 'normal' THEN 1 ELSE 0 END)"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobledger_pending_reasons (
    job_id text PRIMARY KEY,
    reason text NOT NULL,
    since timestamptz NOT NULL DEFAULT now()
);
-- The queue in order: a round reads its window from here instead of sorting every
-- pending job (tens of thousands under a burst) each time.
CREATE INDEX IF NOT EXISTS jobledger_job_views_queue
    ON jobledger_job_views ({_RANK} DESC, seq) WHERE status = 'pending';
"""

_MINERS = """
SELECT m.miner_id, m.gpu_type, m.gpu_count, m.vram_gb, m.price_per_hour, m.max_concurrent,
       coalesce(l.last_heartbeat_at > now() - make_interval(secs => %s) AND NOT l.draining,
                false) AS online,
       coalesce(busy.inflight, 0) AS inflight
FROM jobledger_miner_views m
LEFT JOIN jobledger_miner_liveness l ON l.miner_id = m.miner_id
LEFT JOIN (
    SELECT miner_id, count(*) AS inflight FROM jobledger_job_views
    WHERE status IN ('assigned', 'running', 'canceling') GROUP BY miner_id
) busy ON busy.miner_id = m.miner_id
WHERE m.active
"""
_PENDING = f"""
SELECT job_id, gpu_type, gpu_count, min_vram_gb, priority, seq,
       coalesce(status_since, created_at) AS pending_since
FROM jobledger_job_views
WHERE status = 'pending'
ORDER BY {_RANK} DESC, seq
LIMIT %s
"""
_HELD = """
SELECT j.job_id, j.status, j.miner_id, j.attempt, j.timeout_seconds, j.assigned_at,
       coalesce(j.status_since, j.updated_at) AS status_since,
       coalesce(m.active, false) AS miner_active, l.last_heartbeat_at,
       coalesce(l.held, '[]'::jsonb) AS held, now() AS now,
       (SELECT position FROM jobledger_projection_tracking WHERE projection = %s) AS views_at,
       coalesce((SELECT position FROM jobledger_projection_tracking WHERE projection = %s), 0)
           AS relay_at
FROM jobledger_job_views j
LEFT JOIN jobledger_miner_views m ON m.miner_id = j.miner_id
LEFT JOIN jobledger_miner_liveness l ON l.miner_id = j.miner_id
WHERE j.status IN ('assigned', 'running', 'canceling')
"""


async def create_schema(pool: AsyncConnectionPool[Any]) -> None:
    """Create the pending-reasons table if it is missing."""
    async with pool.connection() as conn, conn.transaction():
        # Several processes may start at once; IF NOT EXISTS alone races.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_ID,))
        await conn.execute(SCHEMA)


class Scheduler:
    """Assigns, times out, requeues and finishes cancels; one acting instance at a time."""

    def __init__(
        self,
        ledger: JobLedger,
        pool: AsyncConnectionPool[Any],
        dsn: str,
        views: ViewPosition,
        *,
        leases: Leases,
        max_attempts: int,
        view_wait_seconds: float,
        has_unread_reports: Callable[[str], Awaitable[bool]],
        hearing_since: Callable[[], datetime | None],
        on_dispatched: Callable[[float], None],
    ) -> None:
        self._ledger = ledger
        self._pool = pool
        self._dsn = dsn
        self._views = views
        self._leases = leases
        self._max_attempts = max_attempts
        self._view_wait_seconds = view_wait_seconds
        # A report still waiting in the stream may finish the job: never requeue over it.
        self._has_unread_reports = has_unread_reports
        # Since when heartbeats could reach us (None: not now). Silence means nothing
        # while our own NATS connection is down, so leases only run after it is back.
        self._hearing_since = hearing_since
        # Told, for each assignment, how many seconds its job waited in the queue.
        self._on_dispatched = on_dispatched
        # The pending reasons as last written, so a round writes only what changed.
        self._recorded_reasons: dict[str, str] = {}
        self._first_reasons = True
        self._reasons_at = 0.0
        self._settled_at = -HELD_SECONDS
        # When each held attempt's assignment was first seen published by the relay, and
        # for those not yet, the views' position the relay must reach (it goes in log
        # order). A miner can only list in its heartbeats what it could have received.
        self._published: dict[tuple[str, int], datetime] = {}
        self._publish_by: dict[tuple[str, int], int] = {}
        # Last round's pending jobs by their view row: under a burst most are still there.
        self._pending: dict[tuple[Any, ...], PendingJob] = {}

    async def run(self) -> None:
        """Act while holding the scheduler lock; retry after database losses."""
        backoff = Backoff()
        while True:
            try:
                await self._lead()
            except DATABASE_DOWN as error:
                delay = backoff.next_delay()
                log.warning("scheduler paused (%s); retrying in %.1f s", error, delay)
                await asyncio.sleep(delay)

    async def _lead(self) -> None:
        async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as lock:
            while True:
                cur = await lock.execute("SELECT pg_try_advisory_lock(%s)", (_LEADER_LOCK_ID,))
                found = await cur.fetchone()
                if found and found[0]:
                    break
                await asyncio.sleep(1.0)
            log.info("scheduler is acting (this process holds the scheduler lock)")
            watching_since = datetime.now(UTC)
            self._recorded_reasons = {}
            self._first_reasons = True
            loop = asyncio.get_running_loop()
            checked = loop.time()
            while True:
                seen = self._views.position
                began = loop.time()
                written = await self.run_round(watching_since)
                if written:
                    # The next round counts this one's assignments against capacity.
                    await self._views.wait_for(written, self._view_wait_seconds)
                else:
                    # Nothing assigned: rest as long as the round worked, so that a burst of
                    # submissions with no free miner does not keep a core busy re-planning.
                    await asyncio.sleep(loop.time() - began)
                if loop.time() - checked >= ROUND_SECONDS:
                    await lock.execute("SELECT 1")  # the lock lives with this connection
                    checked = loop.time()
                await self._views.wait_for(seen + 1, ROUND_SECONDS)

    async def run_round(self, watching_since: datetime) -> int:
        """One round: held jobs first (they free capacity), then assignments and reasons.

        Returns the log position its assignments were written at (0: none).
        """
        now = asyncio.get_running_loop().time()
        if now - self._settled_at >= HELD_SECONDS:
            self._settled_at = now
            await self._settle_held(watching_since)
        return await self._assign()

    async def _settle_held(self, watching_since: datetime) -> None:
        hearing = self._hearing_since()
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_HELD, (PROJECTION_NAME, RELAY_NAME))
            rows = await cur.fetchall()
        self._note_publications(rows)
        due: list[tuple[HeldJob, Verdict]] = []
        for row in rows:
            # Not hearing heartbeats now: judge as if we had only just started listening.
            listening = max(watching_since, hearing) if hearing else row["now"]
            job = _held_job(row)
            decision = verdict(job, row["now"], self._leases, watching_since=listening)
            if decision.action is Action.NONE:
                continue
            if decision.cause is RequeueCause.LOST_BY_MINER and not self._left_out_a_lease(job):
                continue  # still in the outbox (NATS or the relay stalled), or only just sent
            if decision.action is Action.GIVE_BACK and await self._has_unread_reports(job.job_id):
                continue  # its miner's last words are still on their way
            due.append((job, decision))
        if not due:
            return
        commands = [(held.job_id, self._enforcement(held, decision)) for held, decision in due]
        results, _ = await to_thread.run_sync(self._ledger.change_jobs, commands)
        for (held, decision), result in zip(due, results, strict=True):
            with log_context(job_id=held.job_id, miner_id=held.miner_id):
                if isinstance(result, DomainError):
                    log.info("left %s alone: %s", held.job_id, result)
                else:
                    log.info(
                        "%s: %s (attempt %d on %s: %s)",
                        held.job_id,
                        decision.action.value,
                        held.attempt,
                        held.miner_id,
                        decision.reason,
                    )

    def _note_publications(self, rows: list[dict[str, Any]]) -> None:
        """Record when the relay was first seen past each held attempt's assignment."""
        held = set()
        for row in rows:
            key = (row["job_id"], row["attempt"])
            held.add(key)
            if key not in self._published:
                needed = self._publish_by.setdefault(key, row["views_at"] or 0)
                if row["relay_at"] >= needed:
                    self._published[key] = row["now"]
        for table in (self._published, self._publish_by):
            for key in [key for key in table if key not in held]:
                del table[key]

    def _left_out_a_lease(self, job: HeldJob) -> bool:
        """True if the miner's heartbeats left the attempt out for a lease after it was sent."""
        published = self._published.get((job.job_id, job.attempt))
        return (
            published is not None
            and job.last_heartbeat_at is not None
            and job.last_heartbeat_at - published >= self._leases.lease
        )

    def _enforcement(self, held: HeldJob, decision: Verdict) -> Callable[[Job], None]:
        """The command carrying out `decision`, unless the job moved on since we looked."""

        def command(job: Job) -> None:
            if job.attempt != held.attempt or job.miner_id != held.miner_id:
                return
            match decision.action:
                case Action.TIME_OUT:
                    job.time_out()
                case Action.GIVE_BACK:
                    assert decision.cause is not None
                    job.give_back(decision.cause, max_attempts=self._max_attempts)
                case Action.CANCEL_UNCONFIRMED:
                    job.cancel_unconfirmed(decision.reason)

        return command

    async def _assign(self) -> int:
        async with self._pool.connection() as conn:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(_MINERS, (self._leases.lease.total_seconds(),))
                miners = [MinerOffer(**row) for row in await cur.fetchall()]
            if not any(m.online and m.free > 0 for m in miners) and not self._reasons_due():
                return 0  # nobody can take a job, and the reasons are fresh: nothing to plan
            async with conn.cursor() as cur:
                # Plain tuples: thousands of rows a round, and dicts cost more than the query.
                await cur.execute(_PENDING, (PENDING_WINDOW,))
                rows = await cur.fetchall()
        # Thousands of pending jobs weigh milliseconds: keep the event loop free meanwhile.
        decided = await to_thread.run_sync(self._plan, rows, miners)
        position = 0
        if decided.assignments:
            # All of a round's assignments in one transaction: one commit, not one per job.
            commands = [(job_id, _assignment(miner_id)) for job_id, miner_id in decided.assignments]
            results, position = await to_thread.run_sync(self._ledger.change_jobs, commands)
            assigned_at = datetime.now(UTC)
            wanted = {job_id for job_id, _ in decided.assignments}
            pending_since = {row[0]: row[6] for row in rows if row[0] in wanted}
            for (job_id, miner_id), result in zip(decided.assignments, results, strict=True):
                if isinstance(result, DomainError):  # canceled meanwhile, for instance
                    with log_context(job_id=job_id, miner_id=miner_id):
                        log.info("did not assign %s: %s", job_id, result)
                else:
                    waited = assigned_at - pending_since[job_id]
                    self._on_dispatched(max(waited.total_seconds(), 0.0))
        await self._record_reasons(decided.reasons)
        return position

    def _plan(self, rows: list[tuple[Any, ...]], miners: list[MinerOffer]) -> Plan:
        """Plan the round; a job still pending as it was last round is not built again."""
        known = self._pending
        self._pending = {row: known.get(row) or _pending_job(row) for row in rows}
        return plan(list(self._pending.values()), miners)

    def _reasons_due(self) -> bool:
        elapsed = asyncio.get_running_loop().time() - self._reasons_at
        return self._first_reasons or elapsed >= REASONS_SECONDS

    async def _record_reasons(self, reasons: dict[str, str]) -> None:
        """Write what changed since the last recording (all of it in a new term).

        At most once per REASONS_SECONDS: under load a round comes every few
        milliseconds, and rewriting the reasons of a sliding window of thousands of
        jobs each time was most of a round's work. A reason is for a job that waits.
        """
        if not self._reasons_due():
            return
        self._reasons_at = asyncio.get_running_loop().time()
        recorded = self._recorded_reasons
        changed = [(job_id, why) for job_id, why in reasons.items() if recorded.get(job_id) != why]
        gone = [job_id for job_id in recorded if job_id not in reasons]
        first = self._first_reasons
        if not (changed or gone or first):
            return
        async with self._pool.connection() as conn, conn.transaction():
            if first:  # whatever an earlier term left behind for jobs no longer pending
                await conn.execute(
                    "DELETE FROM jobledger_pending_reasons r WHERE NOT EXISTS (SELECT 1 FROM "
                    "jobledger_job_views v WHERE v.job_id = r.job_id AND v.status = 'pending')"
                )
            if gone:
                await conn.execute(
                    "DELETE FROM jobledger_pending_reasons WHERE job_id = ANY(%s)", (gone,)
                )
            if changed:
                async with conn.cursor() as cur:
                    await cur.executemany(
                        "INSERT INTO jobledger_pending_reasons (job_id, reason) VALUES (%s, %s) "
                        "ON CONFLICT (job_id) DO UPDATE SET reason = EXCLUDED.reason, since = "
                        "now()",
                        changed,
                    )
        self._recorded_reasons = dict(reasons)
        self._first_reasons = False


_PRIORITIES = {priority.value: priority for priority in Priority}


def _pending_job(row: tuple[Any, ...]) -> PendingJob:
    job_id, gpu_type, gpu_count, min_vram_gb, priority, seq, _ = row
    return PendingJob(
        job_id=job_id,
        gpu_type=gpu_type,
        gpu_count=gpu_count,
        min_vram_gb=min_vram_gb,
        priority=_PRIORITIES[priority],
        seq=seq,
    )


def _assignment(miner_id: str) -> Callable[[Job], None]:
    def command(job: Job) -> None:
        job.assign(miner_id)

    return command


def _held_job(row: dict[str, Any]) -> HeldJob:
    return HeldJob(
        job_id=row["job_id"],
        status=JobStatus(row["status"]),
        miner_id=row["miner_id"],
        attempt=row["attempt"],
        timeout_seconds=row["timeout_seconds"],
        # Views written before assigned_at existed: the status change is the best bound.
        assigned_at=row["assigned_at"] or row["status_since"],
        status_since=row["status_since"],
        miner_active=row["miner_active"],
        last_heartbeat_at=row["last_heartbeat_at"],
        miner_holds=frozenset((job_id, attempt) for job_id, attempt in row["held"]),
    )


def lease_settings(lease_seconds: float, cancel_grace_seconds: float) -> Leases:
    """Leases from the configured seconds."""
    return Leases(
        lease=timedelta(seconds=lease_seconds), cancel_grace=timedelta(seconds=cancel_grace_seconds)
    )
