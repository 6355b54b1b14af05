"""The scrape-time facts of /metrics against a real database: lags, counts, and outages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from psycopg_pool import AsyncConnectionPool

from app.bus import Bus
from app.database_watch import DatabaseWatch
from app.metrics import LedgerMetrics, LedgerProbe
from app.projector import Projector
from app.protocol import Namespace
from app.services import prepare_database
from app.store import JobLedger
from tests.integration.helpers import spec

pytestmark = pytest.mark.integration


@pytest.fixture
async def prepared(database_url: str) -> AsyncIterator[tuple[JobLedger, AsyncConnectionPool[Any]]]:
    """A ledger with every table, and a pool on its database."""
    ledger = prepare_database(database_url)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(database_url, open=False, min_size=1)
    await pool.open()
    try:
        yield ledger, pool
    finally:
        await pool.close()
        ledger.close()


class WatchSays:
    """A database watch frozen in one state (DatabaseWatch's `up`, without its probing)."""

    def __init__(self, up: bool) -> None:
        self.up = up


def probe_of(ledger: JobLedger, pool: AsyncConnectionPool[Any], watch: Any) -> LedgerProbe:
    # A bus that was never started: NATS reads as down, without waiting on anything.
    bus = Bus(["nats://127.0.0.1:1"], name="unused")
    return LedgerProbe(
        pool=pool, database=watch, ledger=ledger, bus=bus, namespace=Namespace(), lease_seconds=30
    )


def parsed(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


async def test_lags_count_what_the_projector_and_relay_have_not_processed(
    prepared: tuple[JobLedger, AsyncConnectionPool[Any]], database_url: str
) -> None:
    ledger, pool = prepared
    for n in range(2):
        ledger.submit(owner="alice", spec=spec(input_text=f"job {n}"), idempotency_key=None)
    probe = probe_of(ledger, pool, DatabaseWatch(database_url))

    behind = await probe.read_database()
    assert behind.up and behind.head == ledger.head() == 2
    assert behind.projection is not None and behind.projection.events == 2
    assert behind.projection.seconds > 0  # the first submission's age
    assert behind.relay is not None and behind.relay.events == 2  # no relay ever ran
    assert behind.jobs == {}  # not projected yet

    with psycopg.connect(database_url, autocommit=True) as conn:
        Projector(ledger, database_url).catch_up(conn)
    caught_up = await probe.read_database()
    assert caught_up.projection is not None
    assert (caught_up.projection.events, caught_up.projection.seconds) == (0, 0.0)
    assert caught_up.jobs == {"pending": 2}
    assert caught_up.relay is not None and caught_up.relay.events == 2

    samples = parsed(await LedgerMetrics(CollectorRegistry(), probe).exposition())
    assert samples[("jobledger_jobs", frozenset({("status", "pending")}))] == 2
    assert samples[("jobledger_jobs", frozenset({("status", "completed")}))] == 0
    assert samples[("jobledger_miners", frozenset({("status", "online")}))] == 0
    assert samples[("jobledger_projection_lag_events", frozenset())] == 0
    assert samples[("jobledger_relay_lag_events", frozenset())] == 2
    assert samples[("jobledger_relay_lag_seconds", frozenset())] > 0
    assert samples[("jobledger_nats_up", frozenset())] == 0


async def test_a_scrape_answers_while_postgres_is_unreachable(
    prepared: tuple[JobLedger, AsyncConnectionPool[Any]],
) -> None:
    ledger, pool = prepared
    closed: AsyncConnectionPool[Any] = AsyncConnectionPool("postgresql://127.0.0.1:1/x", open=False)
    # The watch saw it go (no query is even tried), or has not yet and the query fails.
    for probe in (
        probe_of(ledger, pool, WatchSays(up=False)),
        probe_of(ledger, closed, WatchSays(up=True)),
    ):
        samples = parsed(await LedgerMetrics(CollectorRegistry(), probe).exposition())
        assert samples[("jobledger_postgres_up", frozenset())] == 0
        assert samples[("jobledger_nats_up", frozenset())] == 0
        assert not any(name == "jobledger_jobs" for name, _ in samples)  # absent, not zero
        assert samples[("process_open_fds", frozenset())] > 0
