"""Group commit: many submissions in one transaction, each answered as `submit` would answer it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import psycopg
import pytest

from app.group_commit import GroupCommit
from app.store import JobLedger, SubmitRequest, Submitted
from domain.errors import IdempotencyConflict, InvalidJobRequest
from domain.pricing import RuntimeStats
from tests.integration.helpers import spec


@pytest.fixture
async def writer(ledger: JobLedger) -> AsyncIterator[GroupCommit]:
    """Group commit with no runtime history (every estimate is the default)."""

    async def no_history(kinds: object) -> dict[tuple[str, str], RuntimeStats]:
        return {}

    writer = GroupCommit(ledger, no_history)
    await writer.start()
    yield writer
    await writer.stop()


def request(key: str | None = None, owner: str = "alice", **changes: object) -> SubmitRequest:
    return SubmitRequest(owner=owner, spec=spec(**changes), idempotency_key=key)


def transactions_of(database_url: str, job_ids: list[str]) -> set[int]:
    """The PostgreSQL transactions that wrote these jobs' events."""
    from domain.jobs import aggregate_id_of

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT DISTINCT xmin::text FROM jobledger_events WHERE originator_id = ANY(%s)",
            ([aggregate_id_of(job_id) for job_id in job_ids],),
        ).fetchall()
    return {int(row[0]) for row in rows}


def test_a_batch_is_one_transaction_and_every_job_is_in_the_log(
    ledger: JobLedger, database_url: str
) -> None:
    outcomes = ledger.submit_many([request(f"k-{n}") for n in range(50)])
    assert all(isinstance(o, Submitted) and o.created for o in outcomes)
    submitted = [o for o in outcomes if isinstance(o, Submitted)]
    assert len({o.job_id for o in submitted}) == 50
    # One commit for all, and every answer waits for the position that commit ended at.
    assert len(transactions_of(database_url, [o.job_id for o in submitted])) == 1
    assert {o.position for o in submitted} == {ledger.head()}


def test_each_submission_gets_the_answer_submit_would_give(ledger: JobLedger) -> None:
    used = ledger.submit(owner="alice", spec=spec(), idempotency_key="used-before")
    outcomes = ledger.submit_many(
        [
            request("fresh"),
            request("used-before"),  # a retry of an acknowledged submission
            request("twice"),
            request("twice"),  # the same key twice in one batch
            request("clash"),
            request("clash", model="llama"),  # the same key, another body
            request("unpriced", gpu_type="abacus"),
            request(None),
        ]
    )
    fresh, retry, twice, again, clash, other, unpriced, keyless = outcomes
    assert isinstance(fresh, Submitted) and fresh.created
    assert isinstance(retry, Submitted) and not retry.created and retry.job_id == used.job_id
    assert isinstance(twice, Submitted) and isinstance(again, Submitted)
    assert twice.job_id == again.job_id and [twice.created, again.created].count(True) == 1
    assert isinstance(clash, Submitted)
    assert isinstance(other, IdempotencyConflict)
    assert isinstance(unpriced, InvalidJobRequest)
    assert isinstance(keyless, Submitted) and keyless.created
    # Nothing was recorded twice: one JobSubmitted per job id handed out.
    jobs = {o.job_id for o in outcomes if isinstance(o, Submitted)}
    assert all(len(ledger.job_history(job_id, owner=None)) == 1 for job_id in jobs)


def test_a_file_named_twice_in_a_batch_is_used_by_both_jobs(ledger: JobLedger) -> None:
    uploaded = ledger.upload_file(
        owner="alice",
        sha256="a" * 64,
        size_bytes=7,
        content_type="text/plain",
        filename="prompts.txt",
        location="local:files/a",
    )
    file_id = uploaded.file.file_id
    outcomes = ledger.submit_many(
        [request(input_text=None, input_file_id=file_id, model=m) for m in ("gpt2", "llama")]
    )
    assert all(isinstance(o, Submitted) and o.created for o in outcomes)
    # The first job to use a file is the one it records.
    first = outcomes[0]
    assert isinstance(first, Submitted)
    assert ledger.file(file_id, owner="alice").used_by == first.job_id


async def test_concurrent_callers_share_commits_and_each_hears_its_own_job(
    ledger: JobLedger, writer: GroupCommit, database_url: str
) -> None:
    outcomes = await asyncio.gather(*(writer.submit(request(f"c-{n}")) for n in range(200)))
    conflict = await asyncio.gather(
        writer.submit(request("c-1", model="llama")), return_exceptions=True
    )
    assert len({o.job_id for o in outcomes}) == 200 and all(o.created for o in outcomes)
    assert isinstance(conflict[0], IdempotencyConflict)
    # They queued while earlier batches committed, so fewer commits than submissions.
    assert len(transactions_of(database_url, [o.job_id for o in outcomes])) < 200
    for outcome in outcomes:
        assert ledger.head() >= outcome.position
        assert ledger.job_row(outcome.job_id, owner="alice").status == "pending"


async def test_estimates_use_runtime_figures_read_at_most_once_a_second_per_kind(
    ledger: JobLedger,
) -> None:
    asked: list[set[tuple[str, str]]] = []

    async def history(kinds: object) -> dict[tuple[str, str], RuntimeStats]:
        asked.append(set(kinds))  # type: ignore[call-overload]
        return {("gpt2", "v100"): RuntimeStats(completed=10, mean_seconds=Decimal(60))}

    writer = GroupCommit(ledger, history)
    await writer.start()
    try:
        first = await writer.submit(request("h-1"))
        again = await asyncio.gather(*(writer.submit(request(f"h-{n}")) for n in range(2, 12)))
        other = await writer.submit(request("h-llama", model="llama"))
    finally:
        await writer.stop()
    # The learned mean (60 s) prices the job, not the default guess (600 s).
    assert first.estimated_time_seconds == 60
    assert all(o.estimated_time_seconds == 60 for o in again)
    assert other.estimated_time_seconds == 600  # nothing learned about llama: the default
    assert asked == [{("gpt2", "v100")}, {("llama", "v100")}]


async def test_large_inputs_are_split_across_transactions_and_all_commit(
    writer: GroupCommit, database_url: str
) -> None:
    """Eight 700 KB inputs are 5.6 MB: in one insert the event store would stall for good."""
    big = "x" * 700_000
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(writer.submit(request(f"big-{n}", input_text=big)) for n in range(8))),
        timeout=60,
    )
    assert all(o.created for o in outcomes)
    # At most one megabyte of input per transaction: one 700 KB input each.
    assert len(transactions_of(database_url, [o.job_id for o in outcomes])) == 8
