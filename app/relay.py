"""The relay: publishes committed events to NATS. The event store is the outbox.

It follows the log from its tracked position and, for each event, publishes

- the event itself on `{prefix}.events.{aggregate_id}`;
- for `JobAssigned`, the assignment on the miner's assignments subject;
- for `JobCancelRequested`, `JobTimedOut`, `JobRequeued` and `JobReportRejected`,
  a cancel order on the control subject of the miner that holds (or held) the attempt.

Every message carries `Nats-Msg-Id` = `{aggregate_id}:{version}`, so the stream drops a
message it already has. The position advances only after JetStream acknowledged the
messages, so a crash at any instant republishes at most what was in flight, and
deduplication removes exactly that: nothing lost, nothing doubled.

Only one relay publishes at a time (a PostgreSQL advisory lock); the others wait to
take over, so several API processes can all run one.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import msgspec
import psycopg
from anyio import to_thread
from nats.js import JetStreamContext

from app import protocol
from app.backoff import Backoff
from app.bus import NATS_DOWN, Bus, ensure_streams
from app.protocol import Namespace
from app.store import DATABASE_DOWN, JobLedger, event_type_name
from domain.files import File, file_id_of
from domain.jobs import Job, job_id_of
from domain.miners import MINER_AGGREGATE_EVENTS, miner_id_of

log = logging.getLogger("jobledger.relay")

RELAY_NAME = "nats_relay"
_LEADER_LOCK_ID = 0x6A6C_7265  # "jlre"
_ENVELOPE = {"originator_id", "originator_version", "timestamp", "originator_topic"}


class RelayedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The payload on `{prefix}.events.{aggregate_id}`: one committed event."""

    type: str
    aggregate_id: str
    version: int
    position: int
    timestamp: Any
    data: dict[str, Any]


# Money stays exact on the wire: decimals travel as strings.
_encode = msgspec.json.Encoder(decimal_format="string").encode


def aggregate_id_of_event(event: Any) -> str:
    """The public id (job_…, file_… or miner_…) of the aggregate an event belongs to."""
    if isinstance(event, Job.Event | Job.Submitted):
        return job_id_of(event.originator_id)
    if isinstance(event, File.Event | File.Uploaded):
        return file_id_of(event.originator_id)
    if isinstance(event, MINER_AGGREGATE_EVENTS):
        return miner_id_of(event.originator_id)
    raise TypeError(f"no public id for {type(event).__qualname__}: add its aggregate here")


def relayed(position: int, event: Any) -> RelayedEvent:
    """An event as the events stream carries it."""
    return RelayedEvent(
        type=event_type_name(event),
        aggregate_id=aggregate_id_of_event(event),
        version=event.originator_version,
        position=position,
        timestamp=event.timestamp,
        data={k: v for k, v in vars(event).items() if k not in _ENVELOPE},
    )


def assignment_of(job: Job, event: Job.Assigned) -> protocol.Assignment:
    """What a miner receives for an attempt: the job as it was when it was assigned."""
    return protocol.Assignment(
        job_id=job.job_id,
        attempt=event.attempt,
        model=job.model,
        input=job.input_text,
        input_file_id=job.input_file_id,
        input_size_bytes=job.input_size_bytes,
        input_sha256=job.input_sha256,
        output_config=protocol.OutputConfig(
            destination=job.output_destination, format=job.output_format
        ),
        requirements=protocol.Requirements(
            gpu_type=job.gpu_type, gpu_count=job.gpu_count, min_vram_gb=job.min_vram_gb
        ),
        priority=job.priority.value,
        timeout_seconds=job.timeout_seconds,
        assigned_at=event.timestamp,
        deadline=event.timestamp + timedelta(seconds=job.timeout_seconds),
    )


