"""The relay: publishes committed events to NATS. The event store is the outbox.

It follows the log from its tracked position and, for each event, publishes

- the event itself on `{prefix}.events.{aggregate_id}`;
- for `JobAssigned`, the assignment on the miner's assignments subject;
- for `JobCancelRequested`, `JobTimedOut`, `JobRequeued` and `JobReportRejected`,
  a cancel order on the control subject of the miner that holds (or held) the attempt.

Every message carries `Nats-Msg-Id` = `{aggregate_id}:{version}`, so a stream drops a
message it already has.

Publishing is pipelined: up to `window` messages are in flight at once, sent in log
order on the process's one NATS connection, and each must be acknowledged by JetStream
within `publish_timeout` seconds. The tracked position only ever names the end of the
acknowledged prefix: the last position whose messages, and every earlier one's, were
acknowledged. When a publish fails the relay sends nothing more, waits for what is in
flight, records that prefix and starts again right after it; what the failed window
had already stored is sent again and dropped by deduplication. So a crash or a failure
at any instant costs at most a window of republished messages, and nothing is lost or
doubled. JetStream stores one connection's messages in the order sent, so the streams
are in log order while nothing fails; after a failure, messages of fewer than `window`
later events may precede the one that failed (docs/protocol.md 6.2 says what consumers
can rely on).

Each batch of the log is read in one thread hop: the events, then in one more query
every job whose state an order needs (`JobLedger.jobs_at`), never a query per order.

Streams are created (or brought to their settings) when the relay starts, and again
only when a message found no stream and JetStream confirms one is missing: not on every
retry, since that waits for a cluster's meta leader even when only a stream leader was
being elected.

Only one relay publishes at a time (a PostgreSQL advisory lock); the others wait to
take over, so several API processes can all run one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgspec
import psycopg
from anyio import to_thread
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionReconnectingError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

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
# Messages awaiting JetStream's acknowledgement at once. Past a few hundred the relay
# gains nothing (its CPU is the limit), and the window bounds both what a failure
# republishes and how far the order of a stream can differ from the log's after one.
PUBLISH_WINDOW = 256
# How long JetStream gets to acknowledge one message; a reply lost with its connection
# would otherwise be awaited forever.
PUBLISH_TIMEOUT_SECONDS = 5.0
# The streams the relay publishes to; a message none of them took may mean one is gone.
RELAY_STREAMS = ("EVENTS", "ASSIGNMENTS", "CONTROL")
_LEADER_LOCK_ID = 0x6A6C_7265  # "jlre"
_ENVELOPE = {"originator_id", "originator_version", "timestamp", "originator_topic"}
# Events whose order needs the job as it was at that event.
_NEEDS_JOB = (Job.Assigned, Job.CancelRequested, Job.TimedOut)
# How long the relay asks JetStream whether its streams exist after one took no message.
_STREAM_CHECK_SECONDS = 2.0
# Messages sent between two turns of the event loop (a few milliseconds of work).
_YIELD_EVERY = 64


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


@dataclass(frozen=True, slots=True)
class Publication:
    """What one event of the log turns into: its messages, the event first, same headers."""

    position: int
    headers: dict[str, str]
    messages: list[tuple[str, bytes]]  # (subject, payload)


def publication_of(
    namespace: Namespace, position: int, event: Any, jobs: dict[tuple[str, int], Job]
) -> Publication:
    """An event's messages; `jobs` holds the job at this event's version if its order needs it."""
    record = relayed(position, event)
    headers = {
        protocol.MSG_ID_HEADER: protocol.event_msg_id(record.aggregate_id, record.version),
        protocol.EVENT_TYPE_HEADER: record.type,
        protocol.POSITION_HEADER: str(position),
    }
    messages = [(namespace.events_subject(record.aggregate_id), _encode(record))]
    messages += orders_of(namespace, record.aggregate_id, event, jobs)
    return Publication(position=position, headers=headers, messages=messages)


def orders_of(
    ns: Namespace, job_id: str, event: Any, jobs: dict[tuple[str, int], Job]
) -> list[tuple[str, bytes]]:
    """The assignment or cancel order an event implies, if any."""
    match event:
        case Job.Assigned(miner_id=miner_id):
            job = jobs[(job_id, event.originator_version)]
            return [(ns.assignments_subject(miner_id), _encode(assignment_of(job, event)))]
        case Job.CancelRequested() | Job.TimedOut():
            job = jobs[(job_id, event.originator_version)]
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


class _Reply(msgspec.Struct):
    """JetStream's answer to a publish: an acknowledgement, or `error` with its code."""

    error: dict[str, Any] | None = None


