"""The NATS connection of a process: connects in the background and reconnects forever.

A process starts even while NATS is down (its health check then answers 503);
the first connection is retried with backoff, later losses are handled by
nats-py's own reconnect loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError

log = logging.getLogger("jobledger.bus")


class Bus:
    """One NATS client for the process, available once `connected` is set."""

    def __init__(self, servers: list[str], name: str) -> None:
        self._servers = servers
        self._name = name
        self._client: NatsClient | None = None
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def is_connected(self) -> bool:
        """True while the client holds a live connection to a NATS server."""
        return self._client is not None and self._client.is_connected

    async def start(self) -> None:
        """Begin connecting in the background."""
        self._task = asyncio.create_task(self._connect(), name="nats-connect")

    async def close(self) -> None:
        """Stop connecting, or close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            await self._client.close()

    async def _connect(self) -> None:
        backoff = 0.2
        while True:
            try:
                self._client = await nats.connect(
                    self._servers,
                    name=self._name,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    connect_timeout=2,
                )
            except (OSError, NatsError, TimeoutError) as error:
                log.warning("cannot reach NATS at %s (%s); retrying", self._servers, error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                url = self._client.connected_url
                log.info("connected to NATS at %s", url.netloc if url else self._servers)
                self.connected.set()
                return
