"""end-to-end: no-op jobs submitted and awaited until `completed` is visible, against Celery.

jobledger: 2,000 `echo` jobs (500 quick) go in through POST /v1/jobs from 32 keep-alive
connections while a poller reads the status view (`GET /v1/jobs?status=completed`,
its `total`); the clock stops when every acknowledged job shows as completed. Local
miners run them. Celery: the same count of no-op tasks sent to a private Redis and
every result received, one worker with the prefork pool at concurrency 2. Rounds
alternate which goes first; each side's figure is the median of its rounds. Afterwards
every acknowledged job's events are read straight from the event table: each must
have been submitted, assigned, started and completed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import msgspec

from tests.bench.celery_baseline import CeleryBaseline, start_celery
from tests.bench.ledger import (
    MINER_GPU_TYPE,
    echo_body,
    incomplete_histories,
    median,
    serve_ledger,
    submissions,
)
from tests.bench.loadgen import Connection, LoadResult, Request, Response, closed_loop
from tests.bench.report import Comparison, Figure
from tests.chaos.lab import Lab
from tests.e2e.conftest import Served

CONCURRENCY = 32
MINERS = 2
MINER_CONCURRENCY = 16
# How often the status view is read while jobs run: the figure's resolution.
POLL_SECONDS = 0.02
WARMUP_JOBS = 50
TARGET = 1.5
STRETCH = 2.5
STATUSES = ("pending", "assigned", "running", "completed", "failed", "canceled", "timed_out")


def run(lab: Lab, quick: bool) -> Comparison:
    if quick:
        return measure(lab, jobs=500, rounds=1)
    return measure(lab, jobs=2000, rounds=3)


@dataclass
class LedgerRound:
    seconds: float  # from the first submission until all acknowledged ones show completed
    submitted: LoadResult
    job_ids: list[str]

    @property
    def rate(self) -> float:
        return self.submitted.ok / self.seconds


def measure(
    lab: Lab,
    *,
    jobs: int,
    rounds: int,
    miners: int = MINERS,
    miner_concurrency: int = MINER_CONCURRENCY,
    concurrency: int = CONCURRENCY,
) -> Comparison:
    """`rounds` of `jobs` for each side, after a small warm-up batch on each."""
    served = serve_ledger(lab)
    for _ in range(miners):
        lab.miner(served, MINER_GPU_TYPE, max_concurrent=miner_concurrency)
    celery = start_celery(lab)
    timeout = 60 + jobs / 20

    def ledger_round(count: int) -> LedgerRound:
        return asyncio.run(
            _ledger_round(served, served.new_key("client"), count, concurrency, timeout)
        )

    # Warm-up: the miners are live and known to the scheduler, pools and imports warm.
    warmup = ledger_round(min(WARMUP_JOBS, jobs))
    celery.run_tasks(min(WARMUP_JOBS, jobs), timeout=timeout)
    ledger_rounds: list[LedgerRound] = []
    celery_seconds: list[float] = []
    for round_number in range(rounds):
        if round_number % 2 == 0:
            ledger_rounds.append(ledger_round(jobs))
            celery_seconds.append(_celery_round(celery, jobs, timeout))
        else:
            celery_seconds.append(_celery_round(celery, jobs, timeout))
            ledger_rounds.append(ledger_round(jobs))

    job_ids = [job_id for r in [warmup, *ledger_rounds] for job_id in r.job_ids]
    incomplete, examples = incomplete_histories(served.database_url, job_ids)
    ledger_rate = median(r.rate for r in ledger_rounds)
    celery_rate = median(jobs / seconds for seconds in celery_seconds)
    ratio = ledger_rate / celery_rate
    errors = sum(r.submitted.error_count for r in ledger_rounds)
    notes = [
        f"jobledger: {miners} miner(s) x max_concurrent {miner_concurrency}; {celery.describe()}",
        f"stretch target >= {STRETCH}: {'met' if ratio >= STRETCH else 'not met'}",
        "jobledger jobs/s per round: " + ", ".join(f"{r.rate:.0f}" for r in ledger_rounds),
        "Celery tasks/s per round: " + ", ".join(f"{jobs / s:.0f}" for s in celery_seconds),
        f"histories checked in jobledger_events for {len(job_ids)} acknowledged jobs "
        "(warm-up included)",
        *[
            f"round {n + 1}: {r.submitted.describe_errors()}"
            for n, r in enumerate(ledger_rounds)
            if r.submitted.errors
        ],
        *[f"incomplete history: {example}" for example in examples],
    ]
    return Comparison(
        name="end-to-end",
        what=(
            f"{jobs} no-op jobs submitted ({concurrency} connections) and awaited until "
            f"completed is visible in the status view, local miners, vs Celery+Redis doing "
            f"{jobs} no-op tasks (1 worker, prefork, concurrency 2); {rounds} alternating "
            "round(s), medians"
        ),
        jobledger=[
            Figure("throughput", ledger_rate, "jobs/s"),
            Figure("all completed after", median(r.seconds for r in ledger_rounds), "s"),
            Figure("submission rate", median(r.submitted.rate for r in ledger_rounds), "req/s"),
            Figure("errors", errors, "requests"),
            Figure("jobs without a complete history", incomplete, "jobs"),
        ],
        baseline=[
            Figure("throughput", celery_rate, "jobs/s"),
            Figure("all completed after", median(celery_seconds), "s"),
        ],
        ratio_name="jobledger/celery jobs/s",
        ratio=ratio,
        target=f">= {TARGET}",
        met=ratio >= TARGET and incomplete == 0 and errors == 0,
        notes=notes,
    )


def _celery_round(celery: CeleryBaseline, jobs: int, timeout: float) -> float:
    return celery.run_tasks(jobs, timeout=timeout)


async def _ledger_round(
    served: Served, api_key: str, jobs: int, concurrency: int, timeout: float
) -> LedgerRound:
    """Submit `jobs` echo jobs and wait until the status view shows all of them completed."""
    job_ids: list[str] = []

    def collect(_: int, response: Response) -> None:
        if response.status == 201:
            job_ids.append(msgspec.json.decode(response.body)["job_id"])

    started = time.perf_counter()
    submitting = asyncio.create_task(
        closed_loop(
            served.url,
            submissions(api_key, echo_body()),
            concurrency=concurrency,
            count=jobs,
            on_response=collect,
        )
    )
    headers = {"X-Api-Key": api_key}
    async with Connection(served.url) as poller:
        while True:
            completed = await _total(poller, "completed", headers)
            if submitting.done() and completed >= submitting.result().ok:
                break
            if time.perf_counter() - started > timeout:
                counts = {s: await _total(poller, s, headers) for s in STATUSES}
                submitting.cancel()
                raise RuntimeError(
                    f"after {timeout:.0f} s not every job is completed: {counts}\n"
                    f"--- serve log ---\n{served.log()[-3000:]}"
                )
            await asyncio.sleep(POLL_SECONDS)
    seconds = time.perf_counter() - started
    return LedgerRound(seconds=seconds, submitted=submitting.result(), job_ids=job_ids)


async def _total(connection: Connection, status: str, headers: dict[str, str]) -> int:
    """How many of this key's jobs the status view shows in `status`."""
    response = await connection.send(
        Request("GET", f"/v1/jobs?status={status}&limit=1", headers=headers)
    )
    if response.status != 200:
        raise RuntimeError(f"GET /v1/jobs?status={status}: {response.status} {response.body!r}")
    return int(msgspec.json.decode(response.body)["total"])
