"""The watch stream (app/api/watch.py) and its wake-ups (app/wakeups.py) on PostgreSQL and NATS.

The stream reads a real ledger; NATS messages wake it; its timer serves when they do not
come. The served route is tested in tests/e2e/test_watch.py; these tests reach what a
served ledger cannot show cheaply: which of the two delivered an event, keepalives,
and that every stream leaves its subscription behind it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from anyio import to_thread

from app.api import watch
from app.bus import Bus
from app.protocol import Namespace
from app.store import JobLedger, postgres_env
from app.wakeups import JobWakeups
from projections import tables
from tests.integration.helpers import run_to_completion, spec
from tests.nats_names import fresh_prefix

pytestmark = pytest.mark.integration
WAIT = 10  # seconds before a frame that should come counts as missing


class CaughtUp:
    """Views that are always up to date (no projector runs here)."""

    async def wait_for(self, position: int, timeout: float) -> bool:
        return True


@dataclass
class StoreOnly:
    """What the stream uses of Services: the ledger, threads, the database watch, the views."""

    ledger: JobLedger
    database: Any = field(default_factory=lambda: SimpleNamespace(up=True))
    views: CaughtUp = field(default_factory=CaughtUp)
    settings: Any = field(default_factory=lambda: SimpleNamespace(view_wait_seconds=5.0))

    async def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await to_thread.run_sync(lambda: function(*args, **kwargs))


@pytest.fixture(scope="module")
def ledger(make_database: Callable[[], str]) -> Iterator[JobLedger]:
    """One ledger for the module: each test watches jobs of its own."""
    dsn = make_database()
    ledger = JobLedger(postgres_env(dsn))
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables.create_schema(conn)
    yield ledger
    ledger.close()


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    bus = Bus([nats_url], name="test-watch")
    await bus.start()
    await bus.connected.wait()
    yield bus
    await bus.close()


@pytest.fixture
def namespace() -> Namespace:
    return Namespace(fresh_prefix())


@pytest.fixture
async def wakeups(bus: Bus, namespace: Namespace) -> AsyncIterator[JobWakeups]:
    async with JobWakeups(bus, namespace) as wakeups:
        yield wakeups


@pytest.fixture
async def offline() -> AsyncIterator[JobWakeups]:
    """Wake-ups whose NATS connection never came up: only the timer serves."""
    async with JobWakeups(Bus(["nats://127.0.0.1:9"], name="never"), Namespace()) as wakeups:
        yield wakeups


def parse(frame: bytes) -> dict[str, str]:
    """One SSE block as its fields; a comment as {"comment": ...}."""
    fields = {}
    for line in frame.decode().strip("\n").split("\n"):
        name, _, value = line.partition(": ")
        fields[name or "comment"] = value
    return fields


def open_stream(
    ledger: JobLedger, wakeups: JobWakeups, job_id: str, *, after: int | None = None, **kw: Any
) -> AsyncIterator[bytes]:
    history = ledger.job_history_after(job_id, 0)
    return watch.job_stream(StoreOnly(ledger), wakeups, job_id, history, after, kw.get("timeout"))


async def next_frame(stream: AsyncIterator[bytes]) -> dict[str, str]:
    return parse(await asyncio.wait_for(anext(stream), WAIT))


async def rest(stream: AsyncIterator[bytes]) -> list[dict[str, str]]:
    async def collect() -> list[dict[str, str]]:
        return [parse(frame) async for frame in stream]

    return await asyncio.wait_for(collect(), WAIT)


def submitted(ledger: JobLedger) -> str:
    return ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id


async def test_a_nats_message_wakes_the_stream_without_waiting_for_the_timer(
    ledger: JobLedger,
    wakeups: JobWakeups,
    bus: Bus,
    namespace: Namespace,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watch, "POLL_SECONDS", 3600.0)  # only NATS can deliver in time
    job_id = submitted(ledger)
    stream = open_stream(ledger, wakeups, job_id)
    assert await next_frame(stream) == {"retry": "2000"}
    assert json.loads((await next_frame(stream))["data"])["job"]["status"] == "pending"
    run_to_completion(ledger, job_id)  # assigned, started, progress, completed: one commit
    # What the relay publishes after the commit; only a wake-up to the stream.
    await bus.client.publish(namespace.events_subject(job_id), b"{}")
    frames = await rest(stream)
    assert [f.get("id") for f in frames] == ["2", "3", "4", "5", None]
    assert [json.loads(f["data"])["job"]["status"] for f in frames[:4]] == [
        "assigned",
        "running",
        "running",
        "completed",
    ]
    assert frames[-1] == {"event": "end", "data": '{"status":"completed"}'}


async def test_without_nats_the_timer_still_delivers_every_event(
    ledger: JobLedger, offline: JobWakeups, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch, "POLL_SECONDS", 0.05)
    job_id = submitted(ledger)
    stream = open_stream(ledger, offline, job_id, after=0)
    assert await next_frame(stream) == {"retry": "2000"}
    assert (await next_frame(stream))["id"] == "1"
    ledger.cancel(job_id, owner=None)
    frames = await rest(stream)
    assert [(f.get("id"), f["event"]) for f in frames] == [("2", "job"), (None, "end")]
    assert json.loads(frames[0]["data"])["type"] == "JobCanceled"


async def test_keepalives_in_silence_and_a_timeout_ends_without_end(
    ledger: JobLedger, offline: JobWakeups, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch, "KEEPALIVE_SECONDS", 0.05)
    job_id = submitted(ledger)
    frames = await rest(open_stream(ledger, offline, job_id, after=1, timeout=1))
    assert frames[0] == {"retry": "2000"}
    assert frames[-1] == {"comment": "timeout: reconnect with Last-Event-ID to go on"}
    between = frames[1:-1]
    assert between, "no keepalive in a second of silence"
    assert all(frame == {"comment": "keepalive"} for frame in between)


async def test_streams_of_a_job_share_one_subscription_and_the_last_to_leave_drops_it(
    ledger: JobLedger, wakeups: JobWakeups, bus: Bus
) -> None:
    subscriptions = len(bus.client._subs)
    job_id = submitted(ledger)
    first, second = (open_stream(ledger, wakeups, job_id) for _ in range(2))
    for stream in (first, second):
        await next_frame(stream)  # retry
        await next_frame(stream)  # the current state: joined and subscribed by now
    assert wakeups.watched_jobs() == 1
    assert len(bus.client._subs) == subscriptions + 1
    await first.aclose()  # type: ignore[attr-defined]
    assert wakeups.watched_jobs() == 1
    await second.aclose()  # type: ignore[attr-defined]
    assert wakeups.watched_jobs() == 0
    for _ in range(100):
        if len(bus.client._subs) == subscriptions:
            break
        await asyncio.sleep(0.05)
    assert len(bus.client._subs) == subscriptions


async def test_ending_the_streams_ends_every_open_one_and_each_leaves(
    ledger: JobLedger, wakeups: JobWakeups
) -> None:
    streams = [open_stream(ledger, wakeups, submitted(ledger)) for _ in range(3)]
    for stream in streams:
        await next_frame(stream)
        await next_frame(stream)
    assert wakeups.watched_jobs() == 3
    wakeups.end_streams()
    for stream in streams:
        assert await rest(stream) == []  # closed at once, and without `end`: the job goes on
    assert wakeups.watched_jobs() == 0
