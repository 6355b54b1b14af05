"""The Job state machine, pair by pair, against a table written out here (not the code's)."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from uuid import UUID

import pytest

from domain.errors import Conflict, InvalidJobRequest, InvalidTransition, JobNotFound, StaleAttempt
from domain.jobs import (
    Job,
    JobStatus,
    RequeueCause,
    aggregate_id_of,
    idempotent_aggregate_id,
    job_id_of,
)
from tests.unit.job_builders import (
    BUILDERS,
    MINER,
    OTHER_MINER,
    RESULT,
    assigned,
    running,
    submitted,
)

# Each command as a client, miner or the scheduler would send it for the job's current attempt.
COMMANDS: dict[str, Callable[[Job], None]] = {
    "assign": lambda job: job.assign(OTHER_MINER),
    "start": lambda job: job.start(attempt=job.attempt, miner_id=job.miner_id or MINER),
    "report_progress": lambda job: job.report_progress(attempt=job.attempt, progress=40),
    "complete": lambda job: job.complete(
        attempt=job.attempt,
        result=RESULT,
        metrics={"gpu_util": 0.9},
        gpu_seconds=Decimal("12.5"),
        cost=Decimal("0.05"),
    ),
    "fail": lambda job: job.fail(attempt=job.attempt, error="CUDA out of memory"),
    "request_cancel": lambda job: job.request_cancel(),
    "confirm_canceled": lambda job: job.confirm_canceled(attempt=job.attempt),
    "time_out": lambda job: job.time_out(),
    "requeue": lambda job: job.requeue(RequeueCause.LEASE_EXPIRED),
}

REJECTED = "rejected"
NO_EVENT = None
# The spec: (status after the command, the one event it records) or REJECTED.
EXPECTED: dict[str, dict[str, tuple[str, str | None] | str]] = {
    "pending": {
        "assign": ("assigned", "Job.Assigned"),
        "start": REJECTED,
        "report_progress": REJECTED,
        "complete": REJECTED,
        "fail": REJECTED,
        "request_cancel": ("canceled", "Job.Canceled"),
        "confirm_canceled": REJECTED,
        "time_out": ("timed_out", "Job.TimedOut"),
        "requeue": REJECTED,
    },
    "assigned": {
        "assign": REJECTED,
        "start": ("running", "Job.Started"),
        "report_progress": REJECTED,
        "complete": ("completed", "Job.Completed"),
        "fail": ("failed", "Job.Failed"),
        "request_cancel": ("canceling", "Job.CancelRequested"),
        "confirm_canceled": REJECTED,
        "time_out": ("timed_out", "Job.TimedOut"),
        "requeue": ("pending", "Job.Requeued"),
    },
    "running": {
        "assign": REJECTED,
        "start": REJECTED,
        "report_progress": ("running", "Job.ProgressReported"),
        "complete": ("completed", "Job.Completed"),
        "fail": ("failed", "Job.Failed"),
        "request_cancel": ("canceling", "Job.CancelRequested"),
        "confirm_canceled": REJECTED,
        "time_out": ("timed_out", "Job.TimedOut"),
        "requeue": ("pending", "Job.Requeued"),
    },
    "canceling": {
        "assign": REJECTED,
        "start": REJECTED,
        "report_progress": REJECTED,
        "complete": ("completed", "Job.Completed"),
        "fail": ("failed", "Job.Failed"),
        "request_cancel": ("canceling", NO_EVENT),
        "confirm_canceled": ("canceled", "Job.Canceled"),
        "time_out": ("timed_out", "Job.TimedOut"),
        "requeue": REJECTED,
    },
    "completed": dict.fromkeys(COMMANDS, REJECTED),
    "failed": dict.fromkeys(COMMANDS, REJECTED),
    "canceled": dict.fromkeys(COMMANDS, REJECTED),
    "timed_out": dict.fromkeys(COMMANDS, REJECTED),
}

PAIRS = [
    pytest.param(status, command, outcome, id=f"{status}-{command}")
    for status, row in EXPECTED.items()
    for command, outcome in row.items()
]


def snapshot(job: Job) -> tuple[object, ...]:
    return (job.version, job.status, job.attempt, job.miner_id, job.progress, job.error)


def test_the_table_covers_every_status_and_command() -> None:
    assert set(EXPECTED) == {status.value for status in JobStatus}
    assert all(set(row) == set(COMMANDS) for row in EXPECTED.values())
    assert len(PAIRS) == 72


@pytest.mark.parametrize("status", list(BUILDERS))
def test_builders_reach_their_status(status: str) -> None:
    assert BUILDERS[status]().status == status


@pytest.mark.parametrize(("status", "command", "outcome"), PAIRS)
def test_command_in_status(
    status: str, command: str, outcome: tuple[str, str | None] | str
) -> None:
    job = BUILDERS[status]()
    job.collect_events()
    before = snapshot(job)

    if outcome == REJECTED:
        with pytest.raises(InvalidTransition) as refused:
            COMMANDS[command](job)
        assert isinstance(refused.value, Conflict)
        assert (refused.value.status, refused.value.command) == (status, command)
        assert job.collect_events() == []
        assert snapshot(job) == before
        return

    assert isinstance(outcome, tuple)
    expected_status, expected_event = outcome
    version, attempt = job.version, job.attempt
    COMMANDS[command](job)
    events = job.collect_events()
    assert job.status == expected_status
    if expected_event is NO_EVENT:
        assert events == []
        assert snapshot(job) == before
        return
    assert [type(event).__qualname__ for event in events] == [expected_event]
    assert job.version == version + 1
    assert job.attempt == (attempt + 1 if command == "requeue" else attempt)


STALE_ATTEMPT_CASES = [
    ("assigned", "start"),
    ("running", "report_progress"),
    ("assigned", "complete"),
    ("running", "complete"),
    ("canceling", "complete"),
    ("assigned", "fail"),
    ("running", "fail"),
    ("canceling", "fail"),
    ("canceling", "confirm_canceled"),
]

ATTEMPT_COMMANDS: dict[str, Callable[[Job, int], None]] = {
    "start": lambda job, attempt: job.start(attempt=attempt, miner_id=MINER),
    "report_progress": lambda job, attempt: job.report_progress(attempt=attempt, progress=50),
    "complete": lambda job, attempt: job.complete(
        attempt=attempt, result=RESULT, metrics={}, gpu_seconds=Decimal(1), cost=Decimal("0.05")
    ),
    "fail": lambda job, attempt: job.fail(attempt=attempt, error="boom"),
    "confirm_canceled": lambda job, attempt: job.confirm_canceled(attempt=attempt),
}


@pytest.mark.parametrize("wrong_attempt", [0, 2])
@pytest.mark.parametrize(("status", "command"), STALE_ATTEMPT_CASES)
def test_a_wrong_attempt_is_stale_and_records_nothing(
    status: str, command: str, wrong_attempt: int
) -> None:
    job = BUILDERS[status]()
    job.collect_events()
    before = snapshot(job)
    with pytest.raises(StaleAttempt):
        ATTEMPT_COMMANDS[command](job, wrong_attempt)
    assert job.collect_events() == []
    assert snapshot(job) == before


def test_start_by_another_miner_is_stale_and_records_nothing() -> None:
    job = assigned()
    job.collect_events()
    before = snapshot(job)
    with pytest.raises(StaleAttempt):
        job.start(attempt=1, miner_id=OTHER_MINER)
    assert job.collect_events() == []
    assert snapshot(job) == before
    assert job.status is JobStatus.ASSIGNED


@pytest.mark.parametrize("progress", [-1, 101, 1000])
def test_progress_outside_0_to_100_is_invalid_and_records_nothing(progress: int) -> None:
    job = running()
    job.collect_events()
    before = snapshot(job)
    with pytest.raises(InvalidJobRequest):
        job.report_progress(attempt=1, progress=progress)
    assert job.collect_events() == []
    assert snapshot(job) == before


@pytest.mark.parametrize("progress", [0, 100])
def test_progress_bounds_are_accepted(progress: int) -> None:
    job = running()
    job.report_progress(attempt=1, progress=progress)
    assert job.progress == progress
    assert job.status is JobStatus.RUNNING


@pytest.mark.parametrize("cause", list(RequeueCause))
def test_requeue_records_its_cause_and_previous_miner(cause: RequeueCause) -> None:
    job = running()
    job.report_progress(attempt=1, progress=60)
    job.collect_events()
    job.requeue(cause)
    [event] = job.collect_events()
    assert isinstance(event, Job.Requeued)
    assert (event.cause, event.previous_miner_id, event.attempt) == (cause.value, MINER, 2)
    assert (job.status, job.attempt, job.miner_id, job.progress, job.started_at) == (
        JobStatus.PENDING,
        2,
        None,
        0,
        None,
    )


def test_requeue_with_an_unknown_cause_records_nothing() -> None:
    job = running()
    job.collect_events()
    before = snapshot(job)
    with pytest.raises(InvalidJobRequest, match="gremlins"):
        job.requeue("gremlins")  # type: ignore[arg-type]
    assert job.collect_events() == []
    assert snapshot(job) == before


def test_after_requeue_reports_for_the_old_attempt_are_stale() -> None:
    job = running()
    job.requeue(RequeueCause.MINER_ERROR)
    job.assign(OTHER_MINER)
    job.collect_events()
    before = snapshot(job)
    old_reports: list[Callable[[], None]] = [
        lambda: job.start(attempt=1, miner_id=MINER),
        lambda: job.start(attempt=1, miner_id=OTHER_MINER),
        lambda: job.report_progress(attempt=1, progress=90),
        lambda: job.complete(
            attempt=1, result=RESULT, metrics={}, gpu_seconds=Decimal(1), cost=Decimal(1)
        ),
        lambda: job.fail(attempt=1, error="late failure"),
        # The old miner cannot take over the new attempt either.
        lambda: job.start(attempt=2, miner_id=MINER),
    ]
    for report in old_reports:
        with pytest.raises(StaleAttempt):
            report()
    assert job.collect_events() == []
    assert snapshot(job) == before

    job.start(attempt=2, miner_id=OTHER_MINER)
    assert (job.status, job.attempt, job.miner_id) == (JobStatus.RUNNING, 2, OTHER_MINER)


def rebuilt(events: list[object]) -> Job:
    job = None
    for event in events:
        job = event.mutate(job)  # type: ignore[attr-defined]
    assert isinstance(job, Job)
    return job


def requeued_and_reassigned() -> Job:
    job = running()
    job.report_progress(attempt=1, progress=30)
    job.requeue(RequeueCause.MINER_DEREGISTERED)
    job.assign(OTHER_MINER)
    job.start(attempt=2, miner_id=OTHER_MINER)
    job.report_progress(attempt=2, progress=10)
    return job


@pytest.mark.parametrize(
    "build", [*BUILDERS.values(), requeued_and_reassigned], ids=[*BUILDERS, "requeued"]
)
def test_a_job_rebuilt_from_its_events_equals_the_live_one(build: Callable[[], Job]) -> None:
    job = build()
    copy = rebuilt(list(job.collect_events()))
    fields = ("status", "attempt", "miner_id", "progress", "started_at", "finished_at", "version")
    assert {name: getattr(copy, name) for name in fields} == {
        name: getattr(job, name) for name in fields
    }
    assert copy == job


def test_job_ids_round_trip() -> None:
    aggregate_id = UUID("0123456789abcdef0123456789abcdef")
    job_id = job_id_of(aggregate_id)
    assert job_id == "job_0123456789abcdef0123456789abcdef"
    assert aggregate_id_of(job_id) == aggregate_id
    job = submitted()
    assert aggregate_id_of(job.job_id) == job.id


@pytest.mark.parametrize(
    "job_id",
    [
        "history",
        "job_XYZ",
        "",
        "job_0123456789ABCDEF0123456789ABCDEF",
        "job_0123456789abcdef0123456789abcde",
        "job_0123456789abcdef0123456789abcdef0",
        "0123456789abcdef0123456789abcdef",
        "job_01234567-89ab-cdef-0123-456789abcdef",
    ],
)
def test_malformed_job_ids_are_not_found(job_id: str) -> None:
    with pytest.raises(JobNotFound):
        aggregate_id_of(job_id)


def test_idempotent_ids_depend_on_owner_and_key() -> None:
    first = idempotent_aggregate_id("client_a", "key-1")
    assert idempotent_aggregate_id("client_a", "key-1") == first
    assert idempotent_aggregate_id("client_b", "key-1") != first
    assert idempotent_aggregate_id("client_a", "key-2") != first