_decode_reply = msgspec.json.Decoder(_Reply).decode


class AckedPublisher:
    """Publishes to JetStream without waiting: each publish returns a future of its ack.

    nats-py's `publish_async` does the same, but (in 2.16) it never completes the
    future of a message JetStream refused: its reply handler calls `APIError.from_error`,
    which raises instead of returning, so only a timeout would notice a full stream. Its
    own cap on pending publishes also blocks without a timeout unless each publish waits
    on it through `wait_for`, a task and a socket write per message. Here every reply,
    error or not, completes its future; the caller bounds how many are pending and how
    long each may take.
    """

    def __init__(self, client: NatsClient) -> None:
        self._client = client
        self._inbox = ""
        self._subscription: Subscription | None = None
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._sent = 0

    async def start(self) -> None:
        """Subscribe to the replies (the client renews the subscription on reconnects)."""
        self._inbox = self._client.new_inbox()
        self._subscription = await self._client.subscribe(f"{self._inbox}.*", cb=self._on_reply)

    async def close(self) -> None:
        """Stop listening for replies; futures still pending never complete."""
        if self._subscription is not None:
            with contextlib.suppress(NatsError):  # a closed connection took it along already
                await self._subscription.unsubscribe()
            self._subscription = None

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[None]:
        """Send a message; the future completes when JetStream stored or refused it."""
        self._sent += 1
        token = str(self._sent)
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[token] = ack
        # Done in any way (acknowledged, refused, or cancelled after a timeout): forget it.
        ack.add_done_callback(lambda _: self._pending.pop(token, None))
        try:
            await self._client.publish(
                subject, payload, reply=f"{self._inbox}.{token}", headers=headers
            )
        except BaseException:
            ack.cancel()
            raise
        return ack

    async def _on_reply(self, msg: Msg) -> None:
        ack = self._pending.get(msg.subject.rpartition(".")[2])
        if ack is None or ack.done():
            return  # the publish gave up on it (timed out) before it came
        if msg.headers and msg.headers.get(Header.STATUS) == "503":
            ack.set_exception(NoStreamResponseError())  # no stream listens on the subject
            return
        try:
            error = _decode_reply(msg.data).error
        except msgspec.DecodeError as unreadable:
            ack.set_exception(NatsError(f"unreadable JetStream reply: {unreadable}"))
            return
        if error is None:
            ack.set_result(None)
        else:
            ack.set_exception(
                APIError(
                    code=error.get("code"),
                    err_code=error.get("err_code"),
                    description=error.get("description"),
                )
            )


@dataclass(slots=True)
class _InFlight:
    position: int
    closes_position: bool  # the last message of its event: once acknowledged, so is the event
    subject: str
    ack: asyncio.Future[None]
    deadline: float  # on the event loop's clock


