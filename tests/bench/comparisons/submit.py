"""submit: jobledger's POST /v1/jobs against a bare Litestar endpoint doing INSERT + COMMIT.

Both are served by one uvicorn process with the same settings and driven by the same
closed loop (32 keep-alive connections, the same body) for the same time; rounds
alternate which goes first, and each side's figures are the medians of its rounds.
jobledger answers 201 only once the submission's event is committed, with an
Idempotency-Key on every request (a fresh one each time) and rate limits off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tests.bench.bare_app import serve_bare
from tests.bench.ledger import median, seed_body, serve_ledger, submissions
from tests.bench.loadgen import LoadResult, Request, closed_loop
from tests.bench.report import Comparison, Figure
from tests.chaos.lab import Lab

CONCURRENCY = 32
TARGET = 1.0


def run(lab: Lab, quick: bool) -> Comparison:
    if quick:
        return measure(lab, seconds=3, rounds=3, warmup_seconds=1)
    return measure(lab, seconds=10, rounds=5, warmup_seconds=3)


def measure(
    lab: Lab,
    *,
    seconds: float,
    rounds: int,
    warmup_seconds: float,
    concurrency: int = CONCURRENCY,
) -> Comparison:
    """`rounds` of `seconds` for each side at `concurrency`, after a warm-up of each."""
    served = serve_ledger(lab)
    body = seed_body("echo")
    ledger_requests = submissions(served.new_key("client"), body)
    bare = serve_bare(lab)
    bare_request = Request.json("POST", "/jobs", body, expect=(201,))

    def drive(url: str, requests: Callable[[int], Request], length: float) -> LoadResult:
        return asyncio.run(closed_loop(url, requests, concurrency=concurrency, seconds=length))

    sides: dict[str, tuple[str, Callable[[int], Request]]] = {
        "jobledger": (served.url, ledger_requests),
        "bare": (bare.url, lambda _: bare_request),
    }
    for url, requests in sides.values():
        drive(url, requests, warmup_seconds)
    results: dict[str, list[LoadResult]] = {"jobledger": [], "bare": []}
    for round_number in range(rounds):
        order = list(sides) if round_number % 2 == 0 else list(reversed(sides))
        for side in order:
            url, requests = sides[side]
            results[side].append(drive(url, requests, seconds))

    jobledger, baseline = (_figures(results[side]) for side in ("jobledger", "bare"))
    ratio = median(r.rate for r in results["jobledger"]) / median(r.rate for r in results["bare"])
    notes = [
        f"{side}: req/s per round " + ", ".join(f"{r.rate:.0f}" for r in results[side])
        for side in results
    ]
    notes += [
        f"{side} round {n + 1}: {r.describe_errors()}"
        for side in results
        for n, r in enumerate(results[side])
        if r.errors
    ]
    return Comparison(
        name="submit",
        what=(
            f"POST /v1/jobs (durable, Idempotency-Key on, rate limits off) vs a bare Litestar "
            f"POST doing one psycopg INSERT+COMMIT; one uvicorn process each, {concurrency} "
            f"keep-alive connections, {rounds} alternating rounds of {seconds:g} s, medians"
        ),
        jobledger=jobledger,
        baseline=baseline,
        ratio_name="jobledger/bare req/s",
        ratio=ratio,
        target=f">= {TARGET}",
        met=ratio >= TARGET,
        notes=notes,
    )


def _figures(results: list[LoadResult]) -> list[Figure]:
    return [
        Figure("throughput", median(r.rate for r in results), "req/s"),
        Figure("p50", median(r.p50_ms for r in results), "ms"),
        Figure("p99", median(r.p99_ms for r in results), "ms"),
        Figure("errors", sum(r.error_count for r in results), "requests"),
    ]
