"""jobledger as the benchmarks drive it: served with rate limits off, echo jobs, their events.

Shared by the comparisons that submit jobs (submit, end-to-end, latency): one place
says which body a benchmark job has, how its requests are built for the load
generator, and how a job's durable history is counted straight from the event table.
"""

from __future__ import annotations

import secrets
import statistics
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

from domain.jobs import aggregate_id_of
from tests.bench.loadgen import Request
from tests.chaos.lab import Lab, new_prefix
from tests.e2e.conftest import SEED_JOB, Served

# The GPU type the lab's miners offer without a GPU (tests/e2e/test_dispatch.py runs echo
# jobs on it too).
MINER_GPU_TYPE = "cpu"
# The events every completed job must have, as the event store names their topics.
LIFECYCLE = ("Submitted", "Assigned", "Started", "Completed")


def serve_ledger(lab: Lab, env: dict[str, str] | None = None) -> Served:
    """`jobledger serve` on a fresh database, rate limits off (the issue's conditions)."""
    return lab.serve(
        lab.database(), prefix=new_prefix(), env={"JOBLEDGER_RATE_LIMITS": "off"} | (env or {})
    )


def seed_body(model: str = "echo") -> dict[str, Any]:
    """The client API reference's example body, running `model`."""
    return SEED_JOB | {"model": model}


def echo_body(text: str = "x") -> dict[str, Any]:
    """A no-op job the lab's miners run: echo `text` back."""
    return {
        "model": "echo",
        "input": text,
        "requirements": {"gpu_type": MINER_GPU_TYPE, "gpu_count": 1},
        "timeout_seconds": 600,
    }


def submissions(api_key: str, body: dict[str, Any]) -> Callable[[int], Request]:
    """Requests for the load generator: POST /v1/jobs, each with a fresh Idempotency-Key."""
    prefix = f"bench-{secrets.token_hex(6)}-"
    headers = {"X-Api-Key": api_key}
    encoded = Request.json("POST", "/v1/jobs", body).body

    def request(index: int) -> Request:
        return Request(
            "POST",
            "/v1/jobs",
            encoded,
            headers | {"Content-Type": "application/json", "Idempotency-Key": f"{prefix}{index}"},
            expect=(201,),
        )

    return request


def incomplete_histories(database_url: str, job_ids: Iterable[str]) -> tuple[int, list[str]]:
    """How many of `job_ids` lack one of the lifecycle events in the store, and a few of them.

    Read straight from `jobledger_events`, not through the API or a view: the point is
    that each acknowledged and completed job is durably recorded, step by step.
    """
    wanted = {aggregate_id_of(job_id): job_id for job_id in job_ids}
    found: dict[Any, set[str]] = {aggregate_id: set() for aggregate_id in wanted}
    with psycopg.connect(database_url) as connection:
        rows = connection.execute(
            "SELECT originator_id, topic FROM jobledger_events WHERE originator_id = ANY(%s)",
            (list(wanted),),
        )
        for originator_id, topic in rows:
            found[originator_id].add(str(topic).rpartition(".")[2])
    missing = [
        f"{wanted[aggregate_id]} lacks {', '.join(e for e in LIFECYCLE if e not in kinds)}"
        for aggregate_id, kinds in found.items()
        if not set(LIFECYCLE) <= kinds
    ]
    return len(missing), missing[:3]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))
