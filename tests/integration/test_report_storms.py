"""Report storms on a real PostgreSQL ledger: every report thrice, in any order (issue 6, item 7).

JetStream delivers at least once and miners retry, so the ingestor sees duplicates,
and reports of one job may overtake each other. Each job's full sequence (started,
progress 20/50/80, completed) is tripled, the whole list shuffled with a seeded
random, and applied through `apply_reports` in batches of random sizes, as fetched
batches of the durable consumer would be. The ledger must end with one completion
per job, contiguous versions, and views that equal a rebuild from the log.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from app import protocol
from app.ingestor import Outcome, apply_reports
from app.projector import Projector, rebuild
from app.store import JobLedger, postgres_env
from domain.errors import ConcurrentChange, DomainError
from domain.jobs import aggregate_id_of
from projections import tables
from tests.integration.helpers import spec
from tests.integration.test_reports import (
    MAX_ATTEMPTS,
    TERMINAL_EVENTS,
    completed,
    progress,
    register,
    started,
)

JOBS = 30
COPIES = 3
MAX_BATCH = 64
STEPS = (20, 50, 80)
# Every view table the projection writes, each ordered by its primary key.
VIEW_TABLES = {
    "jobledger_job_views": "job_id",
    "jobledger_miner_views": "miner_id",
    "jobledger_miner_stats": "miner_id",
    "jobledger_runtime_stats": "model, gpu_type",
}
# What may follow JobAssigned in a job's history once the storm is over.
AFTER_ASSIGNMENT = {"JobStarted", "JobProgressReported", "JobCompleted"}

Report = tuple[str, protocol.Report]


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection with the view tables created."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        tables.create_schema(conn)
        yield conn


def assigned_jobs(ledger: JobLedger, miner: str) -> list[str]:
    job_ids = []
    for _ in range(JOBS):
        job_id = ledger.submit(
            owner="alice",
            spec=spec(gpu_type="cpu", min_vram_gb=0, output_format="text"),
            idempotency_key=None,
        ).job_id
        ledger.change_job(job_id, lambda job: job.assign(miner))
        job_ids.append(job_id)
    return job_ids


def storm(job_ids: list[str], miner: str, rng: random.Random) -> list[Report]:
    """Every job's full report sequence, each report COPIES times, all shuffled together."""
    reports: list[Report] = []
    for job_id in job_ids:
        sequence: list[protocol.Report] = [started(miner)]
        sequence += [progress(miner, percent) for percent in STEPS]
        sequence.append(completed(miner))
        reports += [(job_id, report) for report in sequence]
    reports *= COPIES
    rng.shuffle(reports)
    return reports


def batches(reports: list[Report], rng: random.Random) -> Iterator[list[Report]]:
    """The reports in order, cut into batches of 1..MAX_BATCH, as fetches would be."""
    start = 0
    while start < len(reports):
        size = rng.randint(1, MAX_BATCH)
        yield reports[start : start + size]
        start += size


