"""Item 4: miners killed mid-job, and a miner frozen (SIGSTOP) past its lease.

`miner-killed`: one ledger with 3-second leases and three miners offering gpu "cpu".
Clients submit `sleep` jobs at a steady rate, each with its own Idempotency-Key,
retried until acknowledged. Every 2.5-4 s a miner that holds a running job is killed
with SIGKILL and a newly registered miner started in its place. After the load stops,
every acknowledged job is awaited (bounded). Pass: the bookkeeping (lost = 0,
duplicated = 0, ...); every acknowledged job completed, each with exactly one
JobCompleted; every attempt a killed miner held was requeued away from it (or had
completed just before the kill); at least one job was reassigned after a kill; every
history has at most one terminal event and no version gap.

`miner-frozen`: two miners. Each cycle submits a few `sleep` jobs, waits until they
all run, and freezes one miner (alternately) with SIGSTOP. It stays frozen until every
job it held has been requeued (its lease expired) and completed by the other miner:
longer than the lease and longer than the jobs' sleep, so its executors' work is due
the moment it is resumed with SIGCONT. A plain NATS subscriber (the wiretap) hears
every report it sends then, so late completions are counted from what reached NATS.
The relay sent it a cancel order for each old attempt with the requeue, and on resume
that order races its executors: a miner that reads it first stops and never sends the
completion (counted as suppressed). So every other freeze also slows the control
channel: the wiretap takes the frozen miner's cancel orders off its durable consumer
(unacknowledged) and hands them back (nak) only once the miner has spoken, so a late
completion is certain to be sent there. Pass: every held job was reassigned and
completed by the other miner; at least one late completion was sent, and one for every
attempt whose cancel order was held back; every one sent is recorded as
JobReportRejected (kind "completed", the frozen miner, the old attempt); none was
accepted; every job has exactly one JobCompleted; the resumed miner said its last word
on each old attempt, answered the handed-back orders (canceled), is online again and
still running (and, as the other miner of the next cycle, completes the jobs
reassigned to it).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from app import protocol
from app.protocol import Namespace
from tests.chaos.checker import bookkeeping, job_histories, scan_log
from tests.chaos.lab import Lab, new_prefix
from tests.chaos.load import Submitters, attempts_of, status_counts
from tests.chaos.result import Result
from tests.e2e.conftest import Served
from tests.e2e.dispatch import TERMINAL, Miner

T = TypeVar("T")
GPU = "cpu"
# Leases short enough that a lost miner is noticed within seconds.
LEASES = {"JOBLEDGER_LEASE_SECONDS": "3", "JOBLEDGER_CANCEL_GRACE_SECONDS": "10"}
# A job may meet several kills; attempts running out would be a failure for another reason.
MANY_ATTEMPTS = {"JOBLEDGER_MAX_ATTEMPTS": "50"}
# Bounds on waiting for the ledger; generous, as the machine is shared.
SETTLE_SECONDS = 90.0
REASSIGN_SECONDS = 90.0
LAST_WORD_SECONDS = 30.0

# miner-killed
KILLED_MINERS = 3
KILLED_SLOTS = 2
KILLED_SLEEP = 2.0  # seconds each job sleeps
KILLED_RATE = 1.2  # submissions per second; about 40% of the miners' capacity

# miner-frozen
FROZEN_SLOTS = 4  # per miner: the other one can take all of a cycle's jobs at once
FROZEN_JOBS = 4  # per cycle
FROZEN_SLEEP = 4.0
MIN_CYCLES = 2  # each miner frozen once: the first victim then works for the second
FINAL_WORDS = {"completed", "failed", "canceled", "released"}


def sleep_job(seconds: float) -> Callable[[str], dict[str, Any]]:
    """Bodies of jobs the test miners run: sleep `seconds`, then return a small result."""

    def body(key: str) -> dict[str, Any]:
        return {
            "model": "sleep",
            "input": str(seconds),
            "requirements": {"gpu_type": GPU, "gpu_count": 1},
            "timeout_seconds": 600,
        }

    return body


# ---- reading the ledger ---------------------------------------------------------------


def job_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """A job's full history from the log, through the API (type and data per event)."""
    answer = client.get(f"/v1/jobs/{job_id}/events")
    answer.raise_for_status()
    found: list[dict[str, Any]] = answer.json()["events"]
    return found


