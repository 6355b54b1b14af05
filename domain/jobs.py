"""The Job aggregate: every action on a job is one of the events below, nothing else.

Stored events are a contract with the future: an event's name and meaning never
change; new facts get new event classes (or new fields with an upcaster).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, ClassVar
from uuid import UUID, uuid5

import msgspec
from eventsourcing.domain import Aggregate

from domain.errors import InvalidJobRequest, InvalidTransition, JobNotFound, StaleAttempt
from domain.pricing import Estimate, Priority

JOB_ID_PREFIX = "job_"
_JOB_ID = re.compile(r"job_[0-9a-f]{32}")
# Namespace for ids derived from (owner, Idempotency-Key): equal keys, equal ids.
_IDEMPOTENT_JOB_IDS = UUID("6f1c2d1e-8a47-4c57-9a3e-2b1f0c9d7e15")


class JobStatus(StrEnum):
    """Where a job is in its life; see the state machine in docs/architecture.md."""

    PENDING = "pending"
    ASSIGNED = "assigned"
    RUNNING = "running"
    CANCELING = "canceling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    TIMED_OUT = "timed_out"

    @property
    def is_terminal(self) -> bool:
        """True once nothing can happen to the job any more."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.TIMED_OUT}
)
ACTIVE_STATUSES = frozenset(set(JobStatus) - TERMINAL_STATUSES)


class RequeueCause(StrEnum):
    """Why a job went back to pending for another attempt."""

    LEASE_EXPIRED = "lease_expired"
    MINER_DEREGISTERED = "miner_deregistered"
    MINER_DECLINED = "miner_declined"
    MINER_ERROR = "miner_error"
    # The miner handed the attempt back unfinished, for instance while draining.
    MINER_RELEASED = "miner_released"
    # The miner is alive but no longer holds the attempt (it restarted and lost it).
    LOST_BY_MINER = "lost_by_miner"


# The state machine: the statuses in which each command is allowed.
ALLOWED_FROM: Mapping[str, frozenset[JobStatus]] = {
    "assign": frozenset({JobStatus.PENDING}),
    "start": frozenset({JobStatus.ASSIGNED}),
    "report_progress": frozenset({JobStatus.RUNNING}),
    # A completion may overtake its own "started" report, and may race a cancel.
    "complete": frozenset({JobStatus.ASSIGNED, JobStatus.RUNNING, JobStatus.CANCELING}),
    "fail": frozenset({JobStatus.ASSIGNED, JobStatus.RUNNING, JobStatus.CANCELING}),
    "request_cancel": ACTIVE_STATUSES,
    "confirm_canceled": frozenset({JobStatus.CANCELING}),
    "cancel_unconfirmed": frozenset({JobStatus.CANCELING}),
    "time_out": ACTIVE_STATUSES,
    "requeue": frozenset({JobStatus.ASSIGNED, JobStatus.RUNNING}),
}


# The statuses in which a miner holds the job and may report on it.
_HELD_STATUSES = frozenset({JobStatus.ASSIGNED, JobStatus.RUNNING, JobStatus.CANCELING})


def _rejection_key(miner_id: str, attempt: int, kind: str) -> str:
    return f"{miner_id}:{attempt}:{kind}"


def job_id_of(aggregate_id: UUID) -> str:
    """The public id of a job: 'job_' and the aggregate UUID in hex."""
    return JOB_ID_PREFIX + aggregate_id.hex


def aggregate_id_of(job_id: str) -> UUID:
    """The aggregate UUID behind a public job id; malformed ids are simply not found."""
    if not _JOB_ID.fullmatch(job_id):
        raise JobNotFound(f"job {job_id!r} not found", details={"job_id": job_id})
    return UUID(hex=job_id.removeprefix(JOB_ID_PREFIX))


def idempotent_aggregate_id(owner: str, idempotency_key: str) -> UUID:
    """The one aggregate id a (client, Idempotency-Key) pair may ever create."""
    return uuid5(_IDEMPOTENT_JOB_IDS, f"{owner}\x00{idempotency_key}")


class JobSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a client asks to run: the validated content of a submission."""

    model: str
    input_text: str | None
    input_file_id: str | None
    output_destination: str
    output_format: str
    gpu_type: str
    gpu_count: int
    min_vram_gb: int
    priority: Priority
    timeout_seconds: int

    def fingerprint(self) -> str:
        """A digest of the request, to tell a retried submission from a different one."""
        return hashlib.sha256(msgspec.json.encode(self, order="sorted")).hexdigest()


class InputFile(msgspec.Struct, frozen=True, kw_only=True):
    """The facts of an uploaded input a job records, so its record names the exact bytes."""

    size_bytes: int
    sha256: str


class StoredResult(msgspec.Struct, frozen=True, kw_only=True):
    """Result bytes the ledger received for one attempt: where, how many, which digest."""

    attempt: int
    location: str
    size_bytes: int
    sha256: str


class Job(Aggregate):
    """A GPU job, from submission to its one terminal event."""

    class Submitted(Aggregate.Created):
        owner: str
        model: str
        input_text: str | None
        input_file_id: str | None
        output_destination: str
        output_format: str
        gpu_type: str
        gpu_count: int
        min_vram_gb: int
        priority: str
        timeout_seconds: int
        estimated_cost: Decimal
        estimated_time_seconds: int
        idempotency_key: str | None
        request_fingerprint: str
        # The uploaded input's size and digest, copied from its File at submission
        # (added after the first release: text inputs and old events read None).
        input_size_bytes: int | None = None
        input_sha256: str | None = None

    class Event(Aggregate.Event):
        # The status a job is in after this event; None if the event leaves it unchanged.
        resulting_status: ClassVar[JobStatus | None] = None

        def apply(self, aggregate: Any) -> None:
            """Move the job to this event's status and let the event record its details."""
            job: Job = aggregate
            if self.resulting_status is not None:
                job.status = self.resulting_status
            self.record_on(job)

        def record_on(self, job: Job) -> None:
            """Event-specific state changes; most events need none beyond the status."""

    class Assigned(Event):
        resulting_status = JobStatus.ASSIGNED
        miner_id: str
        attempt: int

        def record_on(self, job: Job) -> None:
            job.miner_id = self.miner_id
            job.assigned_at = self.timestamp

    class Started(Event):
        resulting_status = JobStatus.RUNNING
        miner_id: str
        attempt: int

        def record_on(self, job: Job) -> None:
            job.started_at = self.timestamp

    class ProgressReported(Event):
        attempt: int
        progress: int

        def record_on(self, job: Job) -> None:
            job.progress = self.progress

    class Completed(Event):
        resulting_status = JobStatus.COMPLETED
        miner_id: str
        attempt: int
        result: dict[str, Any]
        metrics: dict[str, Any]
        gpu_seconds: Decimal
        cost: Decimal
        # The miner's signed receipt (protocol.Receipt as builtins), checked before this was
        # recorded (added after the first release: unsigned completions and old events read None).
        receipt: dict[str, Any] | None = None

        def record_on(self, job: Job) -> None:
            job.progress = 100
            job.result = self.result
            job.cost = self.cost
            job.finished_at = self.timestamp

    class Failed(Event):
        resulting_status = JobStatus.FAILED
        attempt: int
        error: str
        # A stable machine-readable reason (added after the first release: old events read "").
        error_code: str = ""

        def record_on(self, job: Job) -> None:
            job.error = self.error
            job.error_code = self.error_code or "failed"
            job.finished_at = self.timestamp

    class CancelRequested(Event):
        resulting_status = JobStatus.CANCELING
        reason: str

    class Canceled(Event):
        resulting_status = JobStatus.CANCELED
        attempt: int
        reason: str

        def record_on(self, job: Job) -> None:
            job.finished_at = self.timestamp

    class TimedOut(Event):
        resulting_status = JobStatus.TIMED_OUT
        attempt: int

        def record_on(self, job: Job) -> None:
            job.error = f"timed out after {job.timeout_seconds} seconds"
            job.error_code = "timed_out"
            job.finished_at = self.timestamp

    class Requeued(Event):
        resulting_status = JobStatus.PENDING
        attempt: int
        cause: str
        previous_miner_id: str | None

        def record_on(self, job: Job) -> None:
            job.attempt = self.attempt
            job.miner_id = None
            job.progress = 0
            job.started_at = None
            job.assigned_at = None
            job.stored_result = None

    class ResultStored(Event):
        """The ledger received and stored the result bytes of the attempt (not yet reported)."""

        miner_id: str
        attempt: int
        location: str
        size_bytes: int
        sha256: str
        content_type: str

        def record_on(self, job: Job) -> None:
            job.stored_result = StoredResult(
                attempt=self.attempt,
                location=self.location,
                size_bytes=self.size_bytes,
                sha256=self.sha256,
            )

    class ReportRejected(Event):
        """A miner reported on an attempt it does not hold; recorded, never applied."""

        miner_id: str
        attempt: int
        kind: str
        reason: str

        def record_on(self, job: Job) -> None:
            job.rejected_reports.add(_rejection_key(self.miner_id, self.attempt, self.kind))

    def __init__(
        self,
        *,
        owner: str,
        model: str,
        input_text: str | None,
        input_file_id: str | None,
        output_destination: str,
        output_format: str,
        gpu_type: str,
        gpu_count: int,
        min_vram_gb: int,
        priority: str,
        timeout_seconds: int,
        estimated_cost: Decimal,
        estimated_time_seconds: int,
        idempotency_key: str | None,
        request_fingerprint: str,
        input_size_bytes: int | None = None,
        input_sha256: str | None = None,
    ) -> None:
        self.owner = owner
        self.model = model
        self.input_text = input_text
        self.input_file_id = input_file_id
        self.output_destination = output_destination
        self.output_format = output_format
        self.gpu_type = gpu_type
        self.gpu_count = gpu_count
        self.min_vram_gb = min_vram_gb
        self.priority = Priority(priority)
        self.timeout_seconds = timeout_seconds
        self.estimated_cost = estimated_cost
        self.estimated_time_seconds = estimated_time_seconds
        self.idempotency_key = idempotency_key
        self.request_fingerprint = request_fingerprint
        self.input_size_bytes = input_size_bytes
        self.input_sha256 = input_sha256
        self.status = JobStatus.PENDING
        self.attempt = 1
        self.miner_id: str | None = None
        self.progress = 0
        self.assigned_at: datetime | None = None
        self.started_at: datetime | None = None
        self.finished_at: datetime | None = None
        self.result: dict[str, Any] | None = None
        self.cost: Decimal | None = None
        self.error: str | None = None
        self.error_code: str | None = None
        self.rejected_reports: set[str] = set()
        # What the ledger stored for the current attempt, before the completion names it.
        self.stored_result: StoredResult | None = None

    @classmethod
    def submit(
        cls,
        *,
        aggregate_id: UUID,
        owner: str,
        spec: JobSpec,
        estimate: Estimate,
        idempotency_key: str | None,
        input_file: InputFile | None = None,
    ) -> Job:
        """A new pending job, priced before it exists so the estimate is part of its record."""
        if (spec.input_file_id is None) != (input_file is None):
            raise ValueError("a job takes an uploaded file's facts exactly when it names one")
        return cls._create(
            cls.Submitted,
            id=aggregate_id,
            owner=owner,
            model=spec.model,
            input_text=spec.input_text,
            input_file_id=spec.input_file_id,
            output_destination=spec.output_destination,
            output_format=spec.output_format,
            gpu_type=spec.gpu_type,
            gpu_count=spec.gpu_count,
            min_vram_gb=spec.min_vram_gb,
            priority=spec.priority.value,
            timeout_seconds=spec.timeout_seconds,
            estimated_cost=estimate.cost,
            estimated_time_seconds=estimate.seconds,
            idempotency_key=idempotency_key,
            request_fingerprint=spec.fingerprint(),
            input_size_bytes=input_file.size_bytes if input_file else None,
            input_sha256=input_file.sha256 if input_file else None,
        )

    @property
    def job_id(self) -> str:
        """The public id clients see."""
        return job_id_of(self.id)

    # Commands. Each checks its invariants first; a refused command records nothing.

    def assign(self, miner_id: str) -> None:
        """Hand the current attempt to a miner."""
        self._require("assign")
        self.trigger_event(self.Assigned, miner_id=miner_id, attempt=self.attempt)

    def start(self, *, attempt: int, miner_id: str) -> None:
        """The assigned miner began executing."""
        self._require("start", attempt=attempt)
        if miner_id != self.miner_id:
            raise StaleAttempt(
                f"job {self.job_id} attempt {attempt} belongs to {self.miner_id}, not {miner_id}"
            )
        self.trigger_event(self.Started, miner_id=miner_id, attempt=attempt)

    def report_progress(self, *, attempt: int, progress: int) -> None:
        """Record how far the running attempt has come, in percent."""
        self._require("report_progress", attempt=attempt)
        if not 0 <= progress <= 100:
            raise InvalidJobRequest(
                f"progress must be between 0 and 100, got {progress}", details={"field": "progress"}
            )
        self.trigger_event(self.ProgressReported, attempt=attempt, progress=progress)

    def complete(
        self,
        *,
        attempt: int,
        result: dict[str, Any],
        metrics: dict[str, Any],
        gpu_seconds: Decimal,
        cost: Decimal,
        receipt: dict[str, Any] | None = None,
    ) -> None:
        """The current attempt produced its result; the job is charged `cost`."""
        self._require("complete", attempt=attempt)
        if gpu_seconds < 0 or cost < 0:
            raise InvalidJobRequest("gpu_seconds and cost cannot be negative")
        assert self.miner_id is not None  # every allowed status has a miner
        self.trigger_event(
            self.Completed,
            miner_id=self.miner_id,
            attempt=attempt,
            result=result,
            metrics=metrics,
            gpu_seconds=gpu_seconds,
            cost=cost,
            receipt=receipt,
        )

    def fail(self, *, attempt: int, error: str, error_code: str = "failed") -> None:
        """The current attempt failed for good."""
        self._require("fail", attempt=attempt)
        self.trigger_event(self.Failed, attempt=attempt, error=error, error_code=error_code)

    def request_cancel(self, reason: str = "canceled by client") -> None:
        """Cancel: at once while pending, else ask the miner to stop (status canceling)."""
        self._require("request_cancel")
        if self.status is JobStatus.PENDING:
            self.trigger_event(self.Canceled, attempt=self.attempt, reason=reason)
        elif self.status is not JobStatus.CANCELING:  # a repeated request changes nothing
            self.trigger_event(self.CancelRequested, reason=reason)

    def confirm_canceled(self, *, attempt: int) -> None:
        """The miner confirmed it stopped the canceled attempt."""
        self._require("confirm_canceled", attempt=attempt)
        self.trigger_event(self.Canceled, attempt=attempt, reason="stopped by miner")

    def cancel_unconfirmed(self, reason: str) -> None:
        """Cancel without the miner's confirmation: it stayed silent past the grace period."""
        self._require("cancel_unconfirmed")
        self.trigger_event(self.Canceled, attempt=self.attempt, reason=reason)

    def time_out(self) -> None:
        """The job ran out of its `timeout_seconds`."""
        self._require("time_out")
        self.trigger_event(self.TimedOut, attempt=self.attempt)

    def requeue(self, cause: RequeueCause) -> None:
        """Take the job back from its miner and make it pending again as the next attempt."""
        if cause not in set(RequeueCause):
            raise InvalidJobRequest(f"unknown requeue cause {cause!r}", details={"field": "cause"})
        self._require("requeue")
        self.trigger_event(
            self.Requeued,
            attempt=self.attempt + 1,
            cause=RequeueCause(cause).value,
            previous_miner_id=self.miner_id,
        )

    def give_back(self, cause: RequeueCause, *, max_attempts: int) -> None:
        """The current attempt was lost: requeue it, or fail once `max_attempts` are used up."""
        if self.attempt >= max_attempts:
            self._require("fail")
            self.trigger_event(
                self.Failed,
                attempt=self.attempt,
                error=f"attempt {self.attempt} ended with {RequeueCause(cause).value}; "
                f"gave up after {self.attempt} attempts",
                error_code="attempts_exhausted",
            )
        else:
            self.requeue(cause)

    def store_result(
        self,
        *,
        miner_id: str,
        attempt: int,
        location: str,
        size_bytes: int,
        sha256: str,
        content_type: str,
    ) -> None:
        """Record result bytes the holder of the attempt stored; a later upload replaces them."""
        if not self.holds(miner_id, attempt):
            raise StaleAttempt(
                f"job {self.job_id} has no attempt {attempt} held by {miner_id}",
                details={"job_id": self.job_id, "attempt": attempt},
            )
        self.trigger_event(
            self.ResultStored,
            miner_id=miner_id,
            attempt=attempt,
            location=location,
            size_bytes=size_bytes,
            sha256=sha256,
            content_type=content_type,
        )

    def holds(self, miner_id: str, attempt: int) -> bool:
        """True if `miner_id` holds the job's current attempt: the fencing check for reports."""
        return (
            self.status in _HELD_STATUSES and self.miner_id == miner_id and self.attempt == attempt
        )

    def reject_report(self, *, miner_id: str, attempt: int, kind: str, reason: str) -> None:
        """Record a report from a miner that does not hold the attempt; repeats record nothing."""
        if _rejection_key(miner_id, attempt, kind) in self.rejected_reports:
            return
        self.trigger_event(
            self.ReportRejected, miner_id=miner_id, attempt=attempt, kind=kind, reason=reason
        )

    def _require(self, command: str, *, attempt: int | None = None) -> None:
        if attempt is not None and attempt != self.attempt:
            raise StaleAttempt(
                f"job {self.job_id} is on attempt {self.attempt}, not {attempt}",
                details={"job_id": self.job_id, "attempt": self.attempt, "reported": attempt},
            )
        if self.status not in ALLOWED_FROM[command]:
            raise InvalidTransition(self.job_id, self.status.value, command)