class PublishWindow:
    """JetStream publishes in flight, oldest first, at most `size` at a time.

    `acknowledged` is the end of the acknowledged prefix: every message of every event
    up to that position was acknowledged. It never passes a message that was not, even
    when later ones were: those are sent again after a failure, and deduplicated.
    """

    def __init__(
        self,
        publisher: AckedPublisher,
        *,
        size: int,
        timeout: float,
        acknowledged: int,
        connected: Callable[[], bool],
    ) -> None:
        if size < 1:
            raise ValueError(f"a publish window holds at least one message, not {size}")
        self._publisher = publisher
        self._size = size
        self._timeout = timeout
        self._connected = connected
        self._in_flight: deque[_InFlight] = deque()
        self._unyielded = 0  # messages sent since the event loop last ran anything else
        self.acknowledged = acknowledged

    async def publish(self, publication: Publication) -> None:
        """Send an event's messages once the window has room; raise if a publish failed."""
        last = len(publication.messages) - 1
        for index, (subject, payload) in enumerate(publication.messages):
            while len(self._in_flight) >= self._size:
                await self._make_room()
            if not self._connected():
                # Sent now, it would wait in the client's buffer and go out after the
                # reconnection, possibly stored before earlier messages lost with the
                # connection: stop instead, and start again from what was acknowledged.
                await self.settle()
                raise ConnectionReconnectingError
            try:
                ack = await self._publisher.publish(subject, payload, publication.headers)
            except NATS_DOWN:
                await self.settle()
                raise
            deadline = asyncio.get_running_loop().time() + self._timeout
            self._in_flight.append(
                _InFlight(publication.position, index == last, subject, ack, deadline)
            )
            self._unyielded += 1
            if self._unyielded >= _YIELD_EVERY:
                # Let the client's flusher send what is queued, and the process's other
                # tasks (the API) run: a batch must not hold the event loop for long.
                self._unyielded = 0
                await asyncio.sleep(0)

    async def settle(self) -> None:
        """Wait for every publish in flight, oldest first, each until its deadline.

        The acknowledged prefix grows up to the first failure, which is raised once
        nothing is in flight any more (so the next attempt starts from a quiet window).
        """
        failure: BaseException | None = None
        while self._in_flight:
            entry = self._in_flight.popleft()
            error = await self._outcome(entry)
            if failure is None and error is not None:
                failure = error
            elif failure is None and entry.closes_position:
                self.acknowledged = entry.position
        if failure is not None:
            raise failure

    async def _make_room(self) -> None:
        """Wait for the oldest publish, then let go of every finished one at the front."""
        oldest = self._in_flight[0]
        if not oldest.ack.done():
            remaining = oldest.deadline - asyncio.get_running_loop().time()
            await asyncio.wait((oldest.ack,), timeout=max(remaining, 0.0))
        while self._in_flight and self._in_flight[0].ack.done():
            entry = self._in_flight[0]
            if entry.ack.cancelled() or entry.ack.exception() is not None:
                await self.settle()  # raises that failure
            self._in_flight.popleft()
            if entry.closes_position:
                self.acknowledged = entry.position
        if len(self._in_flight) >= self._size:
            await self.settle()  # the oldest is past its deadline: raises TimeoutError

    async def _outcome(self, entry: _InFlight) -> BaseException | None:
        """None once JetStream acknowledged the message, else what went wrong."""
        if not entry.ack.done():
            remaining = entry.deadline - asyncio.get_running_loop().time()
            if remaining > 0:
                await asyncio.wait((entry.ack,), timeout=remaining)
        if not entry.ack.done():
            entry.ack.cancel()  # the publisher forgets it: a late acknowledgement is ignored
        if entry.ack.cancelled():
            return TimeoutError(
                f"JetStream did not acknowledge the message of position {entry.position} "
                f"on {entry.subject} within {self._timeout:g} s"
            )
        return entry.ack.exception()


