"""Miner liveness: every ledger process listens to heartbeats and records the latest per miner.

Heartbeats are core NATS messages (losing one is harmless: the next comes in seconds).
The listener keeps the newest per miner in memory and writes them once a second to
`jobledger_miner_liveness` (created with the views in projections/tables.py), stamped
with the database clock, so every process and the scheduler judge liveness by one
clock whatever the miners' clocks say.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec
import psycopg
from nats.aio.msg import Msg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from app import protocol
from app.bus import NATS_DOWN, Bus
from app.protocol import Namespace

log = logging.getLogger("jobledger.heartbeats")

# Only heartbeats of registered miners are kept; a stranger's is dropped in the same statement.
_UPSERT = """
INSERT INTO jobledger_miner_liveness
    (miner_id, last_heartbeat_at, reported_inflight, gpus, session, held, draining)
SELECT %s, now(), %s, %s, %s, %s, %s
WHERE EXISTS (SELECT 1 FROM jobledger_miner_views WHERE miner_id = %s)
ON CONFLICT (miner_id) DO UPDATE SET
    last_heartbeat_at = EXCLUDED.last_heartbeat_at,
    reported_inflight = EXCLUDED.reported_inflight,
    gpus = EXCLUDED.gpus,
    session = EXCLUDED.session,
    held = EXCLUDED.held,
    draining = EXCLUDED.draining
"""


class HeartbeatListener:
    """Subscribes to every miner's heartbeat and flushes the newest of each once a second."""

    def __init__(
        self, bus: Bus, pool: AsyncConnectionPool[Any], namespace: Namespace, interval: float = 1.0
    ) -> None:
        self._bus = bus
        self._pool = pool
        self._namespace = namespace
        self._interval = interval
        self._latest: dict[str, protocol.Heartbeat] = {}
        # Miners whose draining flag we know, to flush at once when it changes.
        self._draining: dict[str, bool] = {}
        self._urgent = asyncio.Event()

    async def run(self) -> None:
        """Listen and flush forever; nats-py resubscribes by itself after reconnects."""
        await self._bus.connected.wait()
        subscription = await self._bus.client.subscribe(
            self._namespace.all_heartbeats(), cb=self._receive
        )
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self._interval)
                self._urgent.clear()
                await self.flush()
        finally:
            with contextlib.suppress(*NATS_DOWN):  # shutting down: the connection may be gone
                await subscription.unsubscribe()

    async def _receive(self, message: Msg) -> None:
        try:
            beat = protocol.heartbeat_decoder.decode(message.data)
        except msgspec.DecodeError as error:
            log.warning("ignoring a malformed heartbeat on %s: %s", message.subject, error)
            return
        if self._namespace.miner_of(message.subject) != beat.miner_id:
            log.warning("ignoring a heartbeat for %s sent on %s", beat.miner_id, message.subject)
            return
        self._latest[beat.miner_id] = beat
        if self._draining.get(beat.miner_id) != beat.draining:
            # A new miner, or one that starts draining: the scheduler should know now.
            self._draining[beat.miner_id] = beat.draining
            self._urgent.set()

    async def flush(self) -> None:
        """Write the newest heartbeat of each miner heard since the last flush."""
        if not self._latest:
            return
        beats, self._latest = self._latest, {}
        rows = [
            (
                beat.miner_id,
                beat.inflight,
                Jsonb(msgspec.to_builtins(beat.gpus)),
                beat.session,
                Jsonb([[held.job_id, held.attempt] for held in beat.jobs]),
                beat.draining,
                beat.miner_id,
            )
            for beat in beats.values()
        ]
        try:
            async with self._pool.connection() as conn, conn.cursor() as cur:
                await cur.executemany(_UPSERT, rows)
        except psycopg.OperationalError as error:
            log.warning("cannot record heartbeats (%s); keeping them for the next flush", error)
            self._latest = beats | self._latest
