"""Prometheus metrics of one API process: what the code counts, and what a scrape reads.

Two kinds live in the process's registry (created by `open_services`, never the
library's global one):

- instruments the code updates as things happen: submit and dispatch latency, rate-limit
  rejections, HTTP requests and their durations;
- facts read at scrape time (`LedgerProbe`): jobs by status, miners by status, how far
  the projector and the relay are behind the log, and the JetStream backlog.

A scrape never fails because a dependency is down: PostgreSQL facts are one short query
each under a statement timeout, skipped while the database watch says it is down; the
JetStream answer is cached for a couple of seconds and replaced by `jobledger_nats_up 0`
when NATS does not answer. No label ever names a job or a client: every label has a
small, fixed set of values (a route template, a status, a stream, a consumer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, get_args
from uuid import UUID

import psycopg
from anyio import to_thread
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from app.bus import NATS_DOWN, Bus
from app.database_watch import DatabaseWatch
from app.protocol import Namespace
from app.relay import RELAY_NAME
from app.store import JobLedger
from domain.jobs import JobStatus
from projections.miners import MinerStatus
from projections.queries import MINER_STATUS
from projections.tables import PROJECTION_NAME

log = logging.getLogger("jobledger.metrics")

# The Prometheus text exposition format (what Prometheus asks for first, and parses).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Each scrape-time query is cut off after this long, and all of them together after
# DATABASE_BUDGET_SECONDS (including the wait for a pooled connection).
STATEMENT_TIMEOUT_MS = 1000
DATABASE_BUDGET_SECONDS = 2.0
# JetStream is asked at most this often; scrapes in between get the last answer.
NATS_CACHE_SECONDS = 2.0
NATS_BUDGET_SECONDS = 2.0
# JetStream lists consumers 256 at a time; more pages than this are not read.
MAX_CONSUMER_PAGES = 8
# Seconds: a submission takes milliseconds, a dispatch from milliseconds to hours.
SUBMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DISPATCH_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The route label of a request that matched no route (a 404 or 405 from the router).
UNMATCHED_ROUTE = "unmatched"
# Consumers the ledger and its miners create keep their names; any other is counted as this.
OTHER_CONSUMER = "other"
JOB_STATUSES = tuple(status.value for status in JobStatus)
MINER_STATUSES: tuple[str, ...] = get_args(MinerStatus)

_JOBS_BY_STATUS = "SELECT status, sum(jobs)::bigint FROM jobledger_job_counts GROUP BY status"
_MINERS_BY_STATUS = f"""
SELECT {MINER_STATUS} AS status, count(*)
FROM jobledger_miner_views m
LEFT JOIN jobledger_miner_liveness l ON l.miner_id = m.miner_id
GROUP BY 1
"""
_POSITIONS = """
SELECT (SELECT max(notification_id) FROM {events}),
       (SELECT position FROM jobledger_projection_tracking WHERE projection = %s),
       (SELECT position FROM jobledger_projection_tracking WHERE projection = %s)
"""
_OLDEST_AFTER = """
SELECT originator_id, originator_version, topic, state FROM {events}
WHERE notification_id > %s ORDER BY notification_id LIMIT 1
"""


# ---- what a scrape reads -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lag:
    """How far a tracked reader of the log is behind its head."""

    events: int  # log positions not yet processed (positions can skip, so at most this many)
    seconds: float  # age of the oldest event not yet processed; 0 when caught up


@dataclass(frozen=True, slots=True)
class DatabaseFacts:
    """What PostgreSQL said at scrape time; `up` False means nothing else is known."""

    up: bool
    jobs: dict[str, int] = field(default_factory=dict)
    miners: dict[str, int] = field(default_factory=dict)
    head: int = 0
    projection: Lag | None = None
    relay: Lag | None = None


@dataclass(frozen=True, slots=True)
class ConsumerBacklog:
    """One JetStream consumer's backlog (or the sum over consumers counted as `other`)."""

    stream: str
    consumer: str
    pending: int  # messages not yet delivered to it
    ack_pending: int  # delivered, not yet acknowledged