def job_rows(client: httpx.Client, status: str | None = None) -> list[dict[str, Any]]:
    """Every job of the client as the list view shows it (all pages)."""
    rows: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100} | ({"status": status} if status else {})
    while True:
        answer = client.get("/v1/jobs", params=params)
        answer.raise_for_status()
        page = answer.json()
        rows += page["jobs"]
        if not page["has_more"]:
            return rows
        params["cursor"] = page["next_cursor"]


def wait_terminal(client: httpx.Client, job_ids: Iterable[str], timeout: float) -> list[str]:
    """Wait until every job is terminal in the views; the ones still unfinished after `timeout`."""
    wanted = set(job_ids)
    deadline = time.monotonic() + timeout
    while True:
        statuses = {row["job_id"]: row["status"] for row in job_rows(client)}
        unfinished = sorted(j for j in wanted if statuses.get(j) not in TERMINAL)
        if not unfinished or time.monotonic() > deadline:
            return unfinished
        time.sleep(0.5)


def miner_status(served: Served, miner_id: str) -> str:
    answer = httpx.get(
        f"{served.url}/v1/miners/{miner_id}",
        headers={"X-Api-Key": served.admin_key},
        timeout=30,
    )
    answer.raise_for_status()
    return str(answer.json()["status"])


def wait_online(served: Served, miners: Iterable[Miner], timeout: float = 60.0) -> bool:
    """True once every miner's heartbeats make it "online" for the scheduler."""
    waiting = list(miners)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        waiting = [m for m in waiting if miner_status(served, m.miner_id) != "online"]
        if waiting:
            time.sleep(0.2)
    return not waiting


def poll(probe: Callable[[], bool], timeout: float, every: float = 0.2) -> bool:
    """Call `probe` until it is true or `timeout` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def completions(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["data"] for e in history if e["type"] == "JobCompleted"]


def requeued_from(history: list[dict[str, Any]], miner_id: str, attempt: int) -> bool:
    """True if the job's `attempt` was taken back from `miner_id` and made the next one."""
    return any(
        e["type"] == "JobRequeued"
        and e["data"]["previous_miner_id"] == miner_id
        and e["data"]["attempt"] == attempt + 1
        for e in history
    )


def completed_by(history: list[dict[str, Any]], miner_id: str, attempt: int) -> bool:
    return any(c["miner_id"] == miner_id and c["attempt"] == attempt for c in completions(history))


# ---- hearing what miners say ----------------------------------------------------------


@dataclass(frozen=True)
class Heard:
    """One report as it crossed NATS."""

    at: float  # monotonic
    job_id: str
    kind: str
    miner_id: str
    attempt: int


