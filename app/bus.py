"""The NATS connection of a process: connects in the background and reconnects forever.

A process starts even while NATS is down (its health check then answers 503);
the first connection is retried with backoff, later losses are handled by
nats-py's own reconnect loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

import nats
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from app.protocol import DUPLICATE_WINDOW_SECONDS, MAX_MESSAGE_BYTES, Namespace, StreamSpec

log = logging.getLogger("jobledger.bus")
# What a lost or unreachable NATS raises (nats-py timeouts are asyncio.TimeoutError too).
NATS_DOWN = (NatsError, TimeoutError, OSError)


class Bus:
    """One NATS client for the process, available once `connected` is set."""

    def __init__(self, servers: list[str], name: str, *, stream_replicas: int = 1) -> None:
        self._servers = servers
        self._name = name
        # How many copies a JetStream cluster keeps of each protocol stream.
        self.stream_replicas = stream_replicas
        self._client: NatsClient | None = None
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Since when the connection has been up without a break; None while it is down.
        self.up_since: datetime | None = None

    @property
    def is_connected(self) -> bool:
        """True while the client holds a live connection to a NATS server."""
        return self._client is not None and self._client.is_connected

    @property
    def client(self) -> NatsClient:
        """The connected client; only valid once `connected` is set."""
        if self._client is None:
            raise RuntimeError("the NATS connection is not open yet")
        return self._client

    async def jetstream(self) -> JetStreamContext:
        """The JetStream context, once the first connection succeeded."""
        await self.connected.wait()
        return self.client.jetstream()

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
                    disconnected_cb=self._lost,
                    reconnected_cb=self._regained,
                    error_cb=log_nats_error,
                )
            except (OSError, NatsError, TimeoutError) as error:
                log.warning("cannot reach NATS at %s (%s); retrying", self._servers, error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                url = self._client.connected_url
                log.info("connected to NATS at %s", url.netloc if url else self._servers)
                self.up_since = datetime.now(UTC)
                self.connected.set()
                return

    async def _lost(self) -> None:
        self.up_since = None
        log.warning("lost the NATS connection; reconnecting")

    async def _regained(self) -> None:
        self.up_since = datetime.now(UTC)
        log.info("reconnected to NATS")


async def log_nats_error(error: Exception) -> None:
    """One line per client error: a cluster node that is down is expected, not a traceback."""
    log.warning("NATS client: %s: %s", type(error).__name__, error)


def stream_config(spec: StreamSpec, replicas: int = 1) -> StreamConfig:
    """The JetStream configuration of one protocol stream (file storage, deduplicating)."""
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.WORK_QUEUE if spec.work_queue else RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW if spec.discard == "new" else DiscardPolicy.OLD,
        max_age=float(spec.max_age_seconds),  # 0: no age limit
        max_msgs=spec.max_messages,
        max_msg_size=MAX_MESSAGE_BYTES,
        duplicate_window=float(DUPLICATE_WINDOW_SECONDS),
        num_replicas=replicas,
    )


async def ensure_streams(js: JetStreamContext, namespace: Namespace, replicas: int = 1) -> None:
    """Create every protocol stream, or bring an existing one to the current settings."""
    for spec in namespace.streams():
        config = stream_config(spec, replicas)
        try:
            await js.add_stream(config)
        except BadRequestError:
            # It exists with other settings: update what JetStream lets us update.
            await js.update_stream(config)
            log.info("updated stream %s to the current settings", spec.name)
