"""dispatch: from a submission's commit to its miner receiving the assignment, at half load.

One `jobledger serve` (rate limits off) and one miner: the real agent (`MinerAgent`, echo
executor, heartbeats, pull consumer, signed completions) in its own process, with one
hook that notes the wall-clock time each assignment reaches it (`_accept`) and when
JetStream stored it. First the maximum submission rate is measured while that miner
works (closed loop, 32 connections, POST /v1/jobs of echo jobs); after the backlog
drains, an open-loop submitter sends at half that rate for a fixed time.

Commit time: the JobSubmitted event's timestamp (the status view's `created_at`), taken
just before the submission's transaction commits, so "received - created_at" counts the
commit itself too: an upper bound. The client's 201 comes after the commit, so
"received - 201 received" is a lower bound. Both are reported, with where the time goes:
scheduler (created_at to the JobAssigned timestamp), relay (JobAssigned to stored in the
assignments stream) and pull (stored to received). Clocks: one machine, one wall clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg

from app import protocol
from app.miner.agent import AgentConfig, MinerAgent
from app.miner.executors import ExecutorRegistry
from domain.jobs import JobStatus
from tests.bench.ledger import MINER_GPU_TYPE, echo_body, serve_ledger, submissions
from tests.bench.loadgen import Connection, LoadResult, Request, closed_loop, percentile
from tests.bench.report import Comparison, Figure
from tests.chaos.lab import Lab
from tests.e2e.conftest import Served
from tests.e2e.dispatch import register_miner

PROBE_CONCURRENCY = 32
# Slots of the one miner: enough that capacity never holds a job back at this load.
MINER_SLOTS = 1024
# Connections the open-loop submitter may have in flight at once.
OPEN_LOOP_CONNECTIONS = 64
DRAIN_SECONDS = 120.0
# A submission sent this much after it was due makes the load less than open-loop.
LATE_SECONDS = 0.010
_TERMINAL = [status.value for status in JobStatus if status.is_terminal]


def run(lab: Lab, quick: bool) -> Comparison:
    if quick:
        return measure(lab, probe_seconds=3, seconds=8)
    return measure(lab, probe_seconds=8, seconds=30)


@dataclass(frozen=True)
class Sent:
    """One open-loop submission: its job, and when its 201 came (wall clock)."""

    job_id: str
    answered: float


def measure(lab: Lab, *, probe_seconds: float, seconds: float) -> Comparison:
    """Probe the maximum submission rate, then submit at half of it for `seconds`."""
    served = serve_ledger(lab)
    miner_id, miner_key = register_miner(served, MINER_GPU_TYPE, max_concurrent=MINER_SLOTS)
    received_file = lab.directory("dispatch-miner") / "received.jsonl"
    miner = _start_miner(lab, served, miner_key, received_file)
    try:
        _wait_online(served, miner_id, miner)
        key = served.new_key("client")
        probe = asyncio.run(
            closed_loop(
                served.url,
                submissions(key, echo_body()),
                concurrency=PROBE_CONCURRENCY,
                seconds=probe_seconds,
            )
        )
        drained = _wait_all_finished(served, DRAIN_SECONDS)
        rate = probe.rate / 2
        # Fresh Idempotency-Keys: the probe's would replay its jobs instead of submitting.
        requests = submissions(key, echo_body())
        sent, late = asyncio.run(_open_loop(served.url, requests, rate=rate, seconds=seconds))
        finished = _wait_all_finished(served, DRAIN_SECONDS)
    finally:
        _stop_miner(miner)
    received = _read_received(received_file, miner_log=received_file.parent / "miner.log")
    created = _created_at(served.database_url, [s.job_id for s in sent])
    return _comparison(probe, rate, seconds, sent, late, received, created, drained, finished)


def _comparison(
    probe: LoadResult,
    rate: float,
    seconds: float,
    sent: list[Sent],
    late: int,
    received: dict[str, dict[str, float]],
    created: dict[str, float],
    drained: float,
    finished: float,
) -> Comparison:
    missing = [s.job_id for s in sent if s.job_id not in received]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(sent)} submitted jobs never reached the miner, "
            f"e.g. {missing[:3]}"
        )
    upper = sorted((received[s.job_id]["received"] - created[s.job_id]) * 1000 for s in sent)
    lower = sorted((received[s.job_id]["received"] - s.answered) * 1000 for s in sent)
    steps = {
        "scheduler": sorted(
            (received[s.job_id]["assigned_at"] - created[s.job_id]) * 1000 for s in sent
        ),
        "relay": sorted(
            (received[s.job_id]["stored"] - received[s.job_id]["assigned_at"]) * 1000 for s in sent
        ),
        "pull": sorted(
            (received[s.job_id]["received"] - received[s.job_id]["stored"]) * 1000 for s in sent
        ),
    }
    figures = [
        Figure("p50", percentile(upper, 0.50), "ms"),
        Figure("p99", percentile(upper, 0.99), "ms"),
        Figure("p50 from 201", percentile(lower, 0.50), "ms"),
        Figure("p99 from 201", percentile(lower, 0.99), "ms"),
        Figure("submit rate", len(sent) / seconds, "jobs/s"),
        Figure("max submit rate", probe.rate, "jobs/s"),
    ]
    return Comparison(
        name="dispatch",
        what=(
            f"commit of POST /v1/jobs (JobSubmitted timestamp) to the miner agent receiving "
            f"the assignment; {len(sent):,} echo jobs submitted open-loop at {rate:.0f}/s "
            f"(half the {probe.rate:.0f}/s measured with {PROBE_CONCURRENCY} connections) for "
            f"{seconds:g} s; 1 miner (real agent, {MINER_SLOTS} slots) completing each job"
        ),
        jobledger=figures,
        baseline=[],
        ratio_name="none (no baseline)",
        ratio=None,
        target="",
        met=None,
        notes=[
            "p50/p99 count from the JobSubmitted timestamp, taken just before the commit (an "
            "upper bound); 'from 201' counts from the client's answer, after the commit "
            "(a lower bound)",
            "where the time goes (p50 / p99 ms): "
            + "; ".join(
                f"{step} {percentile(values, 0.5):.1f} / {percentile(values, 0.99):.1f}"
                for step, values in steps.items()
            )
            + " (scheduler: created_at to JobAssigned; relay: JobAssigned to stored in the "
            "assignments stream; pull: stored to the agent taking it)",
            f"open loop: {late} of {len(sent)} submissions sent more than "
            f"{LATE_SECONDS * 1000:g} ms after they were due (no free connection, or the "
            "loop was busy)",
            f"probe: {probe.ok} submissions in {probe.seconds:.1f} s, p50 "
            f"{probe.p50_ms:.1f} ms, p99 {probe.p99_ms:.1f} ms; the miner finished that "
            f"backlog {drained:.1f} s after the probe, and the measured jobs {finished:.1f} s "
            "after the last was sent",
            *([probe.describe_errors()] if probe.errors else []),
        ],
    )


async def _open_loop(
    url: str, requests: Callable[[int], Request], *, rate: float, seconds: float
) -> tuple[list[Sent], int]:
    """Send `rate` submissions a second for `seconds`, each when due, whatever came back."""
    connections: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(OPEN_LOOP_CONNECTIONS):
        connection = Connection(url)
        await connection.open()
        connections.put_nowait(connection)
    sent: list[Sent] = []
    errors: list[str] = []
    late = 0

    async def submit(index: int, due: float) -> None:
        nonlocal late
        connection = await connections.get()
        if time.perf_counter() - due > LATE_SECONDS:
            late += 1
        try:
            response = await connection.send(requests(index))
            answered = time.time()
        finally:
            connections.put_nowait(connection)
        if response.status != 201:
            errors.append(f"{response.status}: {response.body[:200]!r}")
            return
        job_id = msgspec.json.decode(response.body)["job_id"]
        sent.append(Sent(job_id=job_id, answered=answered))

    start = time.perf_counter() + 0.1
    tasks = []
    for index in range(round(rate * seconds)):
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(submit(index, due)))
    await asyncio.gather(*tasks)
    while not connections.empty():
        await connections.get_nowait().close()
    if errors:
        raise RuntimeError(f"{len(errors)} submissions failed, e.g. {errors[:3]}")
    return sent, late


def _wait_online(served: Served, miner_id: str, miner: subprocess.Popen[bytes]) -> None:
    """Until the ledger counts the miner online (its heartbeats arrive)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if miner.poll() is not None:
            raise RuntimeError(f"the bench miner exited with {miner.returncode}")
        answer = httpx.get(
            f"{served.url}/v1/miners/{miner_id}",
            headers={"X-Api-Key": served.admin_key},
            timeout=10,
        )
        if answer.status_code == 200 and answer.json().get("status") == "online":
            return
        time.sleep(0.2)
    raise RuntimeError(f"miner {miner_id} not online after 60 s")


