"""Item 3: NATS restarted, and a JetStream cluster node killed, while miners run jobs.

`nats-restarted`: one ledger process and two miners on a private nats-server. Clients
submit short `sleep` jobs at a steady rate (retrying with their keys), and NATS is
stopped (SIGTERM) and started again on the same port and store: once in the short run
(an outage longer than the lease), several times in the full run (outages shorter and
longer than the lease). `nats-cluster-node-killed`: the same load on a 3-node JetStream
cluster (streams with 3 replicas; the ledger and the miners know all three URLs), and
one node SIGKILLed mid-run: the leader of the assignments stream; in the full run it is
started again and then another node is killed.

After the load stops the scenario waits (bounded) until every acknowledged job is
terminal. Meanwhile a sampler reads the `assigned` jobs every half second and records
how long each attempt stayed continuously `assigned`, not counting the fault windows
(NATS down, or the cluster without a leader for the ledger's streams): while the ledger
cannot hear its miners their silence means nothing, and the scheduler only starts a
lease once its connection is back (`hearing_since` in app/scheduler.py).

Pass: lost = 0, duplicated = 0 (the clients' bookkeeping); every acknowledged job
completed (every assignment was delivered after recovery); at most one terminal event
per job and no gap in versions; no attempt requeued (no miner lost anything, so a
requeue would be an attempt the fault cost); no attempt assigned for longer than
lease + grace outside the fault windows; a completion within 30 s of each recovery.
On the cluster, also: every protocol stream and consumer still has 3 replicas at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import nats

from app.bus import NATS_DOWN
from app.protocol import Namespace
from tests.chaos.checker import bookkeeping, job_histories, scan_log
from tests.chaos.lab import Lab, new_prefix
from tests.chaos.load import Operation, Submitters
from tests.chaos.nats_cluster import NatsCluster
from tests.chaos.result import Result
from tests.e2e.conftest import Served

# A short lease, so that outages both shorter and longer than it fit in a run.
LEASE_SECONDS = 4.0
# Beyond the lease, an attempt may stay assigned after a fault window while the ledger
# and the miners reconnect (nats-py retries every second), the relay waits out its retry
# pause (its Backoff grows to 5 s over repeated outages), the miner pulls (every second),
# and its `started` report reaches the views; an undelivered one while its miner's
# heartbeats (every 0.5 s) are flushed (every 1 s) and a scheduler round (0.5 s) requeues
# it; plus the sampler's half-second resolution. A job really stuck stays assigned until
# the run ends (the settling alone allows SETTLE_SECONDS), far past this bound.
GRACE_SECONDS = 8.0
RATE = 5.0  # submissions per second
MINERS = 2
SLOTS = 3  # jobs each miner runs at once
SAMPLE_SECONDS = 0.5
# After the load stops, how long every acknowledged job gets to become terminal.
SETTLE_SECONDS = 90.0
RECOVERY_LIMIT_SECONDS = 30.0
# Outages of the full nats-restarted run, in turn (the lease is 4 s), each after UP_SECONDS.
OUTAGES = (2.0, 7.0, 1.0, 10.0, 3.0, 6.0)
UP_SECONDS = 8.0
TERMINAL = {"completed", "failed", "canceled", "timed_out"}
UNFINISHED = ("pending", "assigned", "running", "canceling")
LEDGER_ENV = {"JOBLEDGER_LEASE_SECONDS": f"{LEASE_SECONDS:g}"}


def sleep_job(key: str) -> dict[str, Any]:
    """A job the test miners run: sleep 0.1-0.5 s (picked from the key, so reproducible)."""
    seconds = 0.1 + (int(key[-2:], 16) % 5) / 10
    return {
        "model": "sleep",
        "input": f"{seconds:.1f}",
        "requirements": {"gpu_type": "cpu", "gpu_count": 1},
        "timeout_seconds": 600,
    }


@dataclass
class Fault:
    """One fault window: from the fault until NATS served the ledger's streams again."""

    what: str
    began: float  # monotonic
    ended: float = float("inf")
    ended_at: datetime | None = None  # the same instant as `ended`, on the wall clock

    def end(self) -> None:
        self.ended = time.monotonic()
        self.ended_at = datetime.now(UTC)

    @property
    def seconds(self) -> float:
        return self.ended - self.began


@dataclass
class Seen:
    """When the sampler first and last saw one attempt `assigned`."""

    first: float
    last: float