class Relay:
    """Publishes the log to JetStream in order, from a tracked position, exactly once."""

    def __init__(
        self,
        ledger: JobLedger,
        dsn: str,
        bus: Bus,
        namespace: Namespace,
        *,
        batch_size: int = 500,
        window: int = PUBLISH_WINDOW,
        publish_timeout: float = PUBLISH_TIMEOUT_SECONDS,
    ) -> None:
        self._ledger = ledger
        self._dsn = dsn
        self._bus = bus
        self._namespace = namespace
        self._batch_size = batch_size
        self._window = window
        self._publish_timeout = publish_timeout

    async def run(self) -> None:
        """Relay forever: wait for leadership, then follow the log; survive lost services."""
        js = await self._bus.jetstream()
        publisher = AckedPublisher(self._bus.client)
        await publisher.start()
        try:
            await self._relay(js, publisher)
        finally:
            await publisher.close()

    async def _relay(self, js: JetStreamContext, publisher: AckedPublisher) -> None:
        backoff = Backoff()
        streams_ready = False
        while True:
            try:
                if not streams_ready:
                    await ensure_streams(js, self._namespace, self._bus.stream_replicas)
                    streams_ready = True
                await self._lead(publisher)
            except NoStreamResponseError:
                # No stream took a message: one is gone (deleted, or a new server), or a
                # cluster is electing its leader after losing a node. Only the first needs
                # ensure_streams (which waits for the meta leader); the second, a pause.
                streams_ready = not await self._streams_missing(js)
                delay = backoff.next_delay()
                log.warning(
                    "relay paused (no stream took a message%s); retrying in %.1f s",
                    "" if streams_ready else ": a stream is missing, creating it",
                    delay,
                )
                await asyncio.sleep(delay)
            except (*DATABASE_DOWN, *NATS_DOWN) as error:
                delay = backoff.next_delay()
                log.warning(
                    "relay paused (%s: %s); retrying in %.1f s", type(error).__name__, error, delay
                )
                await asyncio.sleep(delay)

    async def _streams_missing(self, js: JetStreamContext) -> bool:
        """True if JetStream says one of the relay's streams does not exist."""
        try:
            async with asyncio.timeout(_STREAM_CHECK_SECONDS):
                for what in RELAY_STREAMS:
                    await js.stream_info(self._namespace.stream_name(what))
        except NotFoundError:
            return True
        except NATS_DOWN:
            return False  # cannot tell now: ask again after the next such failure
        return False

    async def _lead(self, publisher: AckedPublisher) -> None:
        channel = self._ledger.recorder.channel_name  # type: ignore[attr-defined]
        async with (
            await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn,
            await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as listener,
        ):
            # Session lock: held while this connection lives, released if it dies.
            await _wait_for_lock(conn)
            log.info("relay is publishing (this process holds the relay lock)")
            # The position only spares republishing after a crash (and republished
            # messages are dropped as duplicates), so its updates need not wait for the
            # WAL flush: a PostgreSQL crash can only move it back a little.
            await conn.execute("SET synchronous_commit TO off")
            await conn.execute(
                "INSERT INTO jobledger_projection_tracking (projection, position) "
                "VALUES (%s, 0) ON CONFLICT DO NOTHING",
                (RELAY_NAME,),
            )
            await listener.execute(f'LISTEN "{channel}"')
            recorded = await _position(conn)
            window = PublishWindow(
                publisher,
                size=self._window,
                timeout=self._publish_timeout,
                acknowledged=recorded,
                connected=lambda: self._bus.is_connected,
            )
            sent = recorded
            try:
                while True:
                    publications = await to_thread.run_sync(self._read, sent + 1)
                    if not publications:
                        await window.settle()
                        if window.acknowledged > recorded:
                            recorded = await _advance(conn, window.acknowledged)
                        # A NOTIFY from the store wakes us at once; the timeout bounds a lost one.
                        async for _ in listener.notifies(timeout=1.0, stop_after=1):
                            pass
                        continue
                    for publication in publications:
                        await window.publish(publication)
                    sent = publications[-1].position
                    if window.acknowledged > recorded:
                        recorded = await _advance(conn, window.acknowledged)
            finally:
                # Whatever stopped us (NATS, PostgreSQL, shutdown), keep what was
                # acknowledged. If PostgreSQL is what failed this cannot be written; the
                # next leader then republishes from further back, deduplicated.
                if window.acknowledged > recorded:
                    with contextlib.suppress(*DATABASE_DOWN):
                        await _advance(conn, window.acknowledged)

    def _read(self, start: int) -> list[Publication]:
        """The next batch of the log as messages; two queries whatever the batch holds."""
        batch = self._ledger.read_log(start, self._batch_size)
        wanted = [
            (job_id_of(event.originator_id), event.originator_version)
            for _, event in batch
            if isinstance(event, _NEEDS_JOB)
        ]
        jobs = self._ledger.jobs_at(wanted)
        return [publication_of(self._namespace, seq, event, jobs) for seq, event in batch]


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


async def _advance(conn: psycopg.AsyncConnection[Any], position: int) -> int:
    await conn.execute(
        "UPDATE jobledger_projection_tracking SET position = %s WHERE projection = %s",
        (position, RELAY_NAME),
    )
    return position


async def relay_position(dsn: str) -> int:
    """How far the relay has published (for operators and tests)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await _position(conn)
