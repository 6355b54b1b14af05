"""The read-model tables and the one transaction that advances them with their tracking record.

Functions here take an autocommit connection and open their own transactions.

Exactly-once: every batch runs in a transaction that locks this projection's
tracking row, skips events at or below the recorded position, writes the rows
and moves the position. A crash before commit leaves nothing behind; a crash
after it leaves nothing to redo.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
from psycopg import Connection, Cursor
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from domain.jobs import Job, job_id_of
from domain.miners import miner_id_of
from domain.pricing import RuntimeStats
from projections.jobs import JobRow, RuntimeSample, fold, learn, runtime_sample
from projections.miners import MINER_EVENTS, MinerRow, MinerStats, fold_miner, stats_delta

PROJECTION_NAME = "job_views"
# Committed together with each batch, so listeners learn the views' new position.
VIEWS_CHANNEL = "jobledger_views"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobledger_job_views (
    job_id text PRIMARY KEY,
    seq bigint NOT NULL,
    owner text NOT NULL,
    model text NOT NULL,
    priority text NOT NULL,
    status text NOT NULL,
    progress integer NOT NULL,
    attempt integer NOT NULL,
    miner_id text,
    gpu_type text NOT NULL,
    gpu_count integer NOT NULL,
    min_vram_gb integer NOT NULL,
    timeout_seconds integer NOT NULL,
    output_destination text NOT NULL,
    output_format text NOT NULL,
    estimated_cost numeric NOT NULL,
    estimated_time_seconds integer NOT NULL,
    cost numeric,
    error text,
    result jsonb,
    created_at timestamptz NOT NULL,
    started_at timestamptz,
    completed_at timestamptz,
    updated_at timestamptz NOT NULL,
    version integer NOT NULL,
    error_code text,
    assigned_at timestamptz,
    status_since timestamptz
);
-- Columns added after the first release; rebuilt views fill them from the log.
ALTER TABLE jobledger_job_views ADD COLUMN IF NOT EXISTS error_code text;
ALTER TABLE jobledger_job_views ADD COLUMN IF NOT EXISTS assigned_at timestamptz;
ALTER TABLE jobledger_job_views ADD COLUMN IF NOT EXISTS status_since timestamptz;
CREATE INDEX IF NOT EXISTS jobledger_job_views_by_owner
    ON jobledger_job_views (owner, seq DESC);
CREATE INDEX IF NOT EXISTS jobledger_job_views_by_owner_status
    ON jobledger_job_views (owner, status, seq DESC);
CREATE INDEX IF NOT EXISTS jobledger_job_views_by_status
    ON jobledger_job_views (status, seq DESC);
CREATE INDEX IF NOT EXISTS jobledger_job_views_by_created
    ON jobledger_job_views (created_at, seq);
-- Jobs per owner and status, kept by the same batches: a list's `total` is then a
-- lookup, not a count over every matching row (100,000 rows for one client at 1M jobs).
CREATE TABLE IF NOT EXISTS jobledger_job_counts (
    owner text NOT NULL,
    status text NOT NULL,
    jobs bigint NOT NULL,
    PRIMARY KEY (owner, status)
);
CREATE TABLE IF NOT EXISTS jobledger_runtime_stats (
    model text NOT NULL,
    gpu_type text NOT NULL,
    completed bigint NOT NULL,
    mean_seconds numeric NOT NULL,
    PRIMARY KEY (model, gpu_type)
);
-- The jobs a miner holds, for its inflight count and the scheduler's free capacity.
CREATE INDEX IF NOT EXISTS jobledger_job_views_held_by_miner
    ON jobledger_job_views (miner_id) WHERE status IN ('assigned', 'running', 'canceling');
CREATE TABLE IF NOT EXISTS jobledger_miner_views (
    miner_id text PRIMARY KEY,
    name text NOT NULL,
    gpu_type text NOT NULL,
    gpu_count integer NOT NULL,
    vram_gb integer NOT NULL,
    location text NOT NULL,
    price_per_hour numeric NOT NULL,
    max_concurrent integer NOT NULL,
    active boolean NOT NULL,
    registered_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    version integer NOT NULL,
    seq bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS jobledger_miner_views_by_seq
    ON jobledger_miner_views (seq DESC);
CREATE INDEX IF NOT EXISTS jobledger_miner_views_active_by_seq
    ON jobledger_miner_views (seq DESC) WHERE active;
CREATE TABLE IF NOT EXISTS jobledger_miner_stats (
    miner_id text PRIMARY KEY,
    finished_jobs bigint NOT NULL,
    completed_jobs bigint NOT NULL,
    failed_jobs bigint NOT NULL,
    timed_out_jobs bigint NOT NULL,
    total_run_seconds numeric NOT NULL,
    gpu_seconds numeric NOT NULL,
    earnings numeric NOT NULL
);
-- Written by the heartbeat listener (app/heartbeats.py), not by the projection:
-- liveness is not in the event log, so rebuilds leave it alone.
CREATE TABLE IF NOT EXISTS jobledger_miner_liveness (
    miner_id text PRIMARY KEY,
    last_heartbeat_at timestamptz NOT NULL,
    reported_inflight integer NOT NULL,
    gpus jsonb NOT NULL,
    session text NOT NULL,
    -- [[job_id, attempt], ...]: what the miner's latest heartbeat says it holds.
    held jsonb NOT NULL DEFAULT '[]',
    -- The miner is shutting down: alive, but takes no new work.
    draining boolean NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS jobledger_projection_tracking (
    projection text PRIMARY KEY,
    position bigint NOT NULL
);
"""