@dataclass
class AssignedWatch:
    """A thread listing the `assigned` jobs every SAMPLE_SECONDS, per (job, attempt)."""

    url: str
    api_key: str
    seen: dict[tuple[str, int], Seen] = field(default_factory=dict)
    samples: int = 0
    failed_samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="assigned-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _watch(self) -> None:
        headers = {"X-Api-Key": self.api_key}
        with httpx.Client(base_url=self.url, headers=headers, timeout=10) as http:
            while not self._stop.wait(SAMPLE_SECONDS):
                try:
                    rows = list(_pages(http, {"status": "assigned"}))
                except (httpx.HTTPError, ValueError, KeyError):
                    self.failed_samples += 1
                    continue
                now = time.monotonic()
                self.samples += 1
                for row in rows:
                    key = (str(row["job_id"]), int(row["attempt"]))
                    if key in self.seen:
                        self.seen[key].last = now
                    else:
                        self.seen[key] = Seen(now, now)

    def durations(self, faults: list[Fault]) -> dict[tuple[str, int], float]:
        """How long each attempt stayed assigned, not counting the fault windows."""
        return {
            key: (seen.last - seen.first)
            - sum(
                max(0.0, min(seen.last, fault.ended) - max(seen.first, fault.began))
                for fault in faults
            )
            for key, seen in self.seen.items()
        }


def _pages(http: httpx.Client, params: dict[str, Any]) -> Any:
    """Every job row of the list view (newest first), page by page."""
    cursor: str | None = None
    while True:
        paging = {"limit": 100} | ({"cursor": cursor} if cursor else {})
        answer = http.get("/v1/jobs", params=params | paging)
        answer.raise_for_status()
        page = answer.json()
        yield from page["jobs"]
        cursor = page.get("next_cursor")
        if not page["has_more"]:
            return


def _unfinished(http: httpx.Client) -> int | None:
    """How many of the client's jobs are not terminal yet (None: the API did not answer)."""
    total = 0
    for status in UNFINISHED:
        try:
            answer = http.get("/v1/jobs", params={"status": status, "limit": 1})
        except httpx.HTTPError:
            return None
        if answer.status_code != 200:
            return None
        total += int(answer.json()["total"])
    return total


@dataclass
class Rig:
    """A ledger, its miners and the clients' load, with the faults injected so far."""

    result: Result
    database: str
    served: Served
    submitters: Submitters
    watch: AssignedWatch
    http: httpx.Client
    logs: Callable[[], str]
    faults: list[Fault] = field(default_factory=list)


def start_rig(
    lab: Lab, result: Result, nats_url: str, env: dict[str, str] | None = None
) -> Rig | None:
    """Ledger, miners and load, running until a first job completed (None: none did)."""
    database = lab.database()
    served = lab.serve(
        database, prefix=new_prefix(), nats_url=nats_url, env=LEDGER_ENV | (env or {})
    )
    miners = [
        lab.miner(served, "cpu", nats_url=nats_url, max_concurrent=SLOTS) for _ in range(MINERS)
    ]
    key = served.new_key("client")
    http = served.client(key)

    def logs() -> str:
        tails = [f"--- serve\n{served.log()[-6000:]}"]
        tails += [f"--- miner {m.miner_id}\n{m.log()[-3000:]}" for m in miners]
        return "\n".join(tails)

    submitters = Submitters(lambda: [served.url], key, rate=RATE, body=sleep_job, threads=4)
    watch = AssignedWatch(served.url, key)
    rig = Rig(result, database, served, submitters, watch, http, logs)
    submitters.start()
    watch.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = http.get("/v1/jobs", params={"status": "completed", "limit": 1})
        if answer.status_code == 200 and answer.json()["total"] > 0:
            return rig
        time.sleep(0.2)
    result.check("a first job completed before any fault", False, logs()[-4000:])
    submitters.stop(drain_seconds=5)
    watch.stop()
    return None


