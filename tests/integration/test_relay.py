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

import psycopg
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType

from app import protocol
from app.blobs import Blobs
from app.bus import Bus, ensure_streams
from app.ingestor import Ingestor
from app.protocol import Namespace
from app.relay import RELAY_NAME, Relay, relay_position
from app.store import JobLedger, postgres_env
from domain.miners import Capabilities
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
    subscription = await js.pull_subscribe(
        subject, stream=stream, config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT)
    )
    messages: list[Any] = []
    with contextlib.suppress(TimeoutError):
        while len(messages) < info.state.messages:
            messages += await subscription.fetch(500, timeout=1)
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
