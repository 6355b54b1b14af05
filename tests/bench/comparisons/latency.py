"""latency: one job at a time, submit until `completed` is visible, against a Celery round trip.

jobledger: POST /v1/jobs of one `echo` job, then GET /v1/jobs/{id} every 2 ms on the same
keep-alive connection until it says `completed`; one local miner runs it. Celery: one
no-op task sent and its result received (`send_task`, then `get`) on the same worker setup
as end-to-end. Samples alternate in blocks between the two; p50 and p99 of each.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from tests.bench.celery_baseline import CeleryBaseline, start_celery
from tests.bench.ledger import MINER_GPU_TYPE, echo_body, serve_ledger, submissions
from tests.bench.loadgen import Connection, Request, percentile
from tests.bench.report import Comparison, Figure
from tests.chaos.lab import Lab

POLL_SECONDS = 0.002
# Samples of one side taken in a row before the other side's turn.
BLOCK = 10
WARMUP = 5
JOB_TIMEOUT_SECONDS = 30.0
TARGET = 10.0
TERMINAL = {"completed", "failed", "canceled", "timed_out"}


def run(lab: Lab, quick: bool) -> Comparison:
    return measure(lab, rounds=30 if quick else 200)


def measure(lab: Lab, *, rounds: int) -> Comparison:
    """`rounds` single-job round trips on each side, after a few unmeasured ones."""
    served = serve_ledger(lab)
    lab.miner(served, MINER_GPU_TYPE, max_concurrent=1)
    celery = start_celery(lab)
    ledger, baseline = asyncio.run(_sample(served.url, served.new_key("client"), celery, rounds))
    ledger.sort()
    baseline.sort()
    ratio = percentile(ledger, 0.5) / percentile(baseline, 0.5)
    return Comparison(
        name="latency",
        what=(
            f"one job at a time, {rounds} rounds: POST /v1/jobs then GET /v1/jobs/{{id}} every "
            f"{POLL_SECONDS * 1000:g} ms until completed (1 local miner) vs a Celery+Redis "
            "single-task round trip (send_task + get)"
        ),
        jobledger=_figures(ledger),
        baseline=_figures(baseline),
        ratio_name="jobledger/celery p50",
        ratio=ratio,
        target=f"<= {TARGET:g}",
        met=ratio <= TARGET,
        notes=[f"jobledger: 1 miner, max_concurrent 1; {celery.describe()}"],
    )


def _figures(seconds: list[float]) -> list[Figure]:
    return [
        Figure("p50", percentile(seconds, 0.5) * 1000, "ms"),
        Figure("p99", percentile(seconds, 0.99) * 1000, "ms"),
        Figure("max", seconds[-1] * 1000, "ms"),
        Figure("samples", len(seconds), "jobs"),
    ]


async def _sample(
    url: str, api_key: str, celery: CeleryBaseline, rounds: int
) -> tuple[list[float], list[float]]:
    """Alternate blocks of jobledger jobs and Celery tasks; the seconds each took."""
    requests = submissions(api_key, echo_body())
    headers = {"X-Api-Key": api_key}
    ledger: list[float] = []
    baseline: list[float] = []
    async with Connection(url) as connection:
        for index in range(WARMUP):
            await _one_job(connection, requests(index), headers)
            await asyncio.to_thread(celery.round_trip)
        index = WARMUP
        while len(ledger) < rounds:
            for _ in range(min(BLOCK, rounds - len(ledger))):
                ledger.append(await _one_job(connection, requests(index), headers))
                index += 1
            for _ in range(min(BLOCK, rounds - len(baseline))):
                baseline.append(await asyncio.to_thread(celery.round_trip))
    return ledger, baseline


async def _one_job(connection: Connection, submit: Request, headers: dict[str, str]) -> float:
    """Submit one job and poll its status until it is completed; seconds taken."""
    started = time.perf_counter()
    answer = await connection.send(submit)
    if answer.status != 201:
        raise RuntimeError(f"POST /v1/jobs: {answer.status} {answer.body!r}")
    job_id = msgspec.json.decode(answer.body)["job_id"]
    poll = Request("GET", f"/v1/jobs/{job_id}", headers=headers)
    while True:
        response = await connection.send(poll)
        if response.status != 200:
            raise RuntimeError(f"GET /v1/jobs/{job_id}: {response.status} {response.body!r}")
        status = msgspec.json.decode(response.body)["status"]
        if status == "completed":
            return time.perf_counter() - started
        if status in TERMINAL:
            raise RuntimeError(f"{job_id} ended {status}: {response.body!r}")
        if time.perf_counter() - started > JOB_TIMEOUT_SECONDS:
            raise RuntimeError(f"{job_id} not completed after {JOB_TIMEOUT_SECONDS:g} s: {status}")
        await asyncio.sleep(POLL_SECONDS)
