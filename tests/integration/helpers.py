"""Builders shared by the integration tests."""

from __future__ import annotations

from decimal import Decimal

from app.store import JobLedger
from domain.jobs import Job, JobSpec, aggregate_id_of
from domain.pricing import Priority


def spec(**changes: object) -> JobSpec:
    """The seed's job, with `changes` applied."""
    fields: dict[str, object] = {
        "model": "gpt2",
        "input_text": "hello",
        "input_file_id": None,
        "output_destination": "local",
        "output_format": "json",
        "gpu_type": "v100",
        "gpu_count": 1,
        "min_vram_gb": 16,
        "priority": Priority.NORMAL,
        "timeout_seconds": 3600,
    }
    return JobSpec(**(fields | changes))  # type: ignore[arg-type]


def run_to_completion(ledger: JobLedger, job_id: str, miner_id: str = "miner_test") -> None:
    """Drive a job through assignment, start and completion, as the dispatch side will."""
    job: Job = ledger.repository.get(aggregate_id_of(job_id))
    job.assign(miner_id)
    job.start(attempt=job.attempt, miner_id=miner_id)
    job.report_progress(attempt=job.attempt, progress=50)
    job.complete(
        attempt=job.attempt,
        result={"location": "local:results/x", "sha256": "0" * 64, "size_bytes": 2},
        metrics={"gpu_seconds": "1.5"},
        gpu_seconds=Decimal("1.5"),
        cost=Decimal("0.05"),
    )
    ledger.save(job)
