"""Fixtures shared by the integration tests."""

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from app.store import JobLedger, postgres_env


@pytest.fixture
def ledger(database_url: str) -> Iterator[JobLedger]:
    """The ledger on a fresh database (its event table is created on first use)."""
    ledger = JobLedger(postgres_env(database_url))
    yield ledger
    ledger.close()


@pytest.fixture
async def pg_pool(database_url: str) -> AsyncIterator[AsyncConnectionPool[AsyncConnection[Any]]]:
    """An open async pool on a fresh, empty database, closed after the test."""
    pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
        database_url, open=False, min_size=1, max_size=10
    )
    await pool.open()
    try:
        yield pool
    finally:
        await pool.close()
