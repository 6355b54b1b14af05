"""scale: status and list reads on a ledger of 1,000,000 jobs against one of 10,000 jobs.

Two ledgers are generated (tests/bench/generator.py) with the same history mix (92%
completed, 4% failed, 4% canceled), the same current queue (the last 100 jobs, pending)
and the same shares: the client the benchmark reads as owns 10% of the jobs, nineteen
others share the rest. Each is served by its own `jobledger serve` (rate limits off)
with nothing else to do: views, audit chain and relay are at the head. The reads, on one
keep-alive connection per ledger, one request at a time: `GET /v1/jobs/{id}` of random
jobs of that client, and the first page (20) of its jobs filtered by status, `completed`
(most of its jobs) and `failed` (a few percent). Requests alternate between the two
ledgers one by one, so that the machine's hiccups fall on both alike. Each figure is the
median over rounds of that round's p50 or p99. The API process's resident memory is read
from /proc after the reads.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from projections.queries import JobQueries
from tests.bench.generator import Generated, create_client_key, generate
from tests.bench.ledger import median
from tests.bench.loadgen import Connection, Request, percentile
from tests.bench.report import Comparison, Figure
from tests.chaos.lab import Lab, new_prefix
from tests.e2e.conftest import Served

TARGET_P99_RATIO = 1.5
TARGET_RSS_MB = 300.0
# Jobs waiting right now, the same in both ledgers: the queue is not part of the history.
BACKLOG = 100
# The reads measured: a name, and the request for the i-th one given the client's job ids.
KINDS: dict[str, Callable[[list[str], int], str]] = {
    "get": lambda ids, index: f"/v1/jobs/{ids[index % len(ids)]}",
    "list completed": lambda ids, index: "/v1/jobs?status=completed&limit=20",
    "list failed": lambda ids, index: "/v1/jobs?status=failed&limit=20",
}


def run(lab: Lab, quick: bool) -> Comparison:
    if quick:
        return measure(lab, big=100_000, small=10_000, requests=1000, rounds=2)
    return measure(lab, big=1_000_000, small=10_000, requests=2000, rounds=3)


def measure(
    lab: Lab,
    *,
    big: int,
    small: int,
    requests: int,
    rounds: int,
    warmup: int = 200,
    backlog: int = BACKLOG,
) -> Comparison:
    """Generate both ledgers, serve them, then `rounds` of `requests` reads of each kind."""
    ledgers: dict[str, Generated] = {}
    for side, jobs in (("big", big), ("small", small)):
        print(f"  generating the {side} ledger: {jobs:,} jobs", flush=True)
        ledgers[side] = generate(
            lab.database(), jobs, workdir=lab.directory(f"generate-{side}"), backlog=backlog
        )
    served: dict[str, Served] = {}
    keys: dict[str, str] = {}
    for side, generated in ledgers.items():
        keys[side] = create_client_key(generated.database_url, generated.owner)
        served[side] = lab.serve(
            generated.database_url, prefix=new_prefix(), env={"JOBLEDGER_RATE_LIMITS": "off"}
        )
    ids = {side: _shuffled(generated.owner_job_ids) for side, generated in ledgers.items()}
    asyncio.run(_interleaved(served, keys, ids, warmup))  # unmeasured: connections, caches
    per_round = [asyncio.run(_interleaved(served, keys, ids, requests)) for _ in range(rounds)]
    memory = {side: _memory_mb(served[side]) for side in served}
    queries = {side: asyncio.run(_query_ms(g)) for side, g in ledgers.items()}

    def figure(side: str, kind: str, fraction: float) -> float:
        return median(percentile(latencies[side][kind], fraction) for latencies in per_round)

    def figures(side: str) -> list[Figure]:
        return [
            *(
                Figure(f"{kind} {name}", figure(side, kind, fraction), "ms")
                for kind in KINDS
                for name, fraction in (("p50", 0.50), ("p99", 0.99))
            ),
            Figure("API RSS", memory[side]["VmRSS"], "MB"),
        ]

    ratios = {kind: figure("big", kind, 0.99) / figure("small", kind, 0.99) for kind in KINDS}
    round_ratios = {
        kind: [
            percentile(latencies["big"][kind], 0.99) / percentile(latencies["small"][kind], 0.99)
            for latencies in per_round
        ]
        for kind in KINDS
    }
    worst = max(ratios, key=lambda kind: ratios[kind])
    rss = memory["big"]["VmRSS"]
    met = ratios[worst] <= TARGET_P99_RATIO and rss < TARGET_RSS_MB
    big_name, small_name = _size(big), _size(small)
    return Comparison(
        name="scale",
        what=(
            f"GET /v1/jobs/{{id}} and the first page of ?status=completed / ?status=failed "
            f"(limit 20) as one client owning 10% of the jobs, one request at a time, at "
            f"{big:,} jobs (jobledger column) vs {small:,} jobs (baseline column); "
            f"{rounds} rounds of {requests} requests per read and size, alternating between "
            "the sizes request by request; medians over rounds"
        ),
        jobledger=figures("big"),
        baseline=figures("small"),
        ratio_name=f"p99 {big_name}/{small_name} (worst read: {worst})",
        ratio=ratios[worst],
        target=f"<= {TARGET_P99_RATIO} and API RSS < {TARGET_RSS_MB:.0f} MB at {big_name}",
        met=met,
        notes=[
            "p99 ratio per read (per round): "
            + "; ".join(
                f"{kind} {ratios[kind]:.2f} ({', '.join(f'{r:.2f}' for r in round_ratios[kind])})"
                for kind in KINDS
            ),
            f"API process resident memory at {big_name}: {rss:.0f} MB "
            f"(peak {memory['big']['VmHWM']:.0f} MB); at {small_name}: "
            f"{memory['small']['VmRSS']:.0f} MB (target < {TARGET_RSS_MB:.0f} MB at {big_name})",
            *(
                f"in-process JobQueries at {_size(ledgers[side].jobs)} (median of 50, ms): "
                + ", ".join(f"{name} {ms:.2f}" for name, ms in queries[side].items())
                for side in ledgers
            ),
            *(
                f"{side} ledger: the client owns {g.owner_jobs:,} of {g.jobs:,} jobs; "
                f"{g.describe()}"
                for side, g in ledgers.items()
            ),
        ],
    )


async def _interleaved(
    served: dict[str, Served], keys: dict[str, str], ids: dict[str, list[str]], count: int
) -> dict[str, dict[str, list[float]]]:
    """`count` reads of each kind on each ledger, alternating request by request, in ms.

    On a shared 2-core machine a p99 is made of hiccups (another process, a checkpoint);
    interleaving single requests spreads them evenly over both ledgers, where rounds of
    one ledger then the other let a hiccup land on one side only.
    """
    connections = {side: Connection(served[side].url) for side in served}
    latencies: dict[str, dict[str, list[float]]] = {
        side: {kind: [] for kind in KINDS} for side in served
    }
    sides = list(served)
    try:
        for kind, path in KINDS.items():
            for index in range(count):
                for side in sides if index % 2 == 0 else reversed(sides):
                    request = Request(
                        "GET", path(ids[side], index), headers={"X-Api-Key": keys[side]}
                    )
                    started = time.perf_counter()
                    response = await connections[side].send(request)
                    elapsed = time.perf_counter() - started
                    if response.status != 200:
                        raise RuntimeError(
                            f"{kind} on the {side} ledger answered {response.status}: "
                            f"{response.body[:300]!r}"
                        )
                    latencies[side][kind].append(elapsed * 1000)
    finally:
        for connection in connections.values():
            await connection.close()
    for by_kind in latencies.values():
        for samples in by_kind.values():
            samples.sort()
    return latencies


def _shuffled(ids: list[str]) -> list[str]:
    if not ids:
        raise RuntimeError("the generated ledger has no jobs of the benchmark's client")
    chosen = list(ids)
    random.Random(11).shuffle(chosen)
    return chosen


def _memory_mb(served: Served) -> dict[str, float]:
    """VmRSS and VmHWM of the served process: `jobledger serve` runs the API in it."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{served.process.pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024  # kB
    return fields