class Wiretap:
    """What crosses NATS for one ledger: every report miners send, and cancel orders held back.

    A plain subscriber on every job's reports subject hears what miners actually sent
    (the reports stream is a work queue: applied reports are deleted, so listening while
    they are published is the only way to know). On demand it also pulls from a miner's
    durable control consumer itself, keeping that miner's cancel orders unacknowledged
    until it hands them back with a nak: a control channel that is slow, never lossy.
    """

    def __init__(self, nats_url: str, prefix: str) -> None:
        self._urls = [url.strip() for url in nats_url.split(",") if url.strip()]
        self._namespace = Namespace(prefix)
        self._lock = threading.Lock()
        self._heard: list[Heard] = []
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: NatsClient | None = None
        self._stop: asyncio.Event | None = None
        self._holds: dict[str, ControlHold] = {}
        self._thread = threading.Thread(target=self._run, name="wiretap", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30) or self._failure is not None:
            raise RuntimeError(f"the wiretap could not subscribe: {self._failure!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def heard(self) -> list[Heard]:
        with self._lock:
            return list(self._heard)

    def hold_control(self, miner_id: str) -> None:
        """Start taking `miner_id`'s control orders before it can."""
        self._call(self._start_holding(miner_id))

    def orders_taken(self, miner_id: str) -> list[tuple[str, int]]:
        """The (job, attempt) of each order taken from `miner_id` so far."""
        return self._call(self._orders_taken(miner_id))

    def stop_holding(self, miner_id: str) -> list[tuple[str, int]]:
        """Stop taking its orders (keeping those taken); the (job, attempt) each one names."""
        return self._call(self._stop_holding(miner_id))

    def hand_back(self, miner_id: str) -> None:
        """Release the orders taken from `miner_id` (nak): JetStream redelivers them to it."""
        self._call(self._hand_back(miner_id))

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._listen())
        except BaseException as error:
            self._failure = error
            self._ready.set()

    async def _listen(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._connection = await nats.connect(self._urls, name="chaos-wiretap")
        try:
            await self._connection.subscribe(self._namespace.all_reports(), cb=self._hear)
            await self._connection.flush()  # the subscription is in place at the server
            self._ready.set()
            await self._stop.wait()
        finally:
            await self._connection.close()

    async def _hear(self, message: Msg) -> None:
        job_id = self._namespace.job_of(message.subject) or "?"
        try:
            report = protocol.report_decoder.decode(message.data)
        except msgspec.DecodeError:
            heard = Heard(time.monotonic(), job_id, "undecodable", "?", 0)
        else:
            kind = str(type(report).__struct_config__.tag)
            heard = Heard(time.monotonic(), job_id, kind, report.miner_id, report.attempt)
        with self._lock:
            self._heard.append(heard)

    async def _start_holding(self, miner_id: str) -> None:
        assert self._connection is not None
        # Bound to the miner's own durable consumer: no consumer is created or changed.
        subscription = await self._connection.jetstream().pull_subscribe_bind(
            durable=self._namespace.control_consumer(miner_id),
            stream=self._namespace.stream_name("CONTROL"),
        )
        hold = ControlHold(subscription)
        hold.task = asyncio.create_task(hold.take())
        self._holds[miner_id] = hold

    async def _stop_holding(self, miner_id: str) -> list[tuple[str, int]]:
        hold = self._holds[miner_id]
        hold.stopping.set()
        assert hold.task is not None
        await hold.task  # its last pull ends within a fetch timeout
        return await self._orders_taken(miner_id)

    async def _orders_taken(self, miner_id: str) -> list[tuple[str, int]]:
        orders = [protocol.control_decoder.decode(m.data) for m in self._holds[miner_id].taken]
        return [(order.job_id, order.attempt) for order in orders]

    async def _hand_back(self, miner_id: str) -> None:
        hold = self._holds.pop(miner_id)
        for message in hold.taken:
            await message.nak()
        await hold.subscription.unsubscribe()


@dataclass
class ControlHold:
    """Pull requests on a miner's control consumer made by the wiretap, and what they took."""

    subscription: Any  # JetStreamContext.PullSubscription
    taken: list[Msg] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def take(self) -> None:
        while not self.stopping.is_set():
            try:
                self.taken += await self.subscription.fetch(16, timeout=0.5)
            except TimeoutError:
                continue


# ---- miner-killed ---------------------------------------------------------------------


@dataclass
class Kill:
    victim: str
    held: list[tuple[str, int]]  # (job_id, attempt) the views showed it holding


def held_by_live_miners(client: httpx.Client, live: set[str]) -> dict[str, list[tuple[str, int]]]:
    """The attempts each live miner holds, running ones first, per the views."""
    held: dict[str, list[tuple[str, int]]] = {}
    running: set[str] = set()
    for status in ("running", "assigned"):
        for row in job_rows(client, status):
            if row["miner_id"] in live:
                held.setdefault(row["miner_id"], []).append((row["job_id"], row["attempt"]))
                if status == "running":
                    running.add(row["miner_id"])
    return {miner_id: jobs for miner_id, jobs in held.items() if miner_id in running}


def run_killed(lab: Lab, seconds: float) -> Result:
    result = Result("miner-killed")
    rng = random.Random(4)
    database = lab.database()
    served = lab.serve(database, prefix=new_prefix(), env=LEASES | MANY_ATTEMPTS)
    key = served.new_key("client")
    client = served.client(key)
    miners = [lab.miner(served, GPU, max_concurrent=KILLED_SLOTS) for _ in range(KILLED_MINERS)]
    result.check("miners online at start", wait_online(served, miners))

    submitters = Submitters(
        lambda: [served.url], key, rate=KILLED_RATE, body=sleep_job(KILLED_SLEEP), threads=4
    )
    started = time.monotonic()
    submitters.start()
    kills: list[Kill] = []
    no_victim = 0
    while time.monotonic() - started < seconds:
        time.sleep(rng.uniform(2.5, 4.0))
        holding = held_by_live_miners(client, {m.miner_id for m in miners})
        if not holding:
            no_victim += 1  # nobody runs anything right now; try again at the next turn
            continue
        victim_id = rng.choice(sorted(holding))
        victim = next(m for m in miners if m.miner_id == victim_id)
        victim.kill()  # SIGKILL: no drain, no release, no last report
        kills.append(Kill(victim_id, holding[victim_id]))
        miners.remove(victim)
        miners.append(lab.miner(served, GPU, max_concurrent=KILLED_SLOTS))
    operations = submitters.stop(drain_seconds=30)
    job_ids = sorted({op.job_id for op in operations if op.job_id})
    unfinished = wait_terminal(client, job_ids, SETTLE_SECONDS)
    result.seconds = time.monotonic() - started

    # Every attempt a killed miner held must have been taken back from it.
    finished_before_kill = 0
    stranded: list[tuple[str, str, int]] = []
    for kill in kills:
        for job_id, attempt in kill.held:
            history = job_events(client, job_id)
            if requeued_from(history, kill.victim, attempt):
                continue
            if completed_by(history, kill.victim, attempt):
                finished_before_kill += 1  # its completion was already on its way
                continue
            stranded.append((job_id, kill.victim, attempt))
    scan = scan_log(database)
    answers = status_counts(attempts_of(operations))
    result.figure("kills (SIGKILL)", len(kills))
    result.figure("turns without a miner running a job", no_victim)
    result.figure("attempts held by killed miners", sum(len(k.held) for k in kills))
    result.figure("  of those completed just before the kill", finished_before_kill)
    result.expect_equal("held attempts not requeued after a kill", len(stranded), 0)
    if stranded:
        result.check("stranded attempts (job, miner, attempt)", False, stranded[:5])
    result.expect_equal("answers 500", answers["500"], 0)
    bookkeeping(result, operations, scan)
    reassigned = [j for j in job_ids if "JobRequeued" in scan.types(j)]
    result.figure("jobs reassigned after a kill (attempt >= 2)", len(reassigned))
    result.figure(
        "most attempts of one job",
        max((1 + scan.types(j).count("JobRequeued") for j in job_ids), default=0),
    )
    result.check("some job was reassigned", len(reassigned) > 0, f"{len(reassigned)} jobs")
    result.check("some kill happened", len(kills) > 0, f"kills = {len(kills)}")
    result.expect_equal("acknowledged jobs unfinished", len(unfinished), 0)
    completed = [j for j in job_ids if "JobCompleted" in scan.types(j)]
    result.expect_equal("acknowledged jobs completed", len(completed), len(job_ids))
    not_once = [j for j in job_ids if scan.types(j).count("JobCompleted") != 1]
    result.expect_equal("jobs without exactly one accepted completion", len(not_once), 0)
    if unfinished or not_once:
        sample = {j: scan.types(j) for j in (unfinished + not_once)[:3]}
        result.check("sample of the offending histories", False, sample)
    job_histories(result, scan, job_ids)
    return result


# ---- miner-frozen ---------------------------------------------------------------------


@dataclass
class Freeze:
    """One SIGSTOP ... SIGCONT of a miner and what became of the attempts it held."""

    victim: Miner
    other: Miner
    jobs: list[str]
    # Its cancel orders held back by the wiretap until it has spoken after resuming.
    delayed_orders: bool
    held: list[tuple[str, int]] = field(default_factory=list)
    stopped_at: float = 0.0
    resumed_at: float = 0.0
    # Taken back from it while it was frozen (requeued), as the log showed before SIGCONT.
    reassigned: list[tuple[str, int]] = field(default_factory=list)
    # Completed by it before the freeze took hold (its completion was on its way).
    finished_first: list[tuple[str, int]] = field(default_factory=list)
    # The (job, attempt) of each cancel order held back, and when they were handed back.
    orders_held: list[tuple[str, int]] = field(default_factory=list)
    handed_back_at: float = 0.0


def wait_running(client: httpx.Client, job_ids: list[str], timeout: float) -> list[dict[str, Any]]:
    """The jobs' views once all of them run (or whatever they are after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [client.get(f"/v1/jobs/{job_id}").json() for job_id in job_ids]
        if all(row["status"] == "running" for row in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def freeze_cycle(
    client: httpx.Client,
    served: Served,
    wiretap: Wiretap,
    victim: Miner,
    other: Miner,
    *,
    delay_orders: bool,
) -> Freeze:
    """Freeze `victim` while it runs jobs, until the other miner has finished them; resume it."""
    wait_online(served, [victim, other])
    jobs = [submit_sleep(client, FROZEN_SLEEP) for _ in range(FROZEN_JOBS)]
    rows = wait_running(client, jobs, 60)
    if not any(row["miner_id"] == victim.miner_id for row in rows):
        victim, other = other, victim  # the scheduler gave this cycle's jobs to the other one
    freeze = Freeze(victim=victim, other=other, jobs=jobs, delayed_orders=delay_orders)
    freeze.held = [
        (row["job_id"], row["attempt"])
        for row in rows
        if row["miner_id"] == victim.miner_id and row["status"] in ("assigned", "running")
    ]
    assert victim.process is not None
    os.kill(victim.process.pid, signal.SIGSTOP)
    freeze.stopped_at = time.monotonic()
    try:
        if delay_orders:
            wiretap.hold_control(victim.miner_id)
        # Frozen past its lease, until every job it held has ended elsewhere (or in a bound).
        poll(
            lambda: all(
                client.get(f"/v1/jobs/{job_id}").json()["status"] in TERMINAL
                for job_id, _ in freeze.held
            ),
            REASSIGN_SECONDS,
            every=0.3,
        )
        # Judged before it can speak again: what the ledger did while it was silent.
        for job_id, attempt in freeze.held:
            history = job_events(client, job_id)
            if requeued_from(history, victim.miner_id, attempt):
                freeze.reassigned.append((job_id, attempt))
            elif completed_by(history, victim.miner_id, attempt):
                freeze.finished_first.append((job_id, attempt))
        if delay_orders:
            # The relay sent a cancel order with each requeue; wait until all are held.
            poll(
                lambda: set(freeze.reassigned) <= set(wiretap.orders_taken(victim.miner_id)),
                LAST_WORD_SECONDS,
            )
            freeze.orders_held = wiretap.stop_holding(victim.miner_id)
    finally:
        os.kill(victim.process.pid, signal.SIGCONT)
        freeze.resumed_at = time.monotonic()
    # Its last word on each old attempt: a completion (late) or a cancellation.
    poll(lambda: not silent_on(freeze, wiretap.heard()), LAST_WORD_SECONDS)
    if delay_orders:
        freeze.handed_back_at = time.monotonic()  # before: its answer may come at once
        wiretap.hand_back(victim.miner_id)
        poll(lambda: not unanswered_orders(freeze, wiretap.heard()), LAST_WORD_SECONDS)
    # Every late completion it sent must come to be recorded as rejected.
    poll(lambda: not unrecorded(client, freeze, wiretap.heard()), LAST_WORD_SECONDS, every=0.5)
    return freeze


def unanswered_orders(freeze: Freeze, heard: list[Heard]) -> list[tuple[str, int]]:
    """Held-back cancel orders the miner has not answered (canceled) since they were released."""
    answered = {
        (h.job_id, h.attempt)
        for h in heard
        if h.miner_id == freeze.victim.miner_id
        and h.at >= freeze.handed_back_at
        and h.kind == "canceled"
    }
    return [order for order in freeze.orders_held if order not in answered]


def submit_sleep(client: httpx.Client, seconds: float) -> str:
    answer = client.post("/v1/jobs", json=sleep_job(seconds)(""))
    answer.raise_for_status()
    return str(answer.json()["job_id"])


def said_after_resume(freeze: Freeze, heard: list[Heard]) -> list[Heard]:
    return [
        h
        for h in heard
        if h.miner_id == freeze.victim.miner_id
        and h.at >= freeze.resumed_at
        and (h.job_id, h.attempt) in set(freeze.held)
    ]


def silent_on(freeze: Freeze, heard: list[Heard]) -> list[tuple[str, int]]:
    """Reassigned attempts on which the resumed miner has not yet said its last word."""
    spoken = {
        (h.job_id, h.attempt) for h in said_after_resume(freeze, heard) if h.kind in FINAL_WORDS
    }
    return [held for held in freeze.reassigned if held not in spoken]


def late_completions(freeze: Freeze, heard: list[Heard]) -> set[tuple[str, int]]:
    """Old attempts the resumed miner reported as completed (each counted once)."""
    reassigned = set(freeze.reassigned)
    return {
        (h.job_id, h.attempt)
        for h in said_after_resume(freeze, heard)
        if h.kind == "completed" and (h.job_id, h.attempt) in reassigned
    }


def rejection_recorded(history: list[dict[str, Any]], miner_id: str, attempt: int) -> bool:
    return any(
        e["type"] == "JobReportRejected"
        and e["data"]["miner_id"] == miner_id
        and e["data"]["attempt"] == attempt
        and e["data"]["kind"] == "completed"
        for e in history
    )


def unrecorded(client: httpx.Client, freeze: Freeze, heard: list[Heard]) -> list[str]:
    """Late completions sent but not (yet) recorded as rejected."""
    return [
        job_id
        for job_id, attempt in late_completions(freeze, heard)
        if not rejection_recorded(job_events(client, job_id), freeze.victim.miner_id, attempt)
    ]


def run_frozen(lab: Lab, seconds: float) -> Result:
    result = Result("miner-frozen")
    database = lab.database()
    served = lab.serve(database, prefix=new_prefix(), env=LEASES)
    client = served.client(served.new_key("client"))
    miners = [lab.miner(served, GPU, max_concurrent=FROZEN_SLOTS) for _ in range(2)]
    wiretap = Wiretap(lab.nats_url, served.nats_prefix)
    wiretap.start()
    freezes: list[Freeze] = []
    started = time.monotonic()
    try:
        while len(freezes) < MIN_CYCLES or time.monotonic() - started < seconds:
            victim, other = miners[len(freezes) % 2], miners[(len(freezes) + 1) % 2]
            # Every other freeze (each miner in turn) its cancel orders are held back.
            delay = len(freezes) % 4 in (1, 2)
            freezes.append(freeze_cycle(client, served, wiretap, victim, other, delay_orders=delay))
        back_online = wait_online(served, miners, 30)
    finally:
        wiretap.stop()
    heard = wiretap.heard()
    result.seconds = time.monotonic() - started
    judge_freezes(result, client, freezes, heard)
    result.check("resumed miners online again", back_online)
    exited = [m.miner_id for m in miners if m.process is not None and m.process.poll() is not None]
    result.expect_equal("miner processes that exited", len(exited), 0)
    crashed = [m.miner_id for m in miners if "Traceback" in m.log()]
    result.expect_equal("miner logs with a traceback", len(crashed), 0)
    if exited or crashed:
        result.check("miner log tail", False, (miners[0].log() + miners[1].log())[-2000:])

    jobs = [job_id for freeze in freezes for job_id in freeze.jobs]
    scan = scan_log(database)
    not_once = [j for j in jobs if scan.types(j).count("JobCompleted") != 1]
    result.expect_equal("jobs without exactly one accepted completion", len(not_once), 0)
    if not_once:
        result.check(
            "sample of the offending histories", False, {j: scan.types(j) for j in not_once[:3]}
        )
    job_histories(result, scan, jobs)
    return result


def judge_freezes(
    result: Result, client: httpx.Client, freezes: list[Freeze], heard: list[Heard]
) -> None:
    """The figures and checks of every freeze, from the log and from what NATS carried."""
    # (freeze number, job, old attempt) for every attempt a miner held as it froze.
    held = [(n, job_id, attempt) for n, f in enumerate(freezes) for job_id, attempt in f.held]
    histories = {job_id: job_events(client, job_id) for _, job_id, _ in held}
    victim = {n: f.victim.miner_id for n, f in enumerate(freezes)}
    reassigned = {(n, j, a) for n, f in enumerate(freezes) for j, a in f.reassigned}
    finished_first = {(n, j, a) for n, f in enumerate(freezes) for j, a in f.finished_first}
    stranded = [(j, a) for n, j, a in held if (n, j, a) not in reassigned | finished_first]
    elsewhere = [
        (n, j, a)
        for n, j, a in reassigned
        if [c["miner_id"] for c in completions(histories[j])] == [freezes[n].other.miner_id]
    ]
    sent = {(n, j, a) for n, f in enumerate(freezes) for j, a in late_completions(f, heard)}
    answered = {
        (n, h.job_id, h.attempt)
        for n, f in enumerate(freezes)
        for h in said_after_resume(f, heard)
        if h.kind in FINAL_WORDS
    }
    suppressed = (reassigned & answered) - sent
    silent = [held for f in freezes for held in silent_on(f, heard)]
    recorded = [(n, j, a) for n, j, a in sent if rejection_recorded(histories[j], victim[n], a)]
    accepted_late = [(j, a) for n, j, a in reassigned if completed_by(histories[j], victim[n], a)]
    other_rejections = Counter(
        e["data"]["kind"]
        for n, j, _ in reassigned
        for e in histories[j]
        if e["type"] == "JobReportRejected"
        and e["data"]["miner_id"] == victim[n]
        and e["data"]["kind"] != "completed"
    )
    lengths = [f.resumed_at - f.stopped_at for f in freezes]

    result.figure("freezes (SIGSTOP ... SIGCONT)", len(freezes))
    result.figure("jobs submitted", sum(len(f.jobs) for f in freezes))
    result.figure("freeze length, mean (s)", round(statistics.fmean(lengths), 1))
    result.figure("freeze length, max (s)", round(max(lengths), 1))
    result.figure("jobs held by a miner as it froze", len(held))
    result.figure("  finished before the freeze took hold", len(finished_first))
    result.figure("jobs frozen mid-run and reassigned", len(reassigned))
    result.figure("  of those completed by the other miner", len(elsewhere))
    waiting = {(n, j, a) for n, j, a in reassigned if not freezes[n].delayed_orders}
    result.figure("  cancel orders waiting for it on resume", len(waiting))
    result.figure("    it completed first (late completion sent)", len(sent & waiting))
    result.figure("    it obeyed first (late completion suppressed)", len(suppressed & waiting))
    result.figure("  cancel orders held back until it spoke", len(reassigned - waiting))
    result.figure("    late completion sent", len(sent - waiting))
    result.figure("late completions sent by resumed miners", len(sent))
    result.figure("late completions rejected and recorded", len(recorded))
    result.figure(
        "other late reports rejected and recorded",
        ", ".join(f"{kind} {count}" for kind, count in sorted(other_rejections.items())) or "none",
    )
    result.expect_equal("held jobs neither reassigned nor finished", len(stranded), 0)
    if stranded:
        result.check("stranded (job, attempt)", False, stranded[:5])
    result.check("some job was frozen mid-run", len(reassigned) > 0, f"{len(reassigned)} jobs")
    result.expect_equal(
        "reassigned jobs not completed by the other miner", len(reassigned) - len(elsewhere), 0
    )
    result.expect_equal("old attempts the resumed miner never answered", len(silent), 0)
    result.check("some late completion was sent", len(sent) > 0, f"sent = {len(sent)}")
    # Nothing told those miners to stop, and their work was due: each must have reported it.
    result.expect_equal(
        "held-back attempts without a late completion", len(reassigned - waiting - sent), 0
    )
    orders = [(n, order) for n, f in enumerate(freezes) for order in f.orders_held]
    unanswered = [
        (n, order) for n, f in enumerate(freezes) for order in unanswered_orders(f, heard)
    ]
    result.figure("held-back cancel orders handed back", len(orders))
    result.expect_equal("handed-back cancel orders not answered (canceled)", len(unanswered), 0)
    result.expect_equal("late completions not rejected and recorded", len(sent) - len(recorded), 0)
    result.expect_equal("late completions accepted", len(accepted_late), 0)
