"""The relay, the streams and the ingestor's dead letters, on real PostgreSQL and NATS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType

from app import protocol
from app.blobs import Blobs
from app.bus import Bus, ensure_streams
from app.embedded import EmbeddedNats
from app.ingestor import Ingestor
from app.protocol import Namespace
from app.relay import RELAY_NAME, Relay, relay_position, relayed
from app.store import JobLedger, postgres_env
from domain.errors import JobNotFound
from domain.jobs import Job, RequeueCause
from domain.miners import Capabilities
from domain.pricing import Priority, estimate
from projections import tables
from tests.integration.helpers import spec
from tests.nats_names import fresh_prefix


@pytest.fixture
def ledger(database_url: str) -> Iterator[JobLedger]:
    ledger = JobLedger(postgres_env(database_url))
    with psycopg.connect(database_url, autocommit=True) as conn:
        tables.create_schema(conn)
    yield ledger
    ledger.close()


@pytest.fixture
def namespace() -> Namespace:
    """Subjects and streams of our own on the shared NATS server."""
    return Namespace(fresh_prefix())


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    bus = Bus([nats_url], name="test")
    await bus.start()
    await bus.connected.wait()
    yield bus
    await bus.close()


@contextlib.asynccontextmanager
async def running(work: Any) -> AsyncIterator[None]:
    task = asyncio.create_task(work())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(predicate: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


async def stream_messages(client: NatsClient, stream: str, subject: str) -> list[Any]:
    """Every message currently in a stream on `subject`, oldest first, read but never acked."""
    js = client.jetstream()
    info = await js.stream_info(stream)
    if not info.state.messages:
        return []
    # Never acked, so the consumer must allow them all pending (its default stops at 1000).
    config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=info.state.messages)
    subscription = await js.pull_subscribe(subject, stream=stream, config=config)
    messages: list[Any] = []
    with contextlib.suppress(TimeoutError):
        while len(messages) < info.state.messages:
            # Asking for no more than there is: a fetch short of its batch waits out its timeout.
            messages += await subscription.fetch(
                min(500, info.state.messages - len(messages)), timeout=1
            )
    await subscription.unsubscribe()
    return messages


def register(ledger: JobLedger, gpu_type: str = "v100") -> str:
    miner, _ = ledger.register_miner(
        "relay-test",
        Capabilities(
            gpu_type=gpu_type,
            gpu_count=1,
            vram_gb=16,
            location="lab",
            price_per_hour=Decimal("0.5"),
            max_concurrent=2,
        ),
    )
    return miner.miner_id


async def test_streams_are_created_with_deliberate_settings_and_creating_again_is_harmless(
    bus: Bus, namespace: Namespace
) -> None:
    js = await bus.jetstream()
    await ensure_streams(js, namespace)
    await ensure_streams(js, namespace)  # a second process starting

    assignments = await js.stream_info(namespace.stream_name("ASSIGNMENTS"))
    events = await js.stream_info(namespace.stream_name("EVENTS"))
    assert assignments.config.retention == RetentionPolicy.WORK_QUEUE
    assert assignments.config.discard == DiscardPolicy.NEW
    assert events.config.retention == RetentionPolicy.LIMITS
    assert events.config.discard == DiscardPolicy.OLD
    for info in (assignments, events):
        assert info.config.storage == StorageType.FILE
        assert info.config.duplicate_window == protocol.DUPLICATE_WINDOW_SECONDS


async def test_streams_changed_by_hand_are_brought_back_to_the_settings(
    bus: Bus, namespace: Namespace
) -> None:
    js = await bus.jetstream()
    await ensure_streams(js, namespace)
    name = namespace.stream_name("EVENTS")
    drifted = (await js.stream_info(name)).config
    drifted.max_msgs = 10
    await js.update_stream(drifted)

    await ensure_streams(js, namespace)

    assert (await js.stream_info(name)).config.max_msgs == 50_000_000


async def test_every_event_is_published_once_in_order_even_when_the_relay_restarts_from_zero(
    ledger: JobLedger, database_url: str, bus: Bus, namespace: Namespace
) -> None:
    miner_id = register(ledger)
    jobs = [
        ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id for _ in range(5)
    ]
    for job_id in jobs[:3]:
        ledger.change_job(job_id, lambda job: job.assign(miner_id))
    head = ledger.head()
    relay = Relay(ledger, database_url, bus, namespace, batch_size=4)

    async def published_all() -> bool:
        return await relay_position(database_url) >= head

    async with running(relay.run):
        await until(published_all)
    # As if the relay had crashed after publishing and before recording its position.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE jobledger_projection_tracking SET position = 0 WHERE projection = %s",
            (RELAY_NAME,),
        )
    async with running(relay.run):
        await until(published_all)

    messages = await stream_messages(
        bus.client, namespace.stream_name("EVENTS"), f"{namespace.prefix}.events.>"
    )
    versions: dict[str, list[int]] = defaultdict(list)
    for message in messages:
        body = json.loads(message.data)
        versions[body["aggregate_id"]].append(body["version"])
        assert message.headers[protocol.MSG_ID_HEADER] == protocol.event_msg_id(
            body["aggregate_id"], body["version"]
        )
    assert versions == {
        miner_id: [1],
        **{job_id: [1, 2] for job_id in jobs[:3]},
        **{job_id: [1] for job_id in jobs[3:]},
    }


async def test_an_assignment_reaches_its_miner_with_the_job_and_its_deadline(
    ledger: JobLedger, database_url: str, bus: Bus, namespace: Namespace
) -> None:
    miner_id = register(ledger)
    job_id = ledger.submit(
        owner="alice",
        spec=spec(model="echo", input_text="hi", timeout_seconds=90),
        idempotency_key=None,
    ).job_id
    ledger.change_job(job_id, lambda job: job.assign(miner_id))
    head = ledger.head()
    relay = Relay(ledger, database_url, bus, namespace)

    async def published_all() -> bool:
        return await relay_position(database_url) >= head

    async with running(relay.run):
        await until(published_all)

    [message] = await stream_messages(
        bus.client, namespace.stream_name("ASSIGNMENTS"), namespace.assignments_subject(miner_id)
    )
    assignment = protocol.assignment_decoder.decode(message.data)
    assert (assignment.job_id, assignment.attempt, assignment.model) == (job_id, 1, "echo")
    assert assignment.input == "hi"
    assert assignment.deadline - assignment.assigned_at == timedelta(seconds=90)
    assert message.headers[protocol.MSG_ID_HEADER] == f"{job_id}:2"


async def test_cancelling_a_held_job_sends_its_miner_a_cancel_order(
    ledger: JobLedger, database_url: str, bus: Bus, namespace: Namespace
) -> None:
    miner_id = register(ledger)
    job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    ledger.change_job(job_id, lambda job: job.assign(miner_id))
    ledger.cancel(job_id, owner="alice")
    head = ledger.head()
    relay = Relay(ledger, database_url, bus, namespace)

    async def published_all() -> bool:
        return await relay_position(database_url) >= head

    async with running(relay.run):
        await until(published_all)

    [message] = await stream_messages(
        bus.client, namespace.stream_name("CONTROL"), namespace.control_subject(miner_id)
    )
    order = protocol.control_decoder.decode(message.data)
    assert (order.job_id, order.attempt, order.action) == (job_id, 1, "cancel")


async def test_an_unreadable_report_goes_to_the_dead_letter_stream_and_is_not_retried(
    ledger: JobLedger, bus: Bus, namespace: Namespace, tmp_path: Path
) -> None:
    job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    blobs = Blobs(tmp_path, None, frozenset())
    ingestor = Ingestor(ledger, bus, namespace, blobs, max_attempts=3)
    js = await bus.jetstream()
    await ensure_streams(js, namespace)
    async with running(ingestor.run):
        await js.publish(namespace.reports_subject(job_id), b'{"kind": "started", "oops": 1}')
        await js.publish(namespace.reports_subject("job_" + "0" * 32), b"{}")

        async def both_dead() -> bool:
            info = await js.stream_info(namespace.stream_name("DEAD"))
            return info.state.messages >= 2

        await until(both_dead)

    dead = await stream_messages(
        bus.client, namespace.stream_name("DEAD"), namespace.dead_letter_subject("reports")
    )
    reasons = [json.loads(message.data)["reason"] for message in dead]
    assert any("invalid report" in reason for reason in reasons)
    assert len(reasons) == 2
    # Terminated, not waiting for redelivery: the reports stream is empty.
    reports = await js.stream_info(namespace.stream_name("REPORTS"))
    assert reports.state.messages == 0
    # The job itself is untouched.
    assert [e.type for e in ledger.job_events(job_id, owner=None)] == ["JobSubmitted"]


async def test_reports_turn_into_job_events_through_the_stream(
    ledger: JobLedger, bus: Bus, namespace: Namespace, tmp_path: Path
) -> None:
    miner_id = register(ledger, "cpu")
    job_id = ledger.submit(
        owner="alice", spec=spec(gpu_type="cpu", min_vram_gb=0), idempotency_key=None
    ).job_id
    ledger.change_job(job_id, lambda job: job.assign(miner_id))
    js = await bus.jetstream()
    await ensure_streams(js, namespace)
    started = protocol.Started(miner_id=miner_id, attempt=1, at=datetime.now().astimezone())
    ingestor = Ingestor(ledger, bus, namespace, Blobs(tmp_path, None, frozenset()), max_attempts=3)
    async with running(ingestor.run):
        for _ in range(3):  # a miner retrying its publish: deduplicated by the stream
            await js.publish(
                namespace.reports_subject(job_id),
                protocol.encoder.encode(started),
                headers={protocol.MSG_ID_HEADER: protocol.report_msg_id(job_id, started)},
            )

        async def applied() -> bool:
            return ledger.job(job_id).status.value == "running"

        await until(applied)
    assert [e.type for e in ledger.job_events(job_id, owner=None)] == [
        "JobSubmitted",
        "JobAssigned",
        "JobStarted",
    ]
    info = await js.stream_info(namespace.stream_name("REPORTS"))
    assert info.state.messages == 0  # acknowledged, so the work queue let it go


async def test_a_second_relay_waits_while_the_first_holds_the_lock(
    ledger: JobLedger,
    database_url: str,
    bus: Bus,
    namespace: Namespace,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="jobledger.relay")
    ledger.submit(owner="alice", spec=spec(), idempotency_key=None)
    head = ledger.head()
    first = Relay(ledger, database_url, bus, namespace)
    second = Relay(ledger, database_url, bus, namespace)

    async def published_all() -> bool:
        return await relay_position(database_url) >= head

    async with running(first.run), running(second.run):
        await until(published_all)
        await asyncio.sleep(0.5)
    leaders = [r for r in caplog.records if "relay is publishing" in r.getMessage()]
    assert len(leaders) == 1


# ---- the publish window ----------------------------------------------------------


def write_jobs(ledger: JobLedger, count: int, miner_id: str) -> None:
    """`count` jobs, every other one assigned, saved a few hundred per transaction (fast)."""
    guess = estimate(
        ledger.rates, gpu_type="v100", gpu_count=1, priority=Priority.NORMAL, timeout_seconds=60
    )
    jobs: list[Job] = []
    for n in range(count):
        job = Job.submit(
            aggregate_id=uuid4(), owner="alice", spec=spec(), estimate=guess, idempotency_key=None
        )
        if n % 2:
            job.assign(miner_id)
        jobs.append(job)
        if len(jobs) == 300:
            ledger.save(*jobs)
            jobs = []
    if jobs:
        ledger.save(*jobs)


async def events_stream(bus: Bus, namespace: Namespace) -> list[tuple[str, int, int]]:
    """The events stream as (aggregate_id, version, position), in stream order."""
    messages = await stream_messages(
        bus.client, namespace.stream_name("EVENTS"), f"{namespace.prefix}.events.>"
    )
    found = []
    for message in messages:
        body = json.loads(message.data)
        assert int(message.headers[protocol.POSITION_HEADER]) == body["position"]
        found.append((body["aggregate_id"], body["version"], body["position"]))
    return found


def logged(ledger: JobLedger) -> list[tuple[str, int, int]]:
    """The log as (aggregate_id, version, position), in log order."""
    return [
        (relayed(position, event).aggregate_id, event.originator_version, position)
        for batch in ledger.read_whole_log()
        for position, event in batch
    ]


def overtaken_only_by_fewer_than(stream: list[tuple[str, int, int]], events: int) -> bool:
    """True if no message is preceded by one of an event `events` or more events later.

    The log's positions have no gaps here, so positions count events.
    """
    highest = 0
    for _, _, position in stream:
        if highest - position >= events:
            return False
        highest = max(highest, position)
    return True


async def count_in(bus: Bus, namespace: Namespace, what: str) -> int:
    js = bus.client.jetstream()
    return (await js.stream_info(namespace.stream_name(what))).state.messages


@pytest.mark.parametrize(("window", "batch_size"), [(50, 3), (2, 500), (1, 7)])
async def test_the_window_publishes_every_event_once_in_log_order_whatever_its_size(
    ledger: JobLedger,
    database_url: str,
    bus: Bus,
    namespace: Namespace,
    window: int,
    batch_size: int,
) -> None:
    miner_id = register(ledger)
    write_jobs(ledger, 40, miner_id)
    head = ledger.head()
    relay = Relay(ledger, database_url, bus, namespace, batch_size=batch_size, window=window)

    async def published_all() -> bool:
        return await relay_position(database_url) >= head

    async with running(relay.run):
        await until(published_all)

    assert await events_stream(bus, namespace) == logged(ledger)
    assert await count_in(bus, namespace, "ASSIGNMENTS") == 20


async def test_a_publish_failing_mid_window_stops_the_position_at_the_acknowledged_prefix(
    ledger: JobLedger,
    database_url: str,
    bus: Bus,
    namespace: Namespace,
    caplog: pytest.LogCaptureFixture,
) -> None:
    miner_id = register(ledger)
    first = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    ledger.change_job(first, lambda job: job.assign(miner_id))
    relay = Relay(ledger, database_url, bus, namespace, batch_size=500, window=64)
    js = bus.client.jetstream()
    assignments = namespace.stream_name("ASSIGNMENTS")

    async with running(relay.run):
        head = ledger.head()

        async def published(position: int) -> Any:
            async def reached() -> bool:
                return await relay_position(database_url) >= position

            return reached

        await until(await published(head))
        # The assignments stream is full (it refuses new messages), so the next
        # assignment fails while the events after it, in the same window, are stored.
        config = (await js.stream_info(assignments)).config
        config.max_msgs = 1
        await js.update_stream(config)
        second = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
        failing = ledger.change_job(second, lambda job: job.assign(miner_id))
        later = [
            ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id for _ in range(5)
        ]
        head = ledger.head()

        async def later_events_stored() -> bool:
            stored = {aggregate for aggregate, _, _ in await events_stream(bus, namespace)}
            return set(later) <= stored

        await until(later_events_stored)
        await asyncio.sleep(1.5)  # several retries, each failing the same way
        assert await relay_position(database_url) == failing - 1
        # Retries do not re-run ensure_streams: it would have lifted the limit.
        assert (await js.stream_info(assignments)).config.max_msgs == 1
        assert await count_in(bus, namespace, "ASSIGNMENTS") == 1

    # The stream is brought back to its settings; a relay starts again from the prefix.
    await ensure_streams(js, namespace)
    async with running(relay.run):
        await until(await published(head))

    assert await events_stream(bus, namespace) == logged(ledger)  # once each, in order
    messages = await stream_messages(
        bus.client, assignments, namespace.assignments_subject(miner_id)
    )
    held = [protocol.assignment_decoder.decode(m.data).job_id for m in messages]
    assert held == [first, second]
    assert any("maximum messages exceeded" in r.getMessage() for r in caplog.records)


async def test_after_a_failure_later_events_may_come_first_but_never_a_window_late(
    ledger: JobLedger, database_url: str, bus: Bus, namespace: Namespace
) -> None:
    miner_id = register(ledger)
    window = 8
    relay = Relay(ledger, database_url, bus, namespace, window=window)
    js = bus.client.jetstream()
    events = namespace.stream_name("EVENTS")

    async def published_all() -> bool:
        return await relay_position(database_url) >= ledger.head()

    async with running(relay.run):
        await until(published_all)
        # One message per subject, and no more: each job's first event is stored, its
        # second refused, while the first events of the jobs after it are stored.
        drifted = (await js.stream_info(events)).config
        drifted.max_msgs_per_subject = 1
        drifted.discard = DiscardPolicy.NEW
        drifted.discard_new_per_subject = True
        await js.update_stream(drifted)
        refused = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
        failing = ledger.change_job(refused, lambda job: job.assign(miner_id))
        after = [
            ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
            for _ in range(window - 2)
        ]

        async def after_stored() -> bool:
            stored = {aggregate for aggregate, _, _ in await events_stream(bus, namespace)}
            return set(after) <= stored

        await until(after_stored)

        async def stopped_before_the_refused_event() -> bool:
            return await relay_position(database_url) == failing - 1

        await until(stopped_before_the_refused_event)
        await asyncio.sleep(0.5)  # retried, refused again: the position stays
        assert await relay_position(database_url) == failing - 1
        await ensure_streams(js, namespace)  # the limit lifted: the relay gets through
        await until(published_all)

    stream = await events_stream(bus, namespace)
    assert stream != logged(ledger)  # the refused event came after later ones
    assert sorted(stream, key=lambda message: message[2]) == logged(ledger)  # each once
    assert overtaken_only_by_fewer_than(stream, window)
    assert [(a, v) for a, v, _ in stream if a == refused] == [(refused, 1), (refused, 2)]


async def test_a_deleted_stream_is_created_again_and_gets_what_it_missed(
    ledger: JobLedger, database_url: str, bus: Bus, namespace: Namespace
) -> None:
    miner_id = register(ledger)
    relay = Relay(ledger, database_url, bus, namespace)
    js = bus.client.jetstream()

    async def published_all() -> bool:
        return await relay_position(database_url) >= ledger.head()

    async with running(relay.run):
        await until(published_all)
        await js.delete_stream(namespace.stream_name("ASSIGNMENTS"))
        job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
        ledger.change_job(job_id, lambda job: job.assign(miner_id))
        await until(published_all)

    [message] = await stream_messages(
        bus.client, namespace.stream_name("ASSIGNMENTS"), namespace.assignments_subject(miner_id)
    )
    assert protocol.assignment_decoder.decode(message.data).job_id == job_id
    assert await events_stream(bus, namespace) == logged(ledger)


async def test_nats_stopped_mid_run_loses_nothing_and_doubles_nothing(
    ledger: JobLedger, database_url: str, namespace: Namespace, tmp_path: Path
) -> None:
    broker = EmbeddedNats(tmp_path / "nats")
    url = broker.start()
    port = broker.port
    bus = Bus([url], name="relay-test")
    await bus.start()
    await bus.connected.wait()
    try:
        miner_id = register(ledger)
        write_jobs(ledger, 4000, miner_id)
        head = ledger.head()
        window = 16
        relay = Relay(
            ledger, database_url, bus, namespace, batch_size=200, window=window, publish_timeout=1
        )

        async def started() -> bool:
            return await relay_position(database_url) > 0

        async def published_all() -> bool:
            return await relay_position(database_url) >= head

        async with running(relay.run):
            await until(started)
            await asyncio.to_thread(broker.stop)
            stopped_at = await relay_position(database_url)
            await asyncio.sleep(1.0)
            broker = EmbeddedNats(tmp_path / "nats", port=port)
            await asyncio.to_thread(broker.start)
            await until(published_all, timeout=60)

        assert 0 < stopped_at < head  # the outage hit mid-run
        stream = await events_stream(bus, namespace)
        assert sorted(stream, key=lambda message: message[2]) == logged(ledger)  # each once
        # Out of log order only within what one window held when NATS went away.
        assert overtaken_only_by_fewer_than(stream, window)
        assert await count_in(bus, namespace, "ASSIGNMENTS") == 2000
    finally:
        await bus.close()
        broker.stop()


async def test_orders_carry_each_jobs_state_at_their_own_event_from_one_read_per_batch(
    ledger: JobLedger,
    database_url: str,
    bus: Bus,
    namespace: Namespace,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first_miner, second_miner = register(ledger), register(ledger)
    moved = ledger.submit(owner="alice", spec=spec(model="echo"), idempotency_key=None).job_id
    ledger.change_job(moved, lambda job: job.assign(first_miner))
    ledger.change_job(moved, lambda job: job.requeue(RequeueCause.LEASE_EXPIRED))
    ledger.change_job(moved, lambda job: job.assign(second_miner))
    ledger.cancel(moved, owner="alice")
    late = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    ledger.change_job(late, lambda job: job.assign(first_miner))
    ledger.change_job(late, lambda job: job.time_out())
    never_assigned = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    ledger.change_job(never_assigned, lambda job: job.time_out())
    head = ledger.head()
    reads: list[list[tuple[str, int]]] = []
    jobs_at = ledger.jobs_at

    def counted(wanted: list[tuple[str, int]]) -> dict[tuple[str, int], Job]:
        reads.append(list(wanted))
        return jobs_at(wanted)

    monkeypatch.setattr(ledger, "jobs_at", counted)
    relay = Relay(ledger, database_url, bus, namespace)

    async def published_all() -> bool:
        return await relay_position(database_url) >= head

    async with running(relay.run):
        await until(published_all)

    async def orders(what: str, decoder: Any) -> dict[str, list[Any]]:
        """Each miner's orders in one of the order streams, oldest first."""
        by_miner: dict[str, list[Any]] = defaultdict(list)
        subject = f"{namespace.prefix}.miners.*.{what.lower()}"
        for message in await stream_messages(bus.client, namespace.stream_name(what), subject):
            by_miner[message.subject.split(".")[-2]].append(decoder.decode(message.data))
        return by_miner

    assignments = await orders("ASSIGNMENTS", protocol.assignment_decoder)
    assert [(a.job_id, a.attempt, a.model) for a in assignments[first_miner]] == [
        (moved, 1, "echo"),
        (late, 1, "gpt2"),
    ]
    assert [(a.job_id, a.attempt) for a in assignments[second_miner]] == [(moved, 2)]
    cancels = await orders("CONTROL", protocol.control_decoder)
    assert [(c.job_id, c.attempt, c.reason) for c in cancels[first_miner]] == [
        (moved, 1, "requeued: lease_expired"),
        (late, 1, "timed out"),
    ]
    assert [(c.job_id, c.attempt, c.reason) for c in cancels[second_miner]] == [
        (moved, 2, "canceled by client")
    ]
    # Every job an order needed was read in one query for the whole batch.
    assert [sorted(wanted) for wanted in reads if wanted] == [
        sorted([(moved, 2), (moved, 4), (moved, 5), (late, 2), (late, 3), (never_assigned, 2)])
    ]


def test_jobs_at_folds_each_job_to_the_version_asked_for(ledger: JobLedger) -> None:
    job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    ledger.change_job(job_id, lambda job: job.assign("miner_a"))
    ledger.change_job(job_id, lambda job: job.requeue(RequeueCause.LEASE_EXPIRED))
    ledger.change_job(job_id, lambda job: job.assign("miner_b"))

    jobs = ledger.jobs_at([(job_id, 2), (job_id, 3), (job_id, 4)])

    held = {version: (job.miner_id, job.attempt, job.version) for (_, version), job in jobs.items()}
    assert held == {2: ("miner_a", 1, 2), 3: (None, 2, 3), 4: ("miner_b", 2, 4)}
    with pytest.raises(JobNotFound):
        ledger.jobs_at([(job_id, 5)])
    with pytest.raises(JobNotFound):
        ledger.jobs_at([("job_" + "0" * 32, 1)])
