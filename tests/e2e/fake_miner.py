"""A miner played by the test itself: it takes a job straight in the ledger and reports over NATS.

For the cases a well-behaved agent never produces (a wrong checksum, a result that
vanished before the completion), the test holds an attempt and speaks the protocol.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import nats

from app import protocol
from app.store import JobLedger, postgres_env
from tests.e2e.conftest import Served


def hold(served: Served, job_id: str, miner_id: str) -> int:
    """Assign a pending job to `miner_id` directly in the served ledger; returns the attempt."""
    ledger = JobLedger(postgres_env(served.database_url))
    try:
        ledger.change_job(job_id, lambda job: job.assign(miner_id))
        return ledger.job(job_id).attempt
    finally:
        ledger.close()


def report(served: Served, nats_url: str, job_id: str, message: protocol.Report) -> None:
    """Publish one report to the served ledger's reports stream, as a miner does."""

    async def publish() -> None:
        connection = await nats.connect(nats_url)
        try:
            js = connection.jetstream()
            await js.publish(
                protocol.Namespace(served.nats_prefix).reports_subject(job_id),
                protocol.encoder.encode(message),
                headers={protocol.MSG_ID_HEADER: protocol.report_msg_id(job_id, message)},
            )
        finally:
            await connection.close()

    asyncio.run(publish())


def completed(miner_id: str, attempt: int, result: protocol.StoredResult) -> protocol.Completed:
    """A completion naming a stored result."""
    return protocol.Completed(
        miner_id=miner_id,
        attempt=attempt,
        at=datetime.now(UTC),
        result=result,
        metrics=protocol.Metrics(execution_seconds=0.5),
    )