COLUMNS = tuple(JobRow.__struct_fields__)
_UPSERT_ROW = (
    f"INSERT INTO jobledger_job_views ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(COLUMNS))}) "
    "ON CONFLICT (job_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS if c != "job_id")
)
_ADD_COUNTS = (
    "INSERT INTO jobledger_job_counts (owner, status, jobs) "
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[]) "
    "ON CONFLICT (owner, status) DO UPDATE SET jobs = jobledger_job_counts.jobs + EXCLUDED.jobs"
)
_DROP_EMPTY_COUNTS = (
    "DELETE FROM jobledger_job_counts WHERE jobs = 0 "
    "AND (owner, status) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
)
_UPSERT_STATS = (
    "INSERT INTO jobledger_runtime_stats (model, gpu_type, completed, mean_seconds) "
    "VALUES (%s, %s, %s, %s) ON CONFLICT (model, gpu_type) DO UPDATE SET "
    "completed = EXCLUDED.completed, mean_seconds = EXCLUDED.mean_seconds"
)


MINER_COLUMNS = tuple(MinerRow.__struct_fields__)
_UPSERT_MINER = (
    f"INSERT INTO jobledger_miner_views ({', '.join(MINER_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(MINER_COLUMNS))}) "
    "ON CONFLICT (miner_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in MINER_COLUMNS if c != "miner_id")
)
MINER_STATS_COLUMNS = tuple(MinerStats.__struct_fields__)
_UPSERT_MINER_STATS = (
    f"INSERT INTO jobledger_miner_stats ({', '.join(MINER_STATS_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(MINER_STATS_COLUMNS))}) "
    "ON CONFLICT (miner_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in MINER_STATS_COLUMNS if c != "miner_id")
)


def create_schema(conn: Connection[Any]) -> None:
    """Create the read-model tables if they are missing and register the projection."""
    with conn.transaction():
        found = conn.execute("SELECT to_regclass('jobledger_job_counts')").fetchone()
        counted = found is not None and found[0] is not None
        conn.execute(SCHEMA)
        conn.execute(
            "INSERT INTO jobledger_projection_tracking (projection, position) VALUES (%s, 0) "
            "ON CONFLICT DO NOTHING",
            (PROJECTION_NAME,),
        )
        if not counted:
            # Views built before the counts existed: count them once, with the tracking
            # row locked so that no batch commits between the count and the next batch.
            with conn.cursor() as cur:
                _lock_position(cur)
                cur.execute(
                    "INSERT INTO jobledger_job_counts (owner, status, jobs) "
                    "SELECT owner, status, count(*) FROM jobledger_job_views "
                    "GROUP BY owner, status"
                )


