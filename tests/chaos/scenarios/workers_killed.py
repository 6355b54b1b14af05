"""Item 6: the projector and the relay killed over and over while they catch up on a long log.

A long log is written straight through the ledger (whole job histories, many per
transaction: completed, failed, canceled, requeued, timed out, with rejected reports),
then `jobledger serve` is started on it: its projector and relay begin at position 0,
the relay publishing to JetStream under the scenario's own prefix. The process is
SIGKILLed again and again while they catch up, and started again each time, while a
writer keeps appending job histories. Each kill waits until a worker is seen passing a
position drawn at random in the log, then comes up to a batch's time later, so it lands
anywhere in a batch (the projector's transaction, the relay's publishes before it
advances). After the last kill a process runs until both positions reach the head.

Pass: projection position == relay position == the log's head; the views equal a
rebuild from the log; the events stream holds every (aggregate, version) of the log
exactly once (none missing, none doubled: `Nats-Msg-Id` deduplication drops what a
killed relay publishes again), each with its log position, in log order; the
assignments and control streams hold one order per event that implies one; at least
MIN_KILLS kills came mid-catch-up, and some kill came after the relay had published
events but before it recorded its position (so deduplication had work to do); no
restart stalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from uuid import uuid4

import nats
import psycopg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError as StreamNotFound

from app.protocol import Namespace
from app.relay import RELAY_NAME, aggregate_id_of_event
from app.store import JobLedger, postgres_env
from domain.jobs import Job, JobSpec, RequeueCause
from domain.miners import Capabilities, Miner
from domain.pricing import Priority, estimate
from projections import tables
from tests.chaos.checker import job_histories, scan_log, tracking_at_head, views_equal_a_rebuild
from tests.chaos.lab import Lab, new_prefix
from tests.chaos.result import Result

# `seconds` sizes the run: the log starts with LOG_EVENTS_PER_SECOND events per second
# (enough that both workers are still catching up when each kill lands: the relay,
# pipelined, publishes several thousand a second here), and the process is killed once
# per SECONDS_PER_KILL, at least MIN_KILLS + 1 times.
LOG_EVENTS_PER_SECOND = 4000
SECONDS_PER_KILL = 12
MIN_KILLS = 3
JOBS_PER_TRANSACTION = 100
MINERS = 4
# While killing, a writer appends this many job histories per second, a few per commit.
APPENDED_JOBS_PER_SECOND = 10
# The workers by figure name, and the names their tracking records go by.
WORKERS = {"projection": tables.PROJECTION_NAME, "relay": RELAY_NAME}
# About how long one batch takes each worker here: the kill comes up to that long after
# the worker is seen passing its point, so it lands anywhere in a batch.
BATCH_SECONDS = {"projection": 0.1, "relay": 0.1}
POLL_SECONDS = 0.05
# Limits that only a stuck ledger reaches; the scenario decides by positions, not by time.
PROGRESS_LIMIT_SECONDS = 120.0
CATCH_UP_LIMIT_SECONDS = 600.0
OWNER = "chaos"


def job_spec(rng: random.Random) -> JobSpec:
    return JobSpec(
        model=rng.choice(["echo", "sleep", "gpt2"]),
        input_text="chaos",
        input_file_id=None,
        output_destination="local",
        output_format="text",
        gpu_type="cpu",
        gpu_count=1,
        min_vram_gb=0,
        priority=rng.choice(list(Priority)),
        timeout_seconds=600,
    )


def complete(job: Job, rng: random.Random) -> None:
    seconds = Decimal(rng.randint(1, 900)) / 10
    assert job.miner_id is not None
    job.start(attempt=job.attempt, miner_id=job.miner_id)
    for step in sorted(rng.sample(range(5, 100, 5), rng.randint(0, 4))):
        job.report_progress(attempt=job.attempt, progress=step)
    job.complete(
        attempt=job.attempt,
        result={"location": "local:results/x", "sha256": "0" * 64, "size_bytes": 2},
        metrics={"gpu_seconds": str(seconds)},
        gpu_seconds=seconds,
        cost=(seconds * Decimal("0.01") / 3600).quantize(Decimal("0.000001")),
    )


def job_history(ledger: JobLedger, miners: list[str], rng: random.Random) -> Job:
    """A new job taken all the way to a terminal event, along one of several paths."""
    spec = job_spec(rng)
    job = Job.submit(
        aggregate_id=uuid4(),
        owner=OWNER,
        spec=spec,
        estimate=estimate(
            ledger.rates,
            gpu_type=spec.gpu_type,
            gpu_count=spec.gpu_count,
            priority=spec.priority,
            timeout_seconds=spec.timeout_seconds,
        ),
        idempotency_key=None,
    )
    path = rng.random()
    if path < 0.05:
        job.request_cancel()  # canceled while pending
        return job
    first, second = rng.sample(miners, 2)
    job.assign(first)
    if path < 0.65:
        complete(job, rng)
    elif path < 0.75:
        job.start(attempt=1, miner_id=first)
        job.fail(attempt=1, error="out of memory", error_code="oom")
    elif path < 0.82:
        job.start(attempt=1, miner_id=first)
        job.request_cancel()
        job.confirm_canceled(attempt=1)
    elif path < 0.87:
        job.start(attempt=1, miner_id=first)
        job.time_out()
    else:
        job.reject_report(miner_id=second, attempt=1, kind="started", reason="not the holder")
        job.requeue(rng.choice([RequeueCause.LEASE_EXPIRED, RequeueCause.LOST_BY_MINER]))
        job.assign(second)
        complete(job, rng)
    return job


def register_miners(ledger: JobLedger) -> list[str]:
    miners = [
        Miner.register(
            f"chaos-{n}",
            Capabilities(
                gpu_type="cpu",
                gpu_count=1,
                vram_gb=0,
                location="lab",
                price_per_hour=Decimal("0.01"),
                max_concurrent=4,
            ),
        )
        for n in range(MINERS)
    ]
    ledger.save(*miners)
    return [miner.miner_id for miner in miners]


def write_log(ledger: JobLedger, miners: list[str], events: int, rng: random.Random) -> int:
    """Append whole job histories, JOBS_PER_TRANSACTION per commit, until `events` are written."""
    written = 0
    while written < events:
        jobs = [job_history(ledger, miners, rng) for _ in range(JOBS_PER_TRANSACTION)]
        written += len(ledger.save(*jobs))
    return written


class Appender:
    """A thread appending job histories (a few per commit) while the processes are killed."""

    def __init__(self, ledger: JobLedger, miners: list[str], rng: random.Random) -> None:
        self.jobs = 0
        self.errors: list[str] = []
        self._ledger = ledger
        self._miners = miners
        self._rng = rng
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._append, name="appender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _append(self) -> None:
        per_commit = 4
        while not self._stop.wait(per_commit / APPENDED_JOBS_PER_SECOND):
            jobs = [job_history(self._ledger, self._miners, self._rng) for _ in range(per_commit)]
            try:
                self._ledger.save(*jobs)
            except Exception as error:  # reported as a failed check, not lost in the thread
                self.errors.append(f"{type(error).__name__}: {error}")
                return
            self.jobs += per_commit


class Positions:
    """The projection's and the relay's tracked positions, read on one open connection."""

    def __init__(self, dsn: str) -> None:
        self._conn = psycopg.connect(dsn, autocommit=True)

    def now(self) -> dict[str, int]:
        """Each worker's position; 0 before it first recorded one."""
        try:
            rows = self._conn.execute(
                "SELECT projection, position FROM jobledger_projection_tracking "
                "WHERE projection IN (%s, %s)",
                (tables.PROJECTION_NAME, RELAY_NAME),
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            rows = []  # the first process has not created its tables yet
        at = dict.fromkeys(WORKERS.values(), 0) | {name: int(position) for name, position in rows}
        return {worker: at[name] for worker, name in WORKERS.items()}

    def close(self) -> None:
        self._conn.close()


@dataclass
class Expected:
    """What the relay must have published for the log, read from the log itself."""

    head: int = 0
    events: dict[tuple[str, int], int] = field(default_factory=dict)  # → log position
    assignments: int = 0
    controls: int = 0


def expected_messages(dsn: str) -> Expected:
    """Every event's (aggregate, version) and position, and the orders events imply.

    An order goes with each `JobAssigned` (the assignment), and a cancel order with each
    cancel request or timeout of a held job, each requeue, and each rejected `started` or
    `progress` report (app/relay.py).
    """
    ledger = JobLedger(postgres_env(dsn))
    expected = Expected()
    held_by: dict[str, str | None] = {}
    try:
        for batch in ledger.read_whole_log():
            for position, event in batch:
                expected.head = position
                aggregate = aggregate_id_of_event(event)
                expected.events[(aggregate, event.originator_version)] = position
                match event:
                    case Job.Assigned(miner_id=miner_id):
                        expected.assignments += 1
                        held_by[aggregate] = miner_id
                    case Job.CancelRequested() | Job.TimedOut():
                        expected.controls += held_by.get(aggregate) is not None
                    case Job.Requeued(previous_miner_id=previous):
                        expected.controls += previous is not None
                        held_by[aggregate] = None
                    case Job.ReportRejected(kind=kind):
                        expected.controls += kind in ("started", "progress")
    finally:
        ledger.close()
    return expected


@dataclass
class Published:
    """What the streams of one prefix hold."""

    events: list[tuple[str, int, int]]  # (aggregate, version, position) in stream order
    assignments: int
    controls: int


def read_streams(nats_url: str, namespace: Namespace) -> Published:
    """Every message of the events stream, and the message counts of the order streams."""

    async def read() -> Published:
        connection = await nats.connect(nats_url)
        try:
            js = connection.jetstream()
            stream = namespace.stream_name("EVENTS")
            total = (await js.stream_info(stream)).state.messages
            subscription = await js.pull_subscribe(
                namespace.events_subject(">"),
                stream=stream,
                config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
            )
            events: list[tuple[str, int, int]] = []
            while len(events) < total:
                for message in await subscription.fetch(2000, timeout=10):
                    body = json.loads(message.data)
                    events.append((body["aggregate_id"], body["version"], body["position"]))
            await subscription.unsubscribe()
            counts = [
                (await js.stream_info(namespace.stream_name(what))).state.messages
                for what in ("ASSIGNMENTS", "CONTROL")
            ]
            return Published(events, *counts)
        finally:
            await connection.close()

    return asyncio.run(read())


def delete_streams(nats_url: str, namespace: Namespace) -> None:
    """Leave the NATS server as found: the scenario's streams are only for its checks."""

    async def delete() -> None:
        connection = await nats.connect(nats_url)
        try:
            js = connection.jetstream()
            for spec in namespace.streams():
                with contextlib.suppress(StreamNotFound):  # never created: nothing to delete
                    await js.delete_stream(spec.name)
        finally:
            await connection.close()

    asyncio.run(delete())


def check_published(result: Result, expected: Expected, published: Published) -> None:
    """Each logged event in the stream exactly once, with its position, in log order."""
    seen = Counter((aggregate, version) for aggregate, version, _ in published.events)
    missing = [key for key in expected.events if key not in seen]
    duplicated = [key for key, count in seen.items() if count > 1]
    unknown = [key for key in seen if key not in expected.events]
    misplaced = [
        (aggregate, version)
        for aggregate, version, position in published.events
        if expected.events.get((aggregate, version), position) != position
    ]
    stream_positions = [position for _, _, position in published.events]
    out_of_order = sum(b <= a for a, b in itertools.pairwise(stream_positions))
    result.figure("events stream messages", len(published.events))
    result.expect_equal("events missing from the stream", len(missing), 0)
    result.expect_equal("events duplicated in the stream", len(duplicated), 0)
    result.expect_equal("stream messages of no logged event", len(unknown), 0)
    result.expect_equal("stream messages with another position", len(misplaced), 0)
    result.expect_equal("stream messages out of log order", out_of_order, 0)
    result.expect_equal("assignment orders", published.assignments, expected.assignments)
    result.expect_equal("cancel orders", published.controls, expected.controls)
    if missing or duplicated or unknown or misplaced:
        sample = {
            "missing": missing[:3],
            "duplicated": duplicated[:3],
            "unknown": unknown[:3],
            "misplaced": misplaced[:3],
        }
        result.check("sample of the offending messages", False, sample)


def last_published(nats_url: str, namespace: Namespace) -> int:
    """The log position of the newest message in the events stream (0 if none yet)."""

    async def read() -> int:
        connection = await nats.connect(nats_url)
        try:
            js = connection.jetstream()
            stream = namespace.stream_name("EVENTS")
            try:
                last = (await js.stream_info(stream)).state.last_seq
            except StreamNotFound:
                return 0  # the first relay has not created its streams yet
            if not last:
                return 0
            message = await js.get_msg(stream, seq=last)
            return int(json.loads(message.data or b"{}")["position"])
        finally:
            await connection.close()

    return asyncio.run(read())


@dataclass(frozen=True)
class Kill:
    """One SIGKILL: the worker whose progress it waited for, and where everything stood."""

    worker: str
    point: int  # the position that worker had to pass in this life
    head: int
    at: dict[str, int]  # both workers' positions right after the kill
    published: int  # the position of the newest message in the events stream then

    @property
    def in_flight(self) -> int:
        """Events in the stream that the relay had not yet recorded: it publishes them again."""
        return max(0, self.published - self.at["relay"])

    @property
    def mid_catch_up(self) -> bool:
        return self.at[self.worker] < self.head


def kill_count(seconds: float) -> int:
    return max(MIN_KILLS + 1, round(seconds / SECONDS_PER_KILL))


def kill_plan(head: int, kills: int, rng: random.Random) -> list[tuple[str, int]]:
    """Positions at random in the log for a worker to pass before each kill, in order.

    The projector is several times faster than the relay: a quarter of the kills wait
    for it, at points in the first half of the log (it is still catching up when it is
    seen passing one), the others for the relay, anywhere in the log.
    """
    projector_kills = max(1, kills // 4)
    projector_points = sorted(rng.sample(range(1, head // 2), projector_kills))
    relay_points = sorted(rng.sample(range(1, head), kills - projector_kills))
    return [("projection", p) for p in projector_points] + [("relay", p) for p in relay_points]


def kill_after_progress(
    lab: Lab,
    database: str,
    namespace: Namespace,
    positions: Positions,
    ledger: JobLedger,
    worker: str,
    point: int,
    rng: random.Random,
) -> Kill | str:
    """Start a process, wait until `worker` passes `point` (and moved at all), SIGKILL it.

    The kill comes a random fraction of a second after the passing is seen, so it lands
    at any moment of the next batches. Returns why not, if the worker stopped moving.
    """
    before = positions.now()[worker]
    served = lab.serve(database, prefix=namespace.prefix, wait_healthy=False)
    deadline = time.monotonic() + PROGRESS_LIMIT_SECONDS
    while positions.now()[worker] < max(point, before + 1):
        if served.process.poll() is not None:
            return f"the process exited by itself: {served.log()[-2000:]}"
        if time.monotonic() > deadline:
            served.process.kill()
            return f"the {worker} did not pass {point} from {before} in {PROGRESS_LIMIT_SECONDS} s"
        time.sleep(POLL_SECONDS)
    time.sleep(rng.uniform(0.0, BATCH_SECONDS[worker]))
    served.process.kill()  # SIGKILL: the projector and relay die wherever they are
    served.process.wait()
    return Kill(
        worker, point, ledger.head(), positions.now(), last_published(lab.nats_url, namespace)
    )


def catch_up(positions: Positions, head: int) -> float:
    """Seconds until both workers reach `head` (bounded by CATCH_UP_LIMIT_SECONDS)."""
    started = time.monotonic()
    while min(positions.now().values()) < head:
        if time.monotonic() - started > CATCH_UP_LIMIT_SECONDS:
            break
        time.sleep(POLL_SECONDS)
    return time.monotonic() - started


def run(lab: Lab, seconds: float) -> Result:
    result = Result("workers-killed")
    rng = random.Random(6)
    database = lab.database()
    namespace = Namespace(new_prefix())
    ledger = JobLedger(postgres_env(database))
    positions = Positions(database)
    kills: list[Kill] = []
    stalls: list[str] = []
    try:
        began = time.monotonic()
        miners = register_miners(ledger)
        written = write_log(ledger, miners, int(LOG_EVENTS_PER_SECOND * seconds), rng)
        result.figure("events written before the first start", written)
        result.figure("seconds to write them", time.monotonic() - began)

        appender = Appender(ledger, miners, random.Random(7))
        appender.start()
        starts = 1  # the last one, below
        for worker, point in kill_plan(written, kill_count(seconds), rng):
            starts += 1
            outcome = kill_after_progress(
                lab, database, namespace, positions, ledger, worker, point, rng
            )
            if isinstance(outcome, str):
                stalls.append(outcome)
                break
            kills.append(outcome)
        appender.stop()
        head = ledger.head()

        served = lab.serve(database, prefix=namespace.prefix, wait_healthy=False)
        caught_up = catch_up(positions, head)
        served.stop()
    finally:
        positions.close()
        ledger.close()

    result.figure("jobs appended while killing", appender.jobs)
    result.expect_equal("append errors", len(appender.errors), 0)
    result.figure("events in the log", head)
    result.figure("kills (SIGKILL)", len(kills))
    result.figure("processes started", starts)
    for worker in WORKERS:
        at = [kill.at[worker] for kill in kills]
        result.figure(f"{worker} positions at the kills", " ".join(map(str, at)) or "-")
        result.figure(
            f"kills waiting for the {worker}, mid-catch-up",
            sum(kill.worker == worker and kill.mid_catch_up for kill in kills),
        )
    result.figure("seconds to catch up after the last start", caught_up)
    in_flight = [kill.in_flight for kill in kills]
    result.figure("events published past the relay's position at the kills", sum(in_flight))
    result.check(
        "some kill cut the relay between publishing and recording its position",
        any(in_flight),
        f"published past the relay's position, per kill: {in_flight}",
    )
    result.expect_equal("restarts that made no progress", len(stalls), 0)
    if stalls:
        result.check("why a restart made no progress", False, stalls[0])
    mid_catch_up = sum(kill.mid_catch_up for kill in kills)
    result.check(
        f"at least {MIN_KILLS} kills mid-catch-up",
        mid_catch_up >= MIN_KILLS,
        f"kills (worker, positions, head): {[(k.worker, k.at, k.head) for k in kills]}",
    )

    scan = scan_log(database)
    tracking_at_head(result, database, scan.head)
    job_histories(result, scan)
    views_equal_a_rebuild(result, database)
    expected = expected_messages(database)
    try:
        published = read_streams(lab.nats_url, namespace)
    finally:
        delete_streams(lab.nats_url, namespace)
    check_published(result, expected, published)
    result.seconds = time.monotonic() - began
    return result