def snapshot(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every view table, in primary-key order."""
    return {
        table: conn.execute(f"SELECT * FROM {table} ORDER BY {key}").fetchall()
        for table, key in VIEW_TABLES.items()
    }


def stored_versions(conn: psycopg.Connection[Any], job_id: str) -> list[int]:
    rows = conn.execute(
        "SELECT originator_version FROM jobledger_events "
        "WHERE originator_id = %s ORDER BY originator_version",
        (aggregate_id_of(job_id),),
    ).fetchall()
    return [version for (version,) in rows]


def check_ledger(
    ledger: JobLedger,
    conn: psycopg.Connection[Any],
    job_ids: list[str],
    applied: Counter[str],
) -> None:
    """One completion per job, versions 1..n, and one event per applied report."""
    for job_id in job_ids:
        events = ledger.job_events(job_id, owner=None)
        types = [e.type for e in events]
        versions = stored_versions(conn, job_id)
        assert versions == list(range(1, len(versions) + 1)), (job_id, versions)
        assert [e.sequence for e in events] == versions
        assert [t for t in types if t in TERMINAL_EVENTS] == ["JobCompleted"], (job_id, types)
        assert types[:2] == ["JobSubmitted", "JobAssigned"] and types[-1] == "JobCompleted"
        after = types[2:]
        assert set(after) <= AFTER_ASSIGNMENT, (job_id, types)
        # A start, if it came before the completion, is recorded once and first.
        assert after.count("JobStarted") <= 1 and "JobStarted" not in after[1:], types
        # Progress only moves forward, each step at most once, and only while running.
        steps = [e.data["progress"] for e in events if e.type == "JobProgressReported"]
        assert steps == sorted(set(steps)) and set(steps) <= set(STEPS), (job_id, steps)
        assert not steps or after[0] == "JobStarted", types
        # Each APPLIED outcome recorded exactly one event; nothing else recorded any.
        assert applied[job_id] == len(after), (job_id, applied[job_id], types)
        row = ledger.job_row(job_id, owner=None)
        assert (row.status, row.progress, row.attempt) == ("completed", 100, 1)
        assert row.result is not None and row.result["data"] == completed("m").result.data


def types_of(ledger: JobLedger, job_id: str) -> list[str]:
    return [e.type for e in ledger.job_events(job_id, owner=None)]


def check_views_equal_a_rebuild(
    ledger: JobLedger,
    database_url: str,
    conn: psycopg.Connection[Any],
    job_ids: list[str],
    miner: str,
) -> None:
    """The incrementally projected views, row for row, are what a rebuild makes of the log."""
    assert Projector(ledger, database_url).catch_up(conn) == ledger.head()
    live = snapshot(conn)
    # Not vacuous: every job and the miner's earnings are in there.
    assert len(live["jobledger_job_views"]) == JOBS
    assert {row[0] for row in live["jobledger_job_views"]} == set(job_ids)
    stats = conn.execute(
        "SELECT completed_jobs, finished_jobs FROM jobledger_miner_stats WHERE miner_id = %s",
        (miner,),
    ).fetchone()
    assert stats == (JOBS, JOBS)
    assert rebuild(ledger, database_url) == ledger.head()
    rebuilt = snapshot(conn)
    for table in VIEW_TABLES:
        assert len(live[table]) == len(rebuilt[table]), table
        for before, after in zip(live[table], rebuilt[table], strict=True):
            assert before == after, table


@pytest.mark.parametrize("seed", [6, 7007])
def test_tripled_and_shuffled_reports_end_in_one_completion_per_job(
    ledger: JobLedger, conn: psycopg.Connection[Any], database_url: str, seed: int
) -> None:
    rng = random.Random(seed)
    miner = register(ledger, "storm")
    job_ids = assigned_jobs(ledger, miner)
    # The projector follows the storm in its own small batches, as it would live.
    projector = Projector(ledger, database_url, batch_size=rng.randint(3, 17))
    applied: Counter[str] = Counter()
    outcomes: Counter[Outcome] = Counter()
    for batch in batches(storm(job_ids, miner, rng), rng):
        results = apply_reports(ledger, batch, max_attempts=MAX_ATTEMPTS)
        assert len(results) == len(batch)
        for (job_id, report), result in zip(batch, results, strict=True):
            assert not isinstance(result, DomainError), (job_id, report, result)
            outcomes[result] += 1
            if result is Outcome.APPLIED:
                applied[job_id] += 1
        if rng.random() < 0.5:
            projector.catch_up(conn)

    # No report came from a non-holder, so none is rejected; a completion per job applied.
    assert outcomes[Outcome.REJECTED] == 0
    assert sum(outcomes.values()) == JOBS * (2 + len(STEPS)) * COPIES
    check_ledger(ledger, conn, job_ids, applied)
    check_views_equal_a_rebuild(ledger, database_url, conn, job_ids, miner)
    unstarted = [j for j in job_ids if "JobStarted" not in types_of(ledger, j)]
    print(f"seed {seed}: {outcomes}; completions that overtook their start: {len(unstarted)}")


def test_a_storm_split_between_concurrent_ingestors_ends_the_same(
    ledger: JobLedger, conn: psycopg.Connection[Any], database_url: str
) -> None:
    """Three ledger processes share the consumer: their batches race on the same jobs."""
    rng = random.Random(99)
    miner = register(ledger, "storm")
    job_ids = assigned_jobs(ledger, miner)
    reports = storm(job_ids, miner, rng)
    shares = [list(batches(reports[i::3], random.Random(seed))) for i, seed in enumerate("abc")]
    applied: Counter[str] = Counter()
    retried: list[Report] = []
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(shares), timeout=30)

    # One ledger per process, as in production; opened one at a time, as the app's
    # prepare_database does under its advisory lock (concurrent DDL would clash).
    ingestors = [JobLedger(postgres_env(database_url)) for _ in shares]

    def ingest(ingestor: JobLedger, share: list[list[Report]]) -> None:
        try:
            barrier.wait()
            for batch in share:
                results = apply_reports(ingestor, batch, max_attempts=MAX_ATTEMPTS)
                with lock:
                    for report, result in zip(batch, results, strict=True):
                        if result is Outcome.APPLIED:
                            applied[report[0]] += 1
                        elif isinstance(result, ConcurrentChange):
                            retried.append(report)  # nak'd: JetStream redelivers it
                        elif isinstance(result, DomainError):
                            failures.append(f"{report}: {result!r}")
        except Exception as error:  # reported below, not lost in the thread
            with lock:
                failures.append(f"{type(error).__name__}: {error}")

    threads = [
        threading.Thread(target=ingest, args=(ingestor, share))
        for ingestor, share in zip(ingestors, shares, strict=True)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for ingestor in ingestors:
            ingestor.close()
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    print(f"reports nak'd after racing another ingestor: {len(retried)}")
    # Redeliveries of what was nak'd, one by one, until nothing is left to retry.
    while retried:
        job_id, report = retried.pop(0)
        [result] = apply_reports(ledger, [(job_id, report)], max_attempts=MAX_ATTEMPTS)
        assert not isinstance(result, DomainError), result
        applied[job_id] += result is Outcome.APPLIED

    check_ledger(ledger, conn, job_ids, applied)
    check_views_equal_a_rebuild(ledger, database_url, conn, job_ids, miner)