def _row_params(row: JobRow) -> tuple[Any, ...]:
    values = list(msgspec.structs.astuple(row))
    result_index = COLUMNS.index("result")
    if values[result_index] is not None:
        values[result_index] = Jsonb(values[result_index])
    return tuple(values)


def _load_rows(cur: Cursor[Any], job_ids: Sequence[str]) -> dict[str, JobRow]:
    with cur.connection.cursor(row_factory=class_row(JobRow)) as rows:
        rows.execute(
            f"SELECT {', '.join(COLUMNS)} FROM jobledger_job_views WHERE job_id = ANY(%s)",
            (list(job_ids),),
        )
        return {row.job_id: row for row in rows}


def save_runtime_stats(cur: Cursor[Any], samples: list[RuntimeSample]) -> None:
    keys = {(s.model, s.gpu_type) for s in samples}
    cur.execute(
        "SELECT model, gpu_type, completed, mean_seconds FROM jobledger_runtime_stats "
        "WHERE (model, gpu_type) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
        ([k[0] for k in keys], [k[1] for k in keys]),
    )
    stats: dict[tuple[str, str], RuntimeStats] = {
        (model, gpu_type): RuntimeStats(completed, mean)
        for model, gpu_type, completed, mean in cur.fetchall()
    }
    for sample in samples:
        key = (sample.model, sample.gpu_type)
        stats[key] = learn(stats.get(key), sample)
    cur.executemany(
        _UPSERT_STATS,
        [(model, gpu, s.completed, s.mean_seconds) for (model, gpu), s in stats.items()],
    )


def save_miner_stats(cur: Cursor[Any], deltas: list[MinerStats]) -> None:
    with cur.connection.cursor(row_factory=class_row(MinerStats)) as rows:
        rows.execute(
            f"SELECT {', '.join(MINER_STATS_COLUMNS)} FROM jobledger_miner_stats "
            "WHERE miner_id = ANY(%s)",
            (list({d.miner_id for d in deltas}),),
        )
        stats = {row.miner_id: row for row in rows}
    for delta in deltas:
        known = stats.get(delta.miner_id)
        stats[delta.miner_id] = known.plus(delta) if known else delta
    cur.executemany(_UPSERT_MINER_STATS, [msgspec.structs.astuple(s) for s in stats.values()])


def save_counts(cur: Cursor[Any], before: dict[str, JobRow], after: dict[str, JobRow]) -> None:
    """Move each changed job from its old (owner, status) count to its new one."""
    deltas: Counter[tuple[str, str]] = Counter()
    for job_id, row in after.items():
        if (old := before.get(job_id)) is not None:
            deltas[(old.owner, old.status)] -= 1
        deltas[(row.owner, row.status)] += 1
    moved = [(key, delta) for key, delta in deltas.items() if delta]
    if moved:
        owners = [owner for (owner, _), _ in moved]
        statuses = [status for (_, status), _ in moved]
        cur.execute(_ADD_COUNTS, (owners, statuses, [delta for _, delta in moved]))
        # No zero rows: the table then reads exactly as a rebuild writes it.
        cur.execute(_DROP_EMPTY_COUNTS, (owners, statuses))


def _apply_job_events(cur: Cursor[Any], job_events: Sequence[tuple[int, Any]]) -> None:
    rows = _load_rows(cur, list({job_id_of(e.originator_id) for _, e in job_events}))
    loaded = dict(rows)
    changed: dict[str, JobRow] = {}
    samples: list[RuntimeSample] = []
    deltas: list[MinerStats] = []
    for seq, event in job_events:
        job_id = job_id_of(event.originator_id)
        before = rows.get(job_id)
        if before is not None and before.version >= event.originator_version:
            continue  # already folded (rebuilds and redeliveries are harmless)
        if before is not None and (sample := runtime_sample(before, event)) is not None:
            samples.append(sample)
        if (delta := stats_delta(before, event)) is not None:
            deltas.append(delta)
        rows[job_id] = changed[job_id] = fold(before, event, seq)
    cur.executemany(_UPSERT_ROW, [_row_params(row) for row in changed.values()])
    save_counts(cur, loaded, changed)
    if samples:
        save_runtime_stats(cur, samples)
    if deltas:
        save_miner_stats(cur, deltas)