def _wait_all_finished(served: Served, timeout: float) -> float:
    """Until no job is left unfinished; returns how long that took."""
    started = time.monotonic()
    with psycopg.connect(served.database_url, autocommit=True) as conn:
        while True:
            found = conn.execute(
                "SELECT count(*) FROM jobledger_job_views WHERE status <> ALL(%s)", (_TERMINAL,)
            ).fetchone()
            if found is not None and found[0] == 0:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise RuntimeError(
                    f"{found[0] if found else '?'} jobs unfinished after {timeout} s"
                )
            time.sleep(0.1)


def _created_at(database_url: str, job_ids: list[str]) -> dict[str, float]:
    """Each job's JobSubmitted timestamp (the view's created_at), as a Unix time."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT job_id, created_at FROM jobledger_job_views WHERE job_id = ANY(%s)",
            (job_ids,),
        ).fetchall()
    return {job_id: created.timestamp() for job_id, created in rows}


def _read_received(path: Path, *, miner_log: Path) -> dict[str, dict[str, float]]:
    """The miner's notes: the first receipt of each job's first attempt."""
    if not path.exists():
        log = miner_log.read_text(errors="replace")[-3000:] if miner_log.exists() else ""
        raise RuntimeError(f"the bench miner wrote no notes; its log ends:\n{log}")
    received: dict[str, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        note = json.loads(line)
        if note["attempt"] == 1 and note["job_id"] not in received:
            received[note["job_id"]] = note
    return received


# ---- the bench miner (its own process) -----------------------------------------------


def _start_miner(
    lab: Lab, served: Served, key: str, received_file: Path
) -> subprocess.Popen[bytes]:
    home = received_file.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")}
    env["JOBLEDGER_MINER_KEY"] = key  # as `jobledger miner` takes it: not on the command line
    command = [
        sys.executable,
        "-m",
        "tests.bench.comparisons.dispatch",
        "--api",
        served.url,
        "--nats",
        lab.nats_url,
        "--prefix",
        served.nats_prefix,
        "--work-dir",
        str(home / "work"),
        "--out",
        str(received_file),
    ]
    with (home / "miner.log").open("wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop_miner(miner: subprocess.Popen[bytes]) -> None:
    """SIGTERM (it drains and writes its notes), SIGKILL if it does not exit."""
    if miner.poll() is None:
        miner.send_signal(signal.SIGTERM)
        try:
            miner.wait(30)
        except subprocess.TimeoutExpired:
            miner.kill()
            miner.wait()


class TimedAgent(MinerAgent):
    """The real agent, noting when each assignment reaches it and when JetStream stored it.

    `_accept` is where the agent takes each assignment its pull returned; everything else
    (registration, heartbeats, execution, signed reports, drain) is the agent's own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.notes: list[dict[str, Any]] = []

    async def _accept(self, message: Any) -> None:
        received = time.time()
        assignment = protocol.assignment_decoder.decode(message.data)
        self.notes.append(
            {
                "job_id": assignment.job_id,
                "attempt": assignment.attempt,
                "received": received,
                "assigned_at": assignment.assigned_at.timestamp(),
                "stored": message.metadata.timestamp.timestamp(),
            }
        )
        await super()._accept(message)


def _miner_main(argv: list[str]) -> int:
    """Run the timed agent until SIGTERM, then write its notes as JSON lines."""
    parser = argparse.ArgumentParser(prog="tests.bench.comparisons.dispatch")
    for flag in ("--api", "--nats", "--prefix", "--work-dir", "--out"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    config = AgentConfig(
        api_url=args.api,
        nats_urls=[args.nats],
        key=os.environ["JOBLEDGER_MINER_KEY"],
        prefix=args.prefix,
        gpu_type=MINER_GPU_TYPE,
        heartbeat_seconds=0.5,
        drain_seconds=5.0,
        work_dir=Path(args.work_dir),
    )
    agent = TimedAgent(config, ExecutorRegistry.from_entry_points(), None, [])

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    try:
        asyncio.run(main())
    finally:
        with open(args.out, "w") as out:
            for note in agent.notes:
                out.write(json.dumps(note) + "\n")
    print(f"{datetime.now(UTC).isoformat()} wrote {len(agent.notes)} notes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_miner_main(sys.argv[1:]))
