"""rebuild: events/s of `jobledger projections rebuild` against reading and decoding the same log.

A ledger of N generated jobs (tests/bench/generator.py: 92% completed, 4% failed, 4%
canceled; twenty owners). jobledger: the CLI command in its own process,
timed from start to exit (interpreter start included), which empties the views and
folds the whole log again in one transaction. Baseline: the same log read and decoded
in this process with the event store's own calls (`recorder.select_notifications`, then
`mapper.to_domain_event` for each event), in batches of the size the rebuild reads, and
nothing else: the floor any rebuild sits on. Rounds alternate; medians.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import time

from app.store import JobLedger, postgres_env
from tests.bench.generator import generate
from tests.bench.ledger import median
from tests.bench.report import Comparison, Figure
from tests.chaos.lab import Lab

TARGET = 0.25
# The batch size the rebuild reads the log in (JobLedger.read_whole_log's default).
BATCH_SIZE: int = inspect.signature(JobLedger.read_whole_log).parameters["batch_size"].default
_REBUILT = re.compile(r"rebuilt job views: (\d+) jobs, log position (\d+)")


def run(lab: Lab, quick: bool) -> Comparison:
    if quick:
        return measure(lab, jobs=30_000, rounds=2)
    return measure(lab, jobs=200_000, rounds=3)


def measure(lab: Lab, *, jobs: int, rounds: int) -> Comparison:
    """Generate `jobs` jobs, then `rounds` alternating rebuilds and raw reads of their log."""
    dsn = lab.database()
    generated = generate(dsn, jobs, workdir=lab.directory("generate"))
    events = generated.head
    rebuilds: list[float] = []
    reads: list[float] = []
    for round_number in range(rounds):
        steps = [("rebuild", rebuilds), ("read", reads)]
        for step, seconds in steps if round_number % 2 == 0 else reversed(steps):
            started = time.perf_counter()
            if step == "rebuild":
                _rebuild(lab, dsn, jobs=jobs, head=events)
            else:
                _read_and_decode(dsn, head=events)
            seconds.append(time.perf_counter() - started)
    startup = _cli_startup_seconds(lab, dsn)
    rebuild_rate = events / median(rebuilds)
    read_rate = events / median(reads)
    ratio = rebuild_rate / read_rate
    return Comparison(
        name="rebuild",
        what=(
            f"`jobledger projections rebuild` (CLI process, one transaction) vs reading and "
            f"decoding the same log in-process (recorder.select_notifications + "
            f"mapper.to_domain_event, batches of {BATCH_SIZE}); {generated.jobs:,} jobs, "
            f"{events:,} events; {rounds} alternating rounds, medians"
        ),
        jobledger=[
            Figure("events/s", rebuild_rate, "events/s"),
            Figure("seconds", median(rebuilds), "s"),
        ],
        baseline=[
            Figure("events/s", read_rate, "events/s"),
            Figure("seconds", median(reads), "s"),
        ],
        ratio_name="rebuild/raw read events/s",
        ratio=ratio,
        target=f">= {TARGET}",
        met=ratio >= TARGET,
        notes=[
            "rebuild seconds per round: " + ", ".join(f"{s:.2f}" for s in rebuilds),
            "raw read seconds per round: " + ", ".join(f"{s:.2f}" for s in reads),
            f"starting the CLI without work (`jobledger projections --help`) takes "
            f"{startup:.2f} s of each rebuild",
            f"generator: {generated.describe()}",
        ],
    )


def _cli_env(lab: Lab, dsn: str) -> dict[str, str]:
    home = lab.directory("cli-home")
    return {k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")} | {
        "JOBLEDGER_DATABASE_URL": dsn,
        "JOBLEDGER_HOME": str(home),
    }


def _rebuild(lab: Lab, dsn: str, *, jobs: int, head: int) -> None:
    """Run the CLI's rebuild and check that it says it rebuilt every job up to the head."""
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "projections", "rebuild"],
        env=_cli_env(lab, dsn),
        capture_output=True,
        text=True,
        check=False,
    )
    found = _REBUILT.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(
            f"rebuild exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    rebuilt, position = int(found[1]), int(found[2])
    if (rebuilt, position) != (jobs, head):
        raise RuntimeError(f"rebuild made {rebuilt} views up to {position}: {jobs} up to {head}")


def _read_and_decode(dsn: str, *, head: int) -> None:
    """Read the whole log and decode every event, as the rebuild does, and do nothing else."""
    ledger = JobLedger(postgres_env(dsn))
    try:
        recorder, mapper = ledger.recorder, ledger.mapper
        start, decoded = 1, 0
        while notifications := recorder.select_notifications(start=start, limit=BATCH_SIZE):
            for notification in notifications:
                mapper.to_domain_event(notification)
            decoded += len(notifications)
            start = notifications[-1].id + 1
    finally:
        ledger.close()
    if decoded != head:
        raise RuntimeError(f"read {decoded} events, the log holds {head}")


def _cli_startup_seconds(lab: Lab, dsn: str) -> float:
    """How long the CLI takes to start and exit without work (best of three)."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "app.cli", "projections", "--help"],
            env=_cli_env(lab, dsn),
            capture_output=True,
            check=True,
        )
        times.append(time.perf_counter() - started)
    return min(times)