def finish(rig: Rig, started: float, fault_kind: str) -> None:
    """Stop the load, wait for every job to end, then record the figures and checks."""
    result = rig.result
    operations = rig.submitters.stop(drain_seconds=30)
    load_seconds = time.monotonic() - started
    settle_started = time.monotonic()
    unfinished = _unfinished(rig.http)
    while unfinished != 0 and time.monotonic() - settle_started < SETTLE_SECONDS:
        time.sleep(0.5)
        unfinished = _unfinished(rig.http)
    settled = time.monotonic() - settle_started
    rig.watch.stop()

    result.figure(fault_kind, len(rig.faults))
    result.figure("fault windows (s)", ", ".join(f"{f.seconds:.1f}" for f in rig.faults))
    result.figure("load (s)", round(load_seconds, 1))
    result.figure("settled after the load (s)", round(settled, 1))
    scan = scan_log(rig.database)
    bookkeeping(result, operations, scan)
    _outcomes(result, rig, operations)
    acknowledged = sorted({op.job_id for op in operations if op.job_id is not None})
    job_histories(result, scan, acknowledged)
    events = Counter(kind for job_id in acknowledged for kind in scan.types(job_id))
    # No miner lost anything: a requeue would be an attempt the fault itself cost.
    result.expect_equal("attempts requeued", events["JobRequeued"], 0)
    result.figure("reports rejected (JobReportRejected)", events["JobReportRejected"])
    _assigned_times(result, rig)
    if not result.passed:
        result.check("process logs (tail)", False, rig.logs()[-8000:])


def _outcomes(result: Result, rig: Rig, operations: list[Operation]) -> None:
    """Every acknowledged job completed; the first completion after each recovery."""
    acknowledged = {op.job_id for op in operations if op.job_id is not None}
    rows = {row["job_id"]: row for row in _pages(rig.http, {})}
    statuses = Counter(rows.get(job_id, {}).get("status", "missing") for job_id in acknowledged)
    result.figure("job statuses", ", ".join(f"{s} {n}" for s, n in sorted(statuses.items())))
    result.expect_equal("jobs completed", statuses["completed"], len(acknowledged))
    finished = sorted(
        datetime.fromisoformat(row["completed_at"])
        for row in rows.values()
        if row["status"] == "completed" and row.get("completed_at")
    )
    delays = []
    for fault in rig.faults:
        assert fault.ended_at is not None
        after = next((at for at in finished if at >= fault.ended_at), None)
        delays.append((after - fault.ended_at).total_seconds() if after else float("inf"))
    worst = max(delays, default=0.0)
    result.figure("first completion after each recovery (s)", ", ".join(f"{d:.1f}" for d in delays))
    result.expect_at_most(
        "slowest first completion after a recovery (s)", round(worst, 1), RECOVERY_LIMIT_SECONDS
    )


def _assigned_times(result: Result, rig: Rig) -> None:
    watch = rig.watch
    durations = watch.durations(rig.faults)
    bound = LEASE_SECONDS + GRACE_SECONDS
    stuck = {key: round(seconds, 1) for key, seconds in durations.items() if seconds > bound}
    result.figure("status samples (failed)", f"{watch.samples} ({watch.failed_samples})")
    result.figure("attempts seen assigned", len(durations))
    result.figure(
        "longest assigned outside faults (s)", round(max(durations.values(), default=0.0), 1)
    )
    result.figure("lease + grace (s)", bound)
    result.expect_equal("attempts stuck assigned past lease + grace", len(stuck), 0)
    result.check("the sampler saw the views", watch.samples > watch.failed_samples, watch.samples)
    if stuck:
        result.check("stuck attempts (job, attempt): seconds", False, dict(list(stuck.items())[:5]))


# ---- nats-restarted ---------------------------------------------------------------


def outage_plan(seconds: float) -> list[float]:
    """The outages of one run: one longer than the lease when short, else a mix in turn."""
    if seconds < 2 * UP_SECONDS + OUTAGES[0] + OUTAGES[1]:
        return [LEASE_SECONDS * 1.5]
    plan: list[float] = []
    spent = UP_SECONDS
    for outage in itertools.cycle(OUTAGES):
        if spent + outage + UP_SECONDS > seconds:
            return plan
        plan.append(outage)
        spent += outage + UP_SECONDS
    raise AssertionError("unreachable")


def run(lab: Lab, seconds: float) -> Result:
    result = Result("nats-restarted")
    server, url = lab.restartable_nats()
    rig = start_rig(lab, result, url)
    if rig is None:
        return result
    started = time.monotonic()
    plan = outage_plan(seconds)
    up = max(2.0, (seconds - sum(plan)) / (len(plan) + 1))
    for outage in plan:
        time.sleep(up)
        fault = Fault("NATS down", time.monotonic())
        rig.faults.append(fault)
        server.stop()
        time.sleep(outage)
        server.start()
        fault.end()
    time.sleep(max(0.0, seconds - (time.monotonic() - started)))
    finish(rig, started, "NATS restarts")
    result.seconds = time.monotonic() - started
    return result


# ---- nats-cluster-node-killed -------------------------------------------------------