def _apply_miner_events(cur: Cursor[Any], miner_events: Sequence[tuple[int, Any]]) -> None:
    miner_ids = list({miner_id_of(e.originator_id) for _, e in miner_events})
    with cur.connection.cursor(row_factory=class_row(MinerRow)) as found:
        found.execute(
            f"SELECT {', '.join(MINER_COLUMNS)} FROM jobledger_miner_views "
            "WHERE miner_id = ANY(%s)",
            (miner_ids,),
        )
        rows = {row.miner_id: row for row in found}
    changed: dict[str, MinerRow] = {}
    for seq, event in miner_events:
        miner_id = miner_id_of(event.originator_id)
        before = rows.get(miner_id)
        if before is not None and before.version >= event.originator_version:
            continue  # already folded
        rows[miner_id] = changed[miner_id] = fold_miner(before, event, seq)
    cur.executemany(_UPSERT_MINER, [msgspec.structs.astuple(row) for row in changed.values()])


def _apply(cur: Cursor[Any], batch: Sequence[tuple[int, Any]]) -> None:
    """Fold a batch of (position, domain event) into the tables: one read, one write per table."""
    job_events = [(seq, e) for seq, e in batch if isinstance(e, Job.Event | Job.Submitted)]
    miner_events = [(seq, e) for seq, e in batch if isinstance(e, MINER_EVENTS)]
    if job_events:
        _apply_job_events(cur, job_events)
    if miner_events:
        _apply_miner_events(cur, miner_events)


def _lock_position(cur: Cursor[Any]) -> int:
    cur.execute(
        "SELECT position FROM jobledger_projection_tracking WHERE projection = %s FOR UPDATE",
        (PROJECTION_NAME,),
    )
    found = cur.fetchone()
    if found is None:
        raise RuntimeError("projection tracking row missing: run create_schema() first")
    return int(found[0])


def _set_position(cur: Cursor[Any], position: int) -> None:
    cur.execute(
        "UPDATE jobledger_projection_tracking SET position = %s WHERE projection = %s",
        (position, PROJECTION_NAME),
    )
    cur.execute("SELECT pg_notify(%s, %s)", (VIEWS_CHANNEL, str(position)))


def apply_batch(conn: Connection[Any], batch: Sequence[tuple[int, Any]]) -> int:
    """Apply events past the tracked position in one transaction; returns the new position."""
    with conn.transaction(), conn.cursor() as cur:
        position = _lock_position(cur)
        fresh = [(seq, event) for seq, event in batch if seq > position]
        if not fresh:
            return position
        _apply(cur, fresh)
        position = fresh[-1][0]
        _set_position(cur, position)
        return position


def rebuild(conn: Connection[Any], batches: Iterable[Sequence[tuple[int, Any]]]) -> int:
    """Empty the tables and fold the whole log again, atomically: readers see old or new."""
    with conn.transaction(), conn.cursor() as cur:
        _lock_position(cur)
        # Liveness is not derived from the log: it survives rebuilds.
        cur.execute(
            "TRUNCATE jobledger_job_views, jobledger_job_counts, jobledger_runtime_stats, "
            "jobledger_miner_views, jobledger_miner_stats"
        )
        position = 0
        for batch in batches:
            _apply(cur, batch)
            if batch:
                position = batch[-1][0]
        _set_position(cur, position)
        return position


def read_position(conn: Connection[Any]) -> int:
    """The last log position the views include."""
    found = conn.execute(
        "SELECT position FROM jobledger_projection_tracking WHERE projection = %s",
        (PROJECTION_NAME,),
    ).fetchone()
    return int(found[0]) if found else 0
