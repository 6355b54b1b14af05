"""The job read model: one row per job, folded from the event log.

The status, list and history views are queries over these rows. The fold is a
pure function (`fold`), so the same code answers a projector batch, a rebuild
from zero and a read straight from the log before the projector caught up.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec

from domain.jobs import Job, JobStatus, job_id_of
from domain.pricing import RuntimeStats


class JobRow(msgspec.Struct, kw_only=True):
    """Everything the views show about one job, as of `version`."""

    job_id: str
    seq: int
    owner: str
    model: str
    priority: str
    status: str
    progress: int
    attempt: int
    miner_id: str | None
    gpu_type: str
    gpu_count: int
    min_vram_gb: int
    timeout_seconds: int
    output_destination: str
    output_format: str
    estimated_cost: Decimal
    estimated_time_seconds: int
    cost: Decimal | None
    error: str | None
    result: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime
    version: int
    error_code: str | None = None
    # When the current attempt was handed to its miner; its deadline counts from here.
    assigned_at: datetime | None = None
    # When the job entered its current status (a cancel's grace period counts from here).
    status_since: datetime | None = None


class RuntimeSample(msgspec.Struct, frozen=True):
    """One completed run, for the estimate that learns from history."""

    model: str
    gpu_type: str
    seconds: Decimal


def fold(row: JobRow | None, event: Any, seq: int) -> JobRow:
    """The row after `event`; `seq` is the event's position in the log (used for ordering)."""
    if isinstance(event, Job.Submitted):
        return JobRow(
            job_id=job_id_of(event.originator_id),
            seq=seq,
            owner=event.owner,
            model=event.model,
            priority=event.priority,
            status=JobStatus.PENDING.value,
            progress=0,
            attempt=1,
            miner_id=None,
            gpu_type=event.gpu_type,
            gpu_count=event.gpu_count,
            min_vram_gb=event.min_vram_gb,
            timeout_seconds=event.timeout_seconds,
            output_destination=event.output_destination,
            output_format=event.output_format,
            estimated_cost=event.estimated_cost,
            estimated_time_seconds=event.estimated_time_seconds,
            cost=None,
            error=None,
            result=None,
            created_at=event.timestamp,
            started_at=None,
            completed_at=None,
            updated_at=event.timestamp,
            version=event.originator_version,
            status_since=event.timestamp,
        )
    if row is None:
        raise ValueError(f"event {type(event).__qualname__} for a job with no Submitted event")
    changes: dict[str, Any] = {"updated_at": event.timestamp, "version": event.originator_version}
    if isinstance(event, Job.Event) and event.resulting_status is not None:
        changes["status"] = event.resulting_status.value
        if event.resulting_status.value != row.status:
            changes["status_since"] = event.timestamp
    match event:
        case Job.Assigned(miner_id=miner_id, attempt=attempt):
            changes |= {"miner_id": miner_id, "attempt": attempt, "assigned_at": event.timestamp}
        case Job.Started():
            changes["started_at"] = event.timestamp
        case Job.ProgressReported(progress=progress):
            changes["progress"] = progress
        case Job.Completed(result=result, cost=cost):
            changes |= {
                "progress": 100,
                "result": result,
                "cost": cost,
                "completed_at": event.timestamp,
            }
        case Job.Failed(error=error):
            changes |= {
                "error": error,
                "error_code": event.error_code or "failed",
                "completed_at": event.timestamp,
            }
        case Job.Canceled():
            changes["completed_at"] = event.timestamp
        case Job.TimedOut():
            changes |= {
                "error": f"timed out after {row.timeout_seconds} seconds",
                "error_code": "timed_out",
                "completed_at": event.timestamp,
            }
        case Job.Requeued(attempt=attempt):
            changes |= {
                "attempt": attempt,
                "miner_id": None,
                "progress": 0,
                "started_at": None,
                "assigned_at": None,
            }
    return msgspec.structs.replace(row, **changes)


def runtime_sample(before: JobRow, event: Any) -> RuntimeSample | None:
    """What a completion teaches the estimator: its run time from start to finish."""
    if not isinstance(event, Job.Completed) or before.started_at is None:
        return None
    elapsed = event.timestamp - before.started_at
    seconds = elapsed.days * 86400 + elapsed.seconds + Decimal(elapsed.microseconds) / 1_000_000
    return RuntimeSample(before.model, before.gpu_type, max(seconds, Decimal(0)))


def learn(stats: RuntimeStats | None, sample: RuntimeSample) -> RuntimeStats:
    """Fold a sample into the stats for its (model, GPU type)."""
    return (stats or RuntimeStats(0, Decimal(0))).learn(sample.seconds)
