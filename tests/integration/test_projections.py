"""The job views: tracked, exactly once, resumable and rebuildable from the log alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from app.projector import Projector, rebuild
from app.store import JobLedger, postgres_env
from domain.pricing import RuntimeStats
from projections import tables
from tests.integration.helpers import run_to_completion, spec


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


def snapshot(conn: psycopg.Connection[Any]) -> tuple[list[Any], list[Any], int]:
    views = conn.execute("SELECT * FROM jobledger_job_views ORDER BY job_id").fetchall()
    stats = conn.execute("SELECT * FROM jobledger_runtime_stats ORDER BY model").fetchall()
    return views, stats, tables.read_position(conn)


def a_busy_log(ledger: JobLedger) -> list[str]:
    """Jobs in every reachable status: pending, canceled, completed."""
    job_ids = [
        ledger.submit(owner=f"owner{i % 3}", spec=spec(), idempotency_key=None).job_id
        for i in range(12)
    ]
    for job_id in job_ids[:4]:
        ledger.cancel(job_id, owner=None)
    for job_id in job_ids[4:8]:
        run_to_completion(ledger, job_id)
    return job_ids


def test_views_match_the_log(ledger: JobLedger, conn: psycopg.Connection[Any]) -> None:
    job_ids = a_busy_log(ledger)
    position = Projector(ledger, "unused").catch_up(conn)
    assert position == ledger.head()
    for job_id in job_ids:
        row = conn.execute(
            "SELECT status, version, cost FROM jobledger_job_views WHERE job_id = %s", (job_id,)
        ).fetchone()
        from_log = ledger.job_row(job_id, owner=None)
        assert row == (from_log.status, from_log.version, from_log.cost)
    statuses = dict(
        conn.execute("SELECT status, count(*) FROM jobledger_job_views GROUP BY status").fetchall()
    )
    assert statuses == {"pending": 4, "canceled": 4, "completed": 4}


def test_a_batch_applied_twice_changes_nothing(
    ledger: JobLedger, conn: psycopg.Connection[Any]
) -> None:
    a_busy_log(ledger)
    batch = ledger.read_log(1, 1000)
    tables.apply_batch(conn, batch)
    once = snapshot(conn)
    assert tables.apply_batch(conn, batch) == once[2]
    assert snapshot(conn) == once


def test_a_projector_resumes_where_the_last_one_stopped(
    ledger: JobLedger, conn: psycopg.Connection[Any], database_url: str, make_database: Any
) -> None:
    a_busy_log(ledger)
    log = ledger.read_log(1, 1000)
    # The first projector commits half the log, then "dies"; the next one takes over.
    tables.apply_batch(conn, log[: len(log) // 2])
    Projector(ledger, database_url, batch_size=7).catch_up(conn)
    resumed = snapshot(conn)
    rebuild(ledger, database_url)
    assert snapshot(conn) == resumed
    assert resumed[2] == ledger.head()


def test_rebuild_reproduces_identical_rows(
    ledger: JobLedger, conn: psycopg.Connection[Any], database_url: str
) -> None:
    a_busy_log(ledger)
    Projector(ledger, database_url).catch_up(conn)
    live = snapshot(conn)
    conn.execute("UPDATE jobledger_job_views SET status = 'tampered'")
    assert rebuild(ledger, database_url) == ledger.head()
    assert snapshot(conn) == live


def test_the_background_projector_follows_new_events(
    ledger: JobLedger, conn: psycopg.Connection[Any], database_url: str
) -> None:
    stop = threading.Event()
    worker = threading.Thread(target=Projector(ledger, database_url).run, args=(stop,))
    worker.start()
    try:
        job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
        deadline = time.monotonic() + 10
        while tables.read_position(conn) < ledger.head() and time.monotonic() < deadline:
            time.sleep(0.01)
        found = conn.execute(
            "SELECT status FROM jobledger_job_views WHERE job_id = %s", (job_id,)
        ).fetchone()
        assert found == ("pending",)
    finally:
        stop.set()
        worker.join(10)
    assert not worker.is_alive()


def test_estimates_learn_from_completed_jobs(
    ledger: JobLedger, conn: psycopg.Connection[Any], database_url: str
) -> None:
    for _ in range(3):
        job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
        run_to_completion(ledger, job_id)
    Projector(ledger, database_url).catch_up(conn)
    found = conn.execute(
        "SELECT completed, mean_seconds FROM jobledger_runtime_stats "
        "WHERE model = 'gpt2' AND gpu_type = 'v100'"
    ).fetchone()
    assert found is not None and found[0] == 3
    learned = ledger.submit(
        owner="alice",
        spec=spec(),
        idempotency_key=None,
        history=RuntimeStats(found[0], found[1]),
    )
    # These test runs take milliseconds, so the learned estimate is far below the default.
    assert learned.estimated_time_seconds < 600
    other_model = ledger.submit(owner="alice", spec=spec(model="llama"), idempotency_key=None)
    assert other_model.estimated_time_seconds == 600


def counted(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], int]:
    rows = conn.execute("SELECT owner, status, jobs FROM jobledger_job_counts").fetchall()
    return {(owner, status): jobs for owner, status, jobs in rows}


def actual(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], int]:
    rows = conn.execute(
        "SELECT owner, status, count(*) FROM jobledger_job_views GROUP BY owner, status"
    ).fetchall()
    return {(owner, status): jobs for owner, status, jobs in rows}


def test_counts_follow_every_status_change_in_batches_of_any_size(
    ledger: JobLedger, conn: psycopg.Connection[Any], database_url: str
) -> None:
    a_busy_log(ledger)
    # One event at a time, then the rest in one batch: a job may change twice in a batch.
    position = tables.read_position(conn)
    for seq, event in ledger.read_log(position + 1, 5):
        tables.apply_batch(conn, [(seq, event)])
    Projector(ledger, "unused").catch_up(conn)
    assert counted(conn) == actual(conn)
    assert sum(counted(conn).values()) == 12
    rebuild(ledger, database_url)
    assert counted(conn) == actual(conn)


def test_counts_are_made_once_for_views_built_before_them(
    ledger: JobLedger, conn: psycopg.Connection[Any]
) -> None:
    a_busy_log(ledger)
    Projector(ledger, "unused").catch_up(conn)
    conn.execute("DROP TABLE jobledger_job_counts")  # as a database from before the counts
    tables.create_schema(conn)
    assert counted(conn) == actual(conn)
    tables.create_schema(conn)  # and only once: a second start counts nothing twice
    assert counted(conn) == actual(conn)