class Relay:
    """Publishes the log to JetStream in order, from a tracked position, exactly once."""

    def __init__(
        self, ledger: JobLedger, dsn: str, bus: Bus, namespace: Namespace, *, batch_size: int = 500
    ) -> None:
        self._ledger = ledger
        self._dsn = dsn
        self._bus = bus
        self._namespace = namespace
        self._batch_size = batch_size

    async def run(self) -> None:
        """Relay forever: wait for leadership, then follow the log; survive lost services."""
        js = await self._bus.jetstream()
        backoff = Backoff()
        while True:
            try:
                await ensure_streams(js, self._namespace, self._bus.stream_replicas)
                await self._lead(js)
            except (*DATABASE_DOWN, *NATS_DOWN) as error:
                delay = backoff.next_delay()
                log.warning(
                    "relay paused (%s: %s); retrying in %.1f s", type(error).__name__, error, delay
                )
                await asyncio.sleep(delay)

    async def _lead(self, js: JetStreamContext) -> None:
        channel = self._ledger.recorder.channel_name  # type: ignore[attr-defined]
        async with (
            await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn,
            await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as listener,
        ):
            # Session lock: held while this connection lives, released if it dies.
            await _wait_for_lock(conn)
            log.info("relay is publishing (this process holds the relay lock)")
            await conn.execute(
                "INSERT INTO jobledger_projection_tracking (projection, position) "
                "VALUES (%s, 0) ON CONFLICT DO NOTHING",
                (RELAY_NAME,),
            )
            await listener.execute(f'LISTEN "{channel}"')
            position = await _position(conn)
            while True:
                batch = await to_thread.run_sync(
                    self._ledger.read_log, position + 1, self._batch_size
                )
                if not batch:
                    # A NOTIFY from the store wakes us at once; the timeout bounds a lost one.
                    async for _ in listener.notifies(timeout=1.0, stop_after=1):
                        pass
                    continue
                published = position
                try:
                    for seq, event in batch:
                        await self._publish(js, seq, event)
                        published = seq
                finally:
                    if published > position:
                        await _advance(conn, published)
                        position = published

    async def _publish(self, js: JetStreamContext, position: int, event: Any) -> None:
        record = relayed(position, event)
        headers = {
            protocol.MSG_ID_HEADER: protocol.event_msg_id(record.aggregate_id, record.version),
            protocol.EVENT_TYPE_HEADER: record.type,
            protocol.POSITION_HEADER: str(position),
        }
        await js.publish(
            self._namespace.events_subject(record.aggregate_id), _encode(record), headers=headers
        )
        for subject, payload in await self._orders(record.aggregate_id, event):
            await js.publish(subject, payload, headers=headers)

    async def _orders(self, job_id: str, event: Any) -> list[tuple[str, bytes]]:
        """The assignment or cancel order an event implies, if any."""
        ns = self._namespace
        match event:
            case Job.Assigned(miner_id=miner_id):
                job = await self._job_at(job_id, event)
                return [(ns.assignments_subject(miner_id), _encode(assignment_of(job, event)))]
            case Job.CancelRequested() | Job.TimedOut():
                job = await self._job_at(job_id, event)
                reason = "timed out" if isinstance(event, Job.TimedOut) else "canceled by client"
                if job.miner_id is None:
                    return []  # a pending job has nobody to tell
                return [_cancel(ns, job.miner_id, job_id, job.attempt, reason)]
            case Job.Requeued(previous_miner_id=str(previous), attempt=attempt, cause=cause):
                return [_cancel(ns, previous, job_id, attempt - 1, f"requeued: {cause}")]
            case Job.ReportRejected(miner_id=miner_id, attempt=attempt, kind=kind) if kind in (
                "started",
                "progress",
            ):
                # The miner is still working on an attempt that is not its own: stop it.
                return [_cancel(ns, miner_id, job_id, attempt, "you do not hold this attempt")]
        return []

    async def _job_at(self, job_id: str, event: Any) -> Job:
        return await to_thread.run_sync(self._ledger.job_at, job_id, event.originator_version)


def _cancel(
    ns: Namespace, miner_id: str, job_id: str, attempt: int, reason: str
) -> tuple[str, bytes]:
    order = protocol.Control(job_id=job_id, attempt=attempt, action="cancel", reason=reason)
    return ns.control_subject(miner_id), _encode(order)


async def _wait_for_lock(conn: psycopg.AsyncConnection[Any]) -> None:
    while True:
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (_LEADER_LOCK_ID,))
        found = await cur.fetchone()
        if found and found[0]:
            return
        await asyncio.sleep(1.0)


async def _position(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute(
        "SELECT position FROM jobledger_projection_tracking WHERE projection = %s", (RELAY_NAME,)
    )
    found = await cur.fetchone()
    return int(found[0]) if found else 0


async def _advance(conn: psycopg.AsyncConnection[Any], position: int) -> None:
    await conn.execute(
        "UPDATE jobledger_projection_tracking SET position = %s WHERE projection = %s",
        (position, RELAY_NAME),
    )


async def relay_position(dsn: str) -> int:
    """How far the relay has published (for operators and tests)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await _position(conn)