@dataclass(frozen=True, slots=True)
class NatsFacts:
    """What JetStream said (possibly a couple of seconds ago); `up` False: it did not answer."""

    up: bool
    stream_messages: dict[str, int] = field(default_factory=dict)
    consumers: list[ConsumerBacklog] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything read for one scrape."""

    database: DatabaseFacts
    nats: NatsFacts


def lag_of(head: int, position: int, oldest_unprocessed: datetime | None, now: datetime) -> Lag:
    """A reader's lag from the log head, its position and the time of its next event."""
    events = max(head - position, 0)
    if events == 0 or oldest_unprocessed is None:
        return Lag(events=events, seconds=0.0)
    return Lag(events=events, seconds=max((now - oldest_unprocessed).total_seconds(), 0.0))


def consumer_label(namespace: Namespace, name: str) -> str:
    """The consumer label: the ledger's own consumers by name, any other as `other`.

    The ingestor's and each miner's (`assignments_…`, `control_…`) are bounded by the
    fleet; ephemeral or foreign consumers could be anything, so they are summed.
    """
    if name == namespace.ingestor_consumer() or name.startswith(("assignments_", "control_")):
        return name
    return OTHER_CONSUMER


def summed_backlogs(backlogs: Iterable[ConsumerBacklog]) -> list[ConsumerBacklog]:
    """Backlogs with the same stream and consumer label added together, in a stable order."""
    totals: dict[tuple[str, str], tuple[int, int]] = {}
    for backlog in backlogs:
        pending, ack_pending = totals.get((backlog.stream, backlog.consumer), (0, 0))
        totals[(backlog.stream, backlog.consumer)] = (
            pending + backlog.pending,
            ack_pending + backlog.ack_pending,
        )
    return [
        ConsumerBacklog(stream=stream, consumer=consumer, pending=pending, ack_pending=ack)
        for (stream, consumer), (pending, ack) in sorted(totals.items())
    ]


def families(snapshot: Snapshot) -> list[Metric]:
    """A snapshot's scrape-time families; a down dependency's are left out (absent, not 0)."""
    database, nats = snapshot.database, snapshot.nats
    found: list[Metric] = [
        _gauge(
            "jobledger_postgres_up", "1 if the scrape could read PostgreSQL, else 0", database.up
        ),
        _gauge(
            "jobledger_nats_up", "1 if JetStream answered the last consumer query, else 0", nats.up
        ),
    ]
    if database.up:
        jobs = GaugeMetricFamily(
            "jobledger_jobs",
            "Jobs in each status, from the views (the whole ledger)",
            labels=["status"],
        )
        for status in sorted({*JOB_STATUSES, *database.jobs}):
            jobs.add_metric([status], database.jobs.get(status, 0))
        miners = GaugeMetricFamily(
            "jobledger_miners",
            "Registered miners by status (online: a heartbeat within the lease)",
            labels=["status"],
        )
        for status in sorted({*MINER_STATUSES, *database.miners}):
            miners.add_metric([status], database.miners.get(status, 0))
        found += [
            jobs,
            miners,
            _gauge(
                "jobledger_log_position", "Position of the newest event in the log", database.head
            ),
        ]
        for name, what, lag in (
            ("projection", "the projector (views)", database.projection),
            ("relay", "the NATS relay", database.relay),
        ):
            if lag is not None:
                found += [
                    _gauge(
                        f"jobledger_{name}_lag_events",
                        f"Log positions {what} has not processed yet",
                        lag.events,
                    ),
                    _gauge(
                        f"jobledger_{name}_lag_seconds",
                        f"Age of the oldest event {what} has not processed yet (0 when caught up)",
                        lag.seconds,
                    ),
                ]
    if nats.up:
        messages = GaugeMetricFamily(
            "jobledger_nats_stream_messages",
            "Messages stored in each ledger stream",
            labels=["stream"],
        )
        for stream, count in sorted(nats.stream_messages.items()):
            messages.add_metric([stream], count)
        pending = GaugeMetricFamily(
            "jobledger_nats_consumer_pending",
            "Messages not yet delivered to a consumer",
            labels=["stream", "consumer"],
        )
        ack_pending = GaugeMetricFamily(
            "jobledger_nats_consumer_ack_pending",
            "Messages delivered to a consumer and not yet acknowledged",
            labels=["stream", "consumer"],
        )
        for backlog in nats.consumers:
            pending.add_metric([backlog.stream, backlog.consumer], backlog.pending)
            ack_pending.add_metric([backlog.stream, backlog.consumer], backlog.ack_pending)
        found += [messages, pending, ack_pending]
    return found


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


