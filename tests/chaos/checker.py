"""The checker: what the clients were told, against what the ledger's log holds.

`lost` counts acknowledged operations whose job is not in the log with their key;
`duplicated` counts Idempotency-Keys with more than one `JobSubmitted`. The log is
read in full from PostgreSQL (the only source of truth), never through the views.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg

from app.projector import rebuild
from app.relay import RELAY_NAME
from app.store import JobLedger, event_type_name, postgres_env
from domain.jobs import Job, job_id_of
from projections import tables
from tests.chaos.load import Operation
from tests.chaos.result import Result

TERMINAL_EVENTS = {"JobCompleted", "JobFailed", "JobCanceled", "JobTimedOut"}
# The view tables a rebuild must reproduce row for row, each ordered by its key.
# (Miner *views* also carry heartbeat columns written outside the log, so they are left out.)
REBUILT_TABLES = {
    "jobledger_job_views": "job_id",
    "jobledger_job_counts": "owner, status",
    "jobledger_miner_stats": "miner_id",
    "jobledger_runtime_stats": "model, gpu_type",
}


@dataclass
class LogScan:
    """The whole event log, summarised per job."""

    head: int = 0
    keys: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    events: dict[str, list[tuple[int, str]]] = field(default_factory=lambda: defaultdict(list))

    def types(self, job_id: str) -> list[str]:
        return [kind for _, kind in self.events.get(job_id, [])]


def scan_log(dsn: str) -> LogScan:
    """Read every event: each job's (version, type) in order, and the jobs made per key."""
    ledger = JobLedger(postgres_env(dsn))
    scan = LogScan()
    try:
        for batch in ledger.read_whole_log():
            for position, event in batch:
                scan.head = position
                if not isinstance(event, Job.Event | Job.Submitted):
                    continue
                job_id = job_id_of(event.originator_id)
                scan.events[job_id].append((event.originator_version, event_type_name(event)))
                if isinstance(event, Job.Submitted) and event.idempotency_key:
                    scan.keys[event.idempotency_key].append(job_id)
    finally:
        ledger.close()
    return scan


def bookkeeping(result: Result, operations: list[Operation], scan: LogScan) -> None:
    """Jepsen's counts: acknowledged, lost, duplicated, and retries that named another job."""
    acknowledged = [op for op in operations if op.acknowledged]
    result.figure("operations", len(operations))
    result.figure("acknowledged", len(acknowledged))
    result.check("some operation was acknowledged", bool(acknowledged), "no load to count")
    result.figure("retried before acknowledged", sum(len(op.attempts) > 2 for op in acknowledged))
    # The interesting ones: an attempt got no answer (or a 5xx) yet had committed, which
    # the retry shows by replaying the job (`Idempotent-Replayed: true`) it did not create.
    result.figure(
        "unanswered attempts that had committed",
        sum(_committed_unanswered(op) for op in acknowledged),
    )
    # The deliberate retry after the acknowledgement must be told it is a replay.
    confirmations = [op.attempts[-1] for op in acknowledged if op.confirmed_job_id]
    result.expect_equal(
        "deliberate retries not marked as replays",
        sum(not attempt.replayed for attempt in confirmations),
        0,
    )
    lost = [op.key for op in acknowledged if op.job_id not in scan.keys.get(op.key, [])]
    duplicated = [key for key, jobs in scan.keys.items() if len(jobs) > 1]
    other_job = [op.key for op in acknowledged if op.confirmed_job_id != op.job_id]
    refused = [op for op in operations if not op.acknowledged and op.attempts]
    result.expect_equal("lost", len(lost), 0)
    result.expect_equal("duplicated", len(duplicated), 0)
    result.expect_equal("retries answering another job", len(other_job), 0)
    result.expect_equal("never acknowledged", len(refused), 0)
    if lost or duplicated or other_job or refused:
        sample = {
            "lost": lost[:3],
            "duplicated": {key: scan.keys[key] for key in duplicated[:3]},
            "other job": other_job[:3],
            "never acknowledged": [
                (op.key, [(a.status, a.error[:120]) for a in op.attempts[-3:]])
                for op in refused[:3]
            ],
        }
        result.check("sample of the offending operations", False, sample)


def _committed_unanswered(operation: Operation) -> bool:
    first_success = next(a for a in operation.attempts if a.job_id is not None)
    return first_success is not operation.attempts[0] and first_success.replayed


def job_histories(result: Result, scan: LogScan, job_ids: list[str] | None = None) -> None:
    """Every named job in the log, at most one terminal event each, versions 1..n with no gap."""
    jobs = job_ids if job_ids is not None else list(scan.events)
    result.expect_equal("jobs missing from the log", sum(j not in scan.events for j in jobs), 0)
    doubled = [j for j in jobs if sum(t in TERMINAL_EVENTS for t in scan.types(j)) > 1]
    gaps = [
        j
        for j in jobs
        if [v for v, _ in scan.events.get(j, [])] != list(range(1, len(scan.events.get(j, [])) + 1))
    ]
    result.expect_equal("jobs with more than one terminal event", len(doubled), 0)
    result.expect_equal("jobs with a gap in their versions", len(gaps), 0)


def positions(dsn: str) -> dict[str, int]:
    """Each tracked reader's recorded position (the projection's and the relay's)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT projection, position FROM jobledger_projection_tracking")
        return {name: int(position) for name, position in rows.fetchall()}


def snapshot(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    return {
        table: [hashable(row) for row in conn.execute(f"SELECT * FROM {table} ORDER BY {key}")]
        for table, key in REBUILT_TABLES.items()
    }


def hashable(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row whose JSON columns (decoded to dicts and lists) are canonical JSON text."""
    return tuple(
        json.dumps(value, sort_keys=True, default=str) if isinstance(value, dict | list) else value
        for value in row
    )


def views_equal_a_rebuild(result: Result, dsn: str) -> None:
    """Rebuild the views from the log (no ledger process may be running) and compare rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables.create_schema(conn)
        live = snapshot(conn)
        ledger = JobLedger(postgres_env(dsn))
        try:
            rebuilt_to = rebuild(ledger, dsn)
        finally:
            ledger.close()
        rebuilt = snapshot(conn)
    differing = Counter[str]()
    for table in REBUILT_TABLES:
        before = set(live[table])
        after = set(rebuilt[table])
        differing[table] = len(before ^ after)
    result.figure("view rows", sum(len(rows) for rows in live.values()))
    result.figure("rebuilt to position", rebuilt_to)
    result.expect_equal("view rows differing from a rebuild", sum(differing.values()), 0)
    if any(differing.values()):
        result.check("tables differing", False, dict(differing))


def tracking_at_head(result: Result, dsn: str, head: int) -> None:
    """The projection's and the relay's positions both equal the log's head."""
    at = positions(dsn)
    result.figure("log head", head)
    result.expect_equal("projection position", at.get(tables.PROJECTION_NAME, -1), head)
    result.expect_equal("relay position", at.get(RELAY_NAME, -1), head)