async def _query_ms(generated: Generated) -> dict[str, float]:
    """The queries behind the reads, timed in-process: where the time goes without HTTP."""
    timings: dict[str, float] = {}
    async with AsyncConnectionPool(generated.database_url, min_size=1, max_size=1) as pool:
        queries = JobQueries(pool)
        probes: dict[str, Callable[[int], Any]] = {
            "get": lambda i: queries.get(generated.owner_job_ids[i % len(generated.owner_job_ids)]),
            "page completed": lambda i: queries.page(
                owner=generated.owner, status="completed", limit=20, before_seq=None
            ),
            "page failed": lambda i: queries.page(
                owner=generated.owner, status="failed", limit=20, before_seq=None
            ),
        }
        for name, probe in probes.items():
            samples = []
            for index in range(50):
                started = time.perf_counter()
                await probe(index)
                samples.append((time.perf_counter() - started) * 1000)
            timings[name] = median(samples)
    return timings


def _size(jobs: int) -> str:
    """1000000 -> '1M', 10000 -> '10k'."""
    if jobs >= 1_000_000 and jobs % 1_000_000 == 0:
        return f"{jobs // 1_000_000}M"
    if jobs >= 1000 and jobs % 1000 == 0:
        return f"{jobs // 1000}k"
    return f"{jobs:,}"