class _ScrapeFacts(Collector):
    """The registry's view of the latest snapshot, set just before each exposition."""

    def __init__(self) -> None:
        self.latest: Snapshot | None = None

    def collect(self) -> Iterator[Metric]:
        """The snapshot's families (none before the first scrape)."""
        if self.latest is not None:
            yield from families(self.latest)


# ---- reading the facts ---------------------------------------------------------------


class LedgerProbe:
    """Reads the scrape-time facts from PostgreSQL and JetStream, bounded in time."""

    def __init__(
        self,
        *,
        pool: AsyncConnectionPool[Any],
        database: DatabaseWatch,
        ledger: JobLedger,
        bus: Bus,
        namespace: Namespace,
        lease_seconds: float,
    ) -> None:
        self._pool = pool
        self._database = database
        self._ledger = ledger
        self._bus = bus
        self._namespace = namespace
        self._lease_seconds = lease_seconds
        recorder = ledger.recorder
        assert isinstance(recorder, PostgresApplicationRecorder)  # postgres_env is the only one
        events = sql.Identifier(recorder.datastore.schema, recorder.events_table_name)
        self._positions = sql.SQL(_POSITIONS).format(events=events)
        self._oldest_after = sql.SQL(_OLDEST_AFTER).format(events=events)
        self._nats_lock = asyncio.Lock()
        self._nats: NatsFacts | None = None
        self._nats_at = 0.0

    async def read(self) -> Snapshot:
        """Both sides at once; neither raises (a failure reads as that side being down)."""
        database, nats = await asyncio.gather(self.read_database(), self.read_nats())
        return Snapshot(database=database, nats=nats)

    async def read_database(self) -> DatabaseFacts:
        """Jobs, miners and lags, each one short query, in one read-only transaction."""
        if not self._database.up:
            return DatabaseFacts(up=False)  # the watch saw it down: do not wait on it
        try:
            async with (
                asyncio.timeout(DATABASE_BUDGET_SECONDS),
                self._pool.connection(timeout=DATABASE_BUDGET_SECONDS) as conn,
                conn.transaction(),
            ):
                await conn.execute("SET TRANSACTION READ ONLY")
                await conn.execute(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
                return await self._read_facts(conn)
        except (psycopg.Error, TimeoutError) as error:  # PoolTimeout is a psycopg.Error too
            log.warning("metrics: could not read PostgreSQL (%s: %s)", type(error).__name__, error)
            return DatabaseFacts(up=False)

    async def _read_facts(self, conn: psycopg.AsyncConnection[Any]) -> DatabaseFacts:
        jobs = await (await conn.execute(_JOBS_BY_STATUS)).fetchall()
        miners = await (await conn.execute(_MINERS_BY_STATUS, (self._lease_seconds,))).fetchall()
        found = await (
            await conn.execute(self._positions, (PROJECTION_NAME, RELAY_NAME))
        ).fetchone()
        assert found is not None  # a SELECT of scalar subqueries always has its one row
        head, projected, relayed = (int(value or 0) for value in found)
        now = datetime.now(UTC)
        lags = []
        for position in (projected, relayed):
            oldest = await self._oldest_after_position(conn, position) if head > position else None
            lags.append(lag_of(head, position, oldest, now))
        return DatabaseFacts(
            up=True,
            jobs={str(status): int(count) for status, count in jobs},
            miners={str(status): int(count) for status, count in miners},
            head=head,
            projection=lags[0],
            relay=lags[1],
        )

    async def _oldest_after_position(
        self, conn: psycopg.AsyncConnection[Any], position: int
    ) -> datetime | None:
        """When the first event after `position` happened (its timestamp is in its state)."""
        row = await (await conn.execute(self._oldest_after, (position,))).fetchone()
        if row is None:
            return None
        originator_id, version, topic, state = row
        stored = StoredEvent(
            originator_id=UUID(str(originator_id)),
            originator_version=int(version),
            topic=str(topic),
            state=bytes(state),
        )
        # Decoding is CPU work whose size depends on the event (an inline result): off the loop.
        event = await to_thread.run_sync(self._ledger.mapper.to_domain_event, stored)
        timestamp: datetime = getattr(event, "timestamp")  # noqa: B009 - not in the protocol
        return timestamp

    async def read_nats(self) -> NatsFacts:
        """The JetStream backlog, asked at most every NATS_CACHE_SECONDS."""
        loop = asyncio.get_running_loop()
        async with self._nats_lock:  # concurrent scrapes share one question
            if self._nats is None or loop.time() - self._nats_at >= NATS_CACHE_SECONDS:
                self._nats = await self._ask_jetstream()
                self._nats_at = loop.time()
            return self._nats

    async def _ask_jetstream(self) -> NatsFacts:
        if not self._bus.is_connected:
            return NatsFacts(up=False)
        js = self._bus.client.jetstream(timeout=NATS_BUDGET_SECONDS)
        try:
            async with asyncio.timeout(NATS_BUDGET_SECONDS):
                answers = await asyncio.gather(
                    *(self._stream_backlog(js, spec.name) for spec in self._namespace.streams())
                )
        except NATS_DOWN as error:  # TimeoutError included
            log.warning("metrics: JetStream did not answer (%s: %s)", type(error).__name__, error)
            return NatsFacts(up=False)
        messages = {name: count for name, count, _ in answers if count is not None}
        backlogs = [backlog for _, _, found in answers for backlog in found]
        return NatsFacts(up=True, stream_messages=messages, consumers=summed_backlogs(backlogs))

    async def _stream_backlog(
        self, js: JetStreamContext, stream: str
    ) -> tuple[str, int | None, list[ConsumerBacklog]]:
        """A stream's message count and its consumers' backlogs (none if it does not exist yet)."""
        try:
            info = await js.stream_info(stream)
            consumers: list[ConsumerInfo] = []
            for _ in range(MAX_CONSUMER_PAGES):
                page = await js.consumers_info(stream, offset=len(consumers))
                consumers += page
                if len(page) < 256:
                    break
        except NotFoundError:
            return stream, None, []  # created by the relay or ingestor when they start
        backlogs = [
            ConsumerBacklog(
                stream=stream,
                consumer=consumer_label(self._namespace, consumer.name),
                pending=consumer.num_pending or 0,
                ack_pending=consumer.num_ack_pending or 0,
            )
            for consumer in consumers
        ]
        return stream, info.state.messages, backlogs


# ---- the registry ------------------------------------------------------------------------


class LedgerMetrics:
    """The process's metrics registry, its instruments, and the exposition of a scrape."""

    def __init__(self, registry: CollectorRegistry, probe: LedgerProbe) -> None:
        self.registry = registry
        self._probe = probe
        self.submit_latency = Histogram(
            "jobledger_submit_latency_seconds",
            "From a submission's arrival to its 201 (created: a new job; replayed: an "
            "Idempotency-Key seen before)",
            ["outcome"],
            buckets=SUBMIT_BUCKETS,
            registry=registry,
        )
        self.dispatch_latency = Histogram(
            "jobledger_dispatch_latency_seconds",
            "From a job becoming pending (submitted or requeued) to its assignment",
            buckets=DISPATCH_BUCKETS,
            registry=registry,
        )
        self.rate_limited = Counter(
            "jobledger_rate_limited",
            "Requests refused with 429 because their key used up its rate limit",
            ["role"],
            registry=registry,
        )
        self.http_requests = Counter(
            "jobledger_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "jobledger_http_request_duration_seconds",
            "From a request's arrival until its response was sent, by method and route template",
            ["method", "route"],
            registry=registry,
        )
        build = Gauge(
            "jobledger_build_info", "The running jobledger version", ["version"], registry=registry
        )
        build.labels(_version()).set(1)
        # Series that exist from the start, so that rate() sees their first increase.
        for outcome in ("created", "replayed"):
            self.submit_latency.labels(outcome)
        for role in ("client", "auditor", "admin"):
            self.rate_limited.labels(role)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self._facts = _ScrapeFacts()
        registry.register(self._facts)

    def observe_request(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """Count one answered HTTP request; unknown methods and unmatched paths are lumped."""
        method = method if method in HTTP_METHODS else "OTHER"
        route = route or UNMATCHED_ROUTE
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_duration.labels(method, route).observe(seconds)

    async def exposition(self) -> bytes:
        """The text a scrape answers: the facts read now, with every instrument."""
        snapshot = await self._probe.read()
        # No await between setting the facts and rendering them: concurrent scrapes
        # on this event loop cannot swap each other's snapshot.
        self._facts.latest = snapshot
        return generate_latest(self.registry)


def _version() -> str:
    try:
        return metadata.version("jobledger")
    except metadata.PackageNotFoundError:
        return "unknown"
