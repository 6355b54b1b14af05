"""Dispatch commands on the Job aggregate: give_back, holds, reject_report, cancel_unconfirmed."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest

from domain.errors import InvalidTransition
from domain.jobs import Job, JobStatus, RequeueCause
from tests.unit.job_builders import (
    BUILDERS,
    MINER,
    OTHER_MINER,
    assigned,
    canceling,
    running,
    submitted,
)

TERMINAL_EVENTS = (Job.Completed, Job.Failed, Job.Canceled, Job.TimedOut)


def event_names(events: Iterable[object]) -> list[str]:
    return [type(event).__qualname__ for event in events]


def rebuilt(events: list[object]) -> Job:
    job = None
    for event in events:
        job = event.mutate(job)  # type: ignore[attr-defined]
    assert isinstance(job, Job)
    return job


# ---- give_back --------------------------------------------------------------


@pytest.mark.parametrize("build", [assigned, running], ids=["assigned", "running"])
def test_give_back_requeues_as_the_next_attempt_with_its_cause(build: Callable[[], Job]) -> None:
    job = build()
    job.collect_events()
    job.give_back(RequeueCause.LEASE_EXPIRED, max_attempts=3)
    [event] = job.collect_events()
    assert isinstance(event, Job.Requeued)
    assert (event.attempt, event.cause, event.previous_miner_id) == (2, "lease_expired", MINER)
    assert (job.status, job.attempt, job.miner_id) == (JobStatus.PENDING, 2, None)


def test_give_back_fails_the_job_once_its_attempts_are_used_up() -> None:
    job = running()
    job.give_back(RequeueCause.LOST_BY_MINER, max_attempts=3)
    job.assign(OTHER_MINER)
    job.give_back(RequeueCause.MINER_DEREGISTERED, max_attempts=3)
    job.assign(MINER)
    job.start(attempt=3, miner_id=MINER)
    job.collect_events()

    job.give_back(RequeueCause.MINER_RELEASED, max_attempts=3)

    [event] = job.collect_events()
    assert isinstance(event, Job.Failed)
    assert (event.attempt, event.error_code) == (3, "attempts_exhausted")
    assert "miner_released" in event.error and "3 attempts" in event.error
    assert (job.status, job.attempt, job.error_code) == (JobStatus.FAILED, 3, "attempts_exhausted")


def test_a_job_allowed_one_attempt_fails_at_its_first_give_back() -> None:
    job = assigned()
    job.collect_events()
    job.give_back(RequeueCause.MINER_DECLINED, max_attempts=1)
    assert event_names(job.collect_events()) == ["Job.Failed"]
    assert job.status is JobStatus.FAILED and job.error_code == "attempts_exhausted"


def test_a_job_that_gave_up_records_exactly_one_terminal_event() -> None:
    job = running()
    job.give_back(RequeueCause.LEASE_EXPIRED, max_attempts=1)
    with pytest.raises(InvalidTransition):
        job.give_back(RequeueCause.LEASE_EXPIRED, max_attempts=1)
    with pytest.raises(InvalidTransition):
        job.give_back(RequeueCause.LEASE_EXPIRED, max_attempts=5)
    terminal = [e for e in job.collect_events() if isinstance(e, TERMINAL_EVENTS)]
    assert len(terminal) == 1
    assert job.status is JobStatus.FAILED


@pytest.mark.parametrize("status", ["pending", "completed", "failed", "canceled", "timed_out"])
def test_give_back_of_a_job_no_miner_holds_is_refused(status: str) -> None:
    job = BUILDERS[status]()
    job.collect_events()
    before = (job.version, job.status, job.attempt)
    with pytest.raises(InvalidTransition):
        job.give_back(RequeueCause.LEASE_EXPIRED, max_attempts=3)
    assert job.collect_events() == []
    assert (job.version, job.status, job.attempt) == before


# ---- holds ------------------------------------------------------------------


@pytest.mark.parametrize("status", ["assigned", "running", "canceling"])
def test_the_assigned_miner_holds_its_current_attempt(status: str) -> None:
    job = BUILDERS[status]()
    assert job.holds(MINER, 1)
    assert not job.holds(OTHER_MINER, 1)
    assert not job.holds(MINER, 2)
    assert not job.holds(MINER, 0)


@pytest.mark.parametrize("status", ["pending", "completed", "failed", "canceled", "timed_out"])
def test_nobody_holds_a_pending_or_finished_job(status: str) -> None:
    job = BUILDERS[status]()
    assert not job.holds(MINER, 1)
    assert not job.holds(OTHER_MINER, 1)


def test_after_a_requeue_only_the_new_miner_holds_the_new_attempt() -> None:
    job = running()
    job.give_back(RequeueCause.LOST_BY_MINER, max_attempts=3)
    assert not job.holds(MINER, 1)
    job.assign(OTHER_MINER)
    assert job.holds(OTHER_MINER, 2)
    assert not job.holds(MINER, 1)
    assert not job.holds(OTHER_MINER, 1)
    assert not job.holds(MINER, 2)


# ---- reject_report ----------------------------------------------------------


def reject(
    job: Job, miner_id: str = OTHER_MINER, attempt: int = 1, kind: str = "completed"
) -> None:
    job.reject_report(miner_id=miner_id, attempt=attempt, kind=kind, reason="not the holder")


def test_a_rejected_report_is_recorded_and_changes_nothing_else() -> None:
    job = running()
    job.report_progress(attempt=1, progress=40)
    job.collect_events()
    reject(job)
    [event] = job.collect_events()
    assert isinstance(event, Job.ReportRejected)
    assert (event.miner_id, event.attempt, event.kind, event.reason) == (
        OTHER_MINER,
        1,
        "completed",
        "not the holder",
    )
    assert (job.status, job.attempt, job.miner_id, job.progress, job.result) == (
        JobStatus.RUNNING,
        1,
        MINER,
        40,
        None,
    )


def test_a_repeated_rejection_records_nothing() -> None:
    job = running()
    reject(job)
    job.collect_events()
    reject(job)
    reject(job)
    assert job.collect_events() == []


def test_rejections_are_counted_per_miner_attempt_and_kind() -> None:
    job = running()
    job.collect_events()
    reject(job, OTHER_MINER, 1, "completed")
    reject(job, OTHER_MINER, 1, "started")
    reject(job, OTHER_MINER, 2, "completed")
    reject(job, "miner_third", 1, "completed")
    reject(job, OTHER_MINER, 1, "completed")
    events = job.collect_events()
    assert all(isinstance(e, Job.ReportRejected) for e in events)
    rejections = [(e.miner_id, e.attempt, e.kind) for e in events]  # type: ignore[attr-defined]
    assert rejections == [
        (OTHER_MINER, 1, "completed"),
        (OTHER_MINER, 1, "started"),
        (OTHER_MINER, 2, "completed"),
        ("miner_third", 1, "completed"),
    ]


def test_a_job_rebuilt_from_its_events_still_knows_what_it_rejected() -> None:
    job = running()
    reject(job)
    copy = rebuilt(list(job.collect_events()))
    reject(copy)
    assert copy.collect_events() == []
    reject(copy, kind="failed")
    assert event_names(copy.collect_events()) == ["Job.ReportRejected"]


@pytest.mark.parametrize("status", list(BUILDERS))
def test_a_rejection_never_changes_the_status(status: str) -> None:
    job = BUILDERS[status]()
    reject(job, "miner_stranger", 9)
    assert job.status == status


# ---- cancel_unconfirmed -----------------------------------------------------


def test_cancel_unconfirmed_cancels_a_canceling_job() -> None:
    job = canceling()
    job.collect_events()
    job.cancel_unconfirmed("the miner did not confirm within 60 s")
    [event] = job.collect_events()
    assert isinstance(event, Job.Canceled)
    assert (event.attempt, event.reason) == (1, "the miner did not confirm within 60 s")
    assert job.status is JobStatus.CANCELED and job.finished_at is not None


@pytest.mark.parametrize("status", [s for s in BUILDERS if s != "canceling"])
def test_cancel_unconfirmed_is_refused_unless_canceling(status: str) -> None:
    job = BUILDERS[status]()
    job.collect_events()
    with pytest.raises(InvalidTransition):
        job.cancel_unconfirmed("the miner is gone")
    assert job.collect_events() == []
    assert job.status == status


# ---- fail with error_code ---------------------------------------------------


@pytest.mark.parametrize("build", [assigned, running, canceling])
def test_fail_records_the_error_code(build: Callable[[], Job]) -> None:
    job = build()
    job.collect_events()
    job.fail(attempt=1, error="CUDA out of memory", error_code="oom")
    [event] = job.collect_events()
    assert isinstance(event, Job.Failed)
    assert (event.error, event.error_code) == ("CUDA out of memory", "oom")
    assert (job.status, job.error, job.error_code) == (
        JobStatus.FAILED,
        "CUDA out of memory",
        "oom",
    )


def test_fail_without_a_code_is_a_plain_failure() -> None:
    job = running()
    job.fail(attempt=1, error="boom")
    assert job.error_code == "failed"


# ---- assigned_at ------------------------------------------------------------


def test_assignment_time_is_set_by_assigned_and_cleared_by_requeued() -> None:
    job = submitted()
    assert job.assigned_at is None
    job.assign(MINER)
    [assigned_event] = [e for e in job.collect_events() if isinstance(e, Job.Assigned)]
    assert job.assigned_at == assigned_event.timestamp
    job.requeue(RequeueCause.MINER_ERROR)
    assert job.assigned_at is None
    job.assign(OTHER_MINER)
    *_, reassigned = job.collect_events()
    assert isinstance(reassigned, Job.Assigned)
    assert job.assigned_at == reassigned.timestamp
    assert reassigned.timestamp >= assigned_event.timestamp


def test_assignment_time_survives_a_rebuild() -> None:
    job = running()
    copy = rebuilt(list(job.collect_events()))
    assert job.assigned_at is not None
    assert copy.assigned_at == job.assigned_at
