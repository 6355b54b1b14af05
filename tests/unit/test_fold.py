"""The pure fold: a job's row read from its events matches the aggregate those events build."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from domain.jobs import Job, RequeueCause
from domain.pricing import RuntimeStats
from projections.jobs import JobRow, RuntimeSample, fold, learn, runtime_sample
from tests.unit.job_builders import MINER, OTHER_MINER, RESULT, assigned, submitted

FIRST_SEQ = 41


def canceled_while_pending(job: Job) -> None:
    job.request_cancel()


def completed_with_result(job: Job) -> None:
    job.assign(MINER)
    job.start(attempt=1, miner_id=MINER)
    job.report_progress(attempt=1, progress=30)
    job.report_progress(attempt=1, progress=70)
    job.complete(
        attempt=1,
        result=RESULT,
        metrics={"gpu_util": 0.93},
        gpu_seconds=Decimal("812.5"),
        cost=Decimal("0.05"),
    )


def requeued_then_failed(job: Job) -> None:
    job.assign(MINER)
    job.start(attempt=1, miner_id=MINER)
    job.report_progress(attempt=1, progress=55)
    job.requeue(RequeueCause.LEASE_EXPIRED)
    job.assign(OTHER_MINER)
    job.fail(attempt=2, error="model weights not found")


def timed_out_while_running(job: Job) -> None:
    job.assign(MINER)
    job.start(attempt=1, miner_id=MINER)
    job.report_progress(attempt=1, progress=20)
    job.time_out()


def canceled_by_miner(job: Job) -> None:
    job.assign(MINER)
    job.start(attempt=1, miner_id=MINER)
    job.request_cancel()
    job.request_cancel()
    job.confirm_canceled(attempt=1)


STORIES: dict[str, Callable[[Job], None]] = {
    "submitted-canceled": canceled_while_pending,
    "started-progress-completed": completed_with_result,
    "started-requeued-reassigned-failed": requeued_then_failed,
    "started-timed-out": timed_out_while_running,
    "canceling-confirmed": canceled_by_miner,
}


def events_of(story: Callable[[Job], None]) -> list[Any]:
    job = submitted()
    story(job)
    return list(job.collect_events())


def folded(events: Sequence[Any], first_seq: int = FIRST_SEQ) -> JobRow:
    row = None
    for offset, event in enumerate(events):
        # Other jobs' events interleave in the log, so positions are not contiguous.
        row = fold(row, event, first_seq + 7 * offset)
    assert row is not None
    return row


def row_view(row: JobRow) -> dict[str, Any]:
    return {
        "job_id": row.job_id,
        "status": row.status,
        "attempt": row.attempt,
        "miner_id": row.miner_id,
        "progress": row.progress,
        "cost": row.cost,
        "error": row.error,
        "result": row.result,
        "started_at": row.started_at,
        "completed_at": row.completed_at,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "version": row.version,
        "assigned_at": row.assigned_at,
        "error_code": row.error_code,
    }


def job_view(job: Job) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "status": job.status.value,
        "attempt": job.attempt,
        "miner_id": job.miner_id,
        "progress": job.progress,
        "cost": job.cost,
        "error": job.error,
        "result": job.result,
        "started_at": job.started_at,
        "completed_at": job.finished_at,
        "created_at": job.created_on,
        "updated_at": job.modified_on,
        "version": job.version,
        "assigned_at": job.assigned_at,
        "error_code": job.error_code,
    }


@pytest.mark.parametrize("story", list(STORIES.values()), ids=list(STORIES))
def test_the_row_matches_the_aggregate_after_every_event(story: Callable[[Job], None]) -> None:
    events = events_of(story)
    row = None
    job = None
    for offset, event in enumerate(events):
        row = fold(row, event, FIRST_SEQ + 7 * offset)
        job = event.mutate(job)
        assert row_view(row) == job_view(job)
        assert row.seq == FIRST_SEQ


def test_completed_story_row() -> None:
    row = folded(events_of(completed_with_result))
    assert (row.status, row.progress, row.cost, row.result) == (
        "completed",
        100,
        Decimal("0.05"),
        RESULT,
    )
    assert row.miner_id == MINER
    assert row.started_at is not None
    assert row.completed_at is not None
    assert row.started_at <= row.completed_at
    assert row.version == 6


def test_requeued_story_row() -> None:
    row = folded(events_of(requeued_then_failed))
    assert (row.status, row.attempt, row.miner_id, row.progress, row.started_at) == (
        "failed",
        2,
        OTHER_MINER,
        0,
        None,
    )
    assert row.error == "model weights not found"
    assert row.cost is None


def test_timed_out_story_row() -> None:
    row = folded(events_of(timed_out_while_running))
    assert row.status == "timed_out"
    assert row.error == "timed out after 3600 seconds"
    assert row.completed_at is not None


def test_canceled_while_pending_row() -> None:
    row = folded(events_of(canceled_while_pending))
    assert (row.status, row.miner_id, row.started_at, row.version) == ("canceled", None, None, 2)
    assert row.completed_at is not None


def test_submitted_row_carries_the_submission() -> None:
    [event] = events_of(lambda job: None)
    row = fold(None, event, 99)
    assert row.seq == 99
    assert (row.owner, row.model, row.gpu_type, row.gpu_count, row.priority) == (
        "client_a",
        "llama-3-8b",
        "v100",
        1,
        "normal",
    )
    assert (row.estimated_cost, row.estimated_time_seconds) == (Decimal("0.05"), 600)
    assert (row.status, row.attempt, row.progress, row.version) == ("pending", 1, 0, 1)


def test_a_job_event_without_its_submission_is_an_error() -> None:
    job = assigned()
    assigned_event = job.collect_events()[1]
    with pytest.raises(ValueError, match="Submitted"):
        fold(None, assigned_event, 5)


T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def timed_completion(run_time: timedelta) -> tuple[JobRow, Any]:
    """The row just before a completion, and the completion, `run_time` after the start."""
    job = submitted()
    job.assign(MINER)
    job.start(attempt=1, miner_id=MINER)
    job.complete(attempt=1, result=RESULT, metrics={}, gpu_seconds=Decimal(1), cost=Decimal(1))
    *before, started, done = job.collect_events()
    assert isinstance(started, Job.Started)
    assert isinstance(done, Job.Completed)
    started = dataclasses.replace(started, timestamp=T0)
    done = dataclasses.replace(done, timestamp=T0 + run_time)
    return folded([*before, started]), done


@pytest.mark.parametrize(
    ("run_time", "seconds"),
    [
        (timedelta(seconds=95, microseconds=250_000), Decimal("95.25")),
        (timedelta(days=1, seconds=2, microseconds=500_000), Decimal("86402.5")),
        (timedelta(0), Decimal(0)),
    ],
)
def test_a_completion_after_a_start_is_a_runtime_sample(
    run_time: timedelta, seconds: Decimal
) -> None:
    before, completion = timed_completion(run_time)
    sample = runtime_sample(before, completion)
    assert sample == RuntimeSample("llama-3-8b", "v100", seconds)
    assert sample is not None
    assert isinstance(sample.seconds, Decimal)


def test_a_completion_without_a_start_is_no_sample() -> None:
    job = assigned()
    job.complete(attempt=1, result=RESULT, metrics={}, gpu_seconds=Decimal(1), cost=Decimal(1))
    *before, completion = job.collect_events()
    assert runtime_sample(folded(before), completion) is None


def test_a_completion_after_a_requeue_without_a_new_start_is_no_sample() -> None:
    job = submitted()
    job.assign(MINER)
    job.start(attempt=1, miner_id=MINER)
    job.requeue(RequeueCause.MINER_ERROR)
    job.assign(OTHER_MINER)
    job.complete(attempt=2, result=RESULT, metrics={}, gpu_seconds=Decimal(1), cost=Decimal(1))
    *before, completion = job.collect_events()
    assert runtime_sample(folded(before), completion) is None


@pytest.mark.parametrize("story", list(STORIES.values()), ids=list(STORIES))
def test_only_completions_are_samples(story: Callable[[Job], None]) -> None:
    events = events_of(story)
    row = fold(None, events[0], FIRST_SEQ)
    for event in events[1:]:
        sample = runtime_sample(row, event)
        if isinstance(event, Job.Completed):
            assert sample is not None
        else:
            assert sample is None
        row = fold(row, event, FIRST_SEQ + 1)


def test_learn_folds_samples_into_the_stats() -> None:
    stats = learn(None, RuntimeSample("llama-3-8b", "v100", Decimal(100)))
    assert stats == RuntimeStats(1, Decimal(100))
    stats = learn(stats, RuntimeSample("llama-3-8b", "v100", Decimal(200)))
    assert stats == RuntimeStats(2, Decimal(120))


def test_status_since_moves_only_when_the_status_changes() -> None:
    job = submitted()
    job.assign(MINER)
    job.start(attempt=1, miner_id=MINER)
    job.report_progress(attempt=1, progress=10)
    job.request_cancel()
    job.reject_report(miner_id=OTHER_MINER, attempt=1, kind="progress", reason="not yours")
    events = job.collect_events()
    row = None
    for offset, event in enumerate(events):
        row = fold(row, event, FIRST_SEQ + offset)
    assert row is not None
    cancel_requested = next(e for e in events if isinstance(e, Job.CancelRequested))
    # The rejected report changed the row, but not the status: the grace period still
    # counts from the cancel request.
    assert row.status == "canceling"
    assert row.status_since == cancel_requested.timestamp
    assert row.updated_at == events[-1].timestamp != cancel_requested.timestamp