async def _streams(urls: list[str], names: list[str]) -> dict[str, Any]:
    """Each stream's leader and replica counts, and its consumers' (NATS_DOWN if unanswered)."""
    nc = await nats.connect(
        urls, connect_timeout=2, max_reconnect_attempts=1, reconnect_time_wait=0.2
    )
    try:
        js = nc.jetstream(timeout=2)
        found: dict[str, Any] = {}
        for name in names:
            info = await js.stream_info(name)
            cluster = info.cluster
            consumers = await js.consumers_info(name)
            found[name] = {
                "leader": cluster.leader if cluster else None,
                "configured": info.config.num_replicas,
                "copies": 1 + len(cluster.replicas or []) if cluster else 1,
                "consumer copies": [
                    1 + len(c.cluster.replicas or []) if c.cluster else 1 for c in consumers
                ],
            }
        return found
    finally:
        await nc.close()


def stream_state(cluster: NatsCluster, names: list[str]) -> dict[str, Any] | None:
    """`_streams` asked of the running nodes; None while they cannot answer for every stream."""
    urls = [node.url for node in cluster.nodes if node.running]
    try:
        state = asyncio.run(_streams(urls, names))
    except NATS_DOWN:
        return None
    return state if all(s["leader"] for s in state.values()) else None


def wait_served(cluster: NatsCluster, names: list[str], victim: str, timeout: float = 60) -> bool:
    """Wait until every stream has a leader other than `victim` and answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = stream_state(cluster, names)
        if state is not None and all(s["leader"] != victim for s in state.values()):
            return True
        time.sleep(0.2)
    return False


def kill_node(rig: Rig, cluster: NatsCluster, names: list[str], index: int) -> int:
    """SIGKILL node `index`, and record the window until the streams are served again."""
    fault = Fault(f"{cluster.nodes[index].name} killed", time.monotonic())
    rig.faults.append(fault)
    victim = cluster.kill(index)
    served = wait_served(cluster, names, victim.name)
    fault.end()
    rig.result.check(f"streams served again after {victim.name} was killed", served, fault.seconds)
    return index


def leader_index(cluster: NatsCluster, names: list[str], stream: str) -> int:
    """The node leading `stream` (the first node if nobody can tell)."""
    state = stream_state(cluster, names)
    leader = state[stream]["leader"] if state else None
    return next((i for i, node in enumerate(cluster.nodes) if node.name == leader), 0)


def run_cluster(lab: Lab, seconds: float) -> Result:
    result = Result("nats-cluster-node-killed")
    cluster = NatsCluster(lab.directory("nats-cluster"))
    lab.track(cluster)
    urls = cluster.start()
    rig = start_rig(lab, result, urls, {"JOBLEDGER_NATS_STREAM_REPLICAS": "3"})
    if rig is None:
        return result
    namespace = Namespace(rig.served.nats_prefix)
    names = [spec.name for spec in namespace.streams()]
    assignments = namespace.stream_name("ASSIGNMENTS")
    started = time.monotonic()
    full = seconds >= 45
    first_gap = seconds / 4 if full else seconds / 3
    time.sleep(first_gap)
    first = kill_node(rig, cluster, names, leader_index(cluster, names, assignments))
    if full:
        time.sleep(seconds / 4)
        cluster.restart(first)
        time.sleep(seconds / 4)
        others = [i for i in range(len(cluster.nodes)) if i != first]
        leader = leader_index(cluster, names, assignments)
        kill_node(rig, cluster, names, leader if leader in others else others[0])
    time.sleep(max(0.0, seconds - (time.monotonic() - started)))
    finish(rig, started, "nodes killed (SIGKILL)")
    _replicas(result, cluster, names)
    result.seconds = time.monotonic() - started
    return result


def _replicas(result: Result, cluster: NatsCluster, names: list[str]) -> None:
    """Every protocol stream and consumer still configured with, and placed on, 3 nodes."""
    state = stream_state(cluster, names)
    if state is None:
        result.check("stream state readable at the end", False, "no answer from the cluster")
        return
    short = [
        name
        for name, s in state.items()
        if s["configured"] != 3 or s["copies"] != 3 or any(n != 3 for n in s["consumer copies"])
    ]
    result.figure("consumers", sum(len(s["consumer copies"]) for s in state.values()))
    result.expect_equal("streams or consumers with fewer than 3 replicas", len(short), 0)
    if short:
        result.check("under-replicated", False, {name: state[name] for name in short})
