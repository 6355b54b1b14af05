"""Jobs in each status, built through the public commands, for the unit tests."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from uuid import uuid4

from domain.jobs import Job, JobSpec
from domain.miners import Capabilities
from domain.pricing import Estimate, Priority

MINER = "miner_first"
OTHER_MINER = "miner_second"
# A one-slot CPU rig at no charge, for tests that need some registered miner.
RIG = Capabilities(
    gpu_type="cpu",
    gpu_count=1,
    vram_gb=0,
    location="here",
    price_per_hour=Decimal(0),
    max_concurrent=1,
)
RESULT = {"output_uri": "s3://results/job.jsonl", "tokens": 1234}


def submitted() -> Job:
    """A fresh pending job, as a client's submission creates it."""
    spec = JobSpec(
        model="llama-3-8b",
        input_text="hello",
        input_file_id=None,
        output_destination="s3://results/",
        output_format="jsonl",
        gpu_type="v100",
        gpu_count=1,
        min_vram_gb=16,
        priority=Priority.NORMAL,
        timeout_seconds=3600,
    )
    return Job.submit(
        aggregate_id=uuid4(),
        owner="client_a",
        spec=spec,
        estimate=Estimate(cost=Decimal("0.05"), seconds=600),
        idempotency_key=None,
    )


def assigned() -> Job:
    job = submitted()
    job.assign(MINER)
    return job


def running() -> Job:
    job = assigned()
    job.start(attempt=1, miner_id=MINER)
    return job


def canceling() -> Job:
    job = running()
    job.request_cancel()
    return job


def completed() -> Job:
    job = running()
    job.complete(
        attempt=1, result=RESULT, metrics={}, gpu_seconds=Decimal("12.5"), cost=Decimal("0.05")
    )
    return job


def failed() -> Job:
    job = running()
    job.fail(attempt=1, error="CUDA out of memory")
    return job


def canceled() -> Job:
    job = canceling()
    job.confirm_canceled(attempt=1)
    return job


def timed_out() -> Job:
    job = running()
    job.time_out()
    return job


BUILDERS: dict[str, Callable[[], Job]] = {
    "pending": submitted,
    "assigned": assigned,
    "running": running,
    "canceling": canceling,
    "completed": completed,
    "failed": failed,
    "canceled": canceled,
    "timed_out": timed_out,
}
