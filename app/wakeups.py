"""Wake-ups for watch streams: NATS says "job X has a new event", the store says which.

`GET /v1/jobs/{job_id}/watch` (app/api/watch.py) streams a job's stored events. The relay
publishes every committed event to `{prefix}.events.{job_id}`; a stream treats such a
message only as a wake-up and reads the event store (the truth) after the last sequence it
sent. This module holds, for one process, a core NATS subscription per watched job, shared
by all the streams watching it: opened when the first stream joins, closed when the last
one leaves, and all closed when the process stops.

NATS is not trusted to deliver: streams also read the store on a timer, so a lost message,
a relay that is behind or a NATS outage only delays an event, never stalls a stream.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from app.bus import NATS_DOWN, Bus
from app.protocol import Namespace
from app.tasks import cancel_all

log = logging.getLogger("jobledger.wakeups")
# How long a new stream waits for NATS to confirm its interest before relying on its timer.
FLUSH_SECONDS = 1
# How long closing waits for the last unsubscriptions before it cancels them.
CLOSE_SECONDS = 5.0


@dataclass
class _Watched:
    """One watched job: its streams' wake-up events and the subscription they share."""

    subscription: asyncio.Task[Subscription | None]
    waiters: set[asyncio.Event] = field(default_factory=set)


class JobWakeups:
    """Per-job wake-up events for this process's watch streams, set from NATS messages."""

    def __init__(self, bus: Bus, namespace: Namespace) -> None:
        self._bus = bus
        self._namespace = namespace
        self._jobs: dict[str, _Watched] = {}
        self._unsubscribing: set[asyncio.Task[None]] = set()
        self._closed = False
        # Set once the process is stopping: every stream ends so its connection can close.
        self.closing = False

    def join(self, job_id: str) -> asyncio.Event:
        """A new stream of the job: its wake-up event. Pair with `leave`, whatever happens.

        Synchronous, so that a stream that registered can always unregister; await
        `ready` before reading the store, so nothing published after that read is missed.
        """
        wake = asyncio.Event()
        if self.closing:
            wake.set()
            return wake
        watched = self._jobs.get(job_id)
        if watched is None:
            watched = self._jobs[job_id] = _Watched(self._subscribe_soon(job_id))
        elif _failed(watched.subscription):
            watched.subscription = self._subscribe_soon(job_id)  # NATS may be back: try again
        watched.waiters.add(wake)
        return wake

    async def ready(self, job_id: str) -> None:
        """Return once NATS has the job's subscription, or could not take it (timers serve)."""
        watched = self._jobs.get(job_id)
        if watched is not None:
            # Shielded: a stream that goes away meanwhile must not cancel what others share.
            await asyncio.shield(watched.subscription)

    def leave(self, job_id: str, wake: asyncio.Event) -> None:
        """The stream ended; the last one to leave a job closes its subscription."""
        watched = self._jobs.get(job_id)
        if watched is None or wake not in watched.waiters:
            return
        watched.waiters.discard(wake)
        if watched.waiters:
            return
        del self._jobs[job_id]
        if not self._closed:
            self._unsubscribe_soon(watched.subscription)

    def end_streams(self) -> None:
        """Wake every stream with `closing` set, so each ends and its connection can close.

        Called when the server begins to shut down: it waits for open responses, and a
        watch of a job that is still running would otherwise hold it forever. Clients
        reconnect with Last-Event-ID, to another process or to this one restarted.
        """
        self.closing = True
        for watched in self._jobs.values():
            for wake in watched.waiters:
                wake.set()

    async def __aenter__(self) -> JobWakeups:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """End every stream and drop every subscription (before the NATS connection closes)."""
        self.end_streams()
        self._closed = True
        for watched in self._jobs.values():
            self._unsubscribe_soon(watched.subscription)
        self._jobs.clear()
        if self._unsubscribing:
            _, late = await asyncio.wait(self._unsubscribing, timeout=CLOSE_SECONDS)
            await cancel_all(late)

    def watched_jobs(self) -> int:
        """How many jobs have a subscription (for tests and metrics)."""
        return len(self._jobs)

    def _subscribe_soon(self, job_id: str) -> asyncio.Task[Subscription | None]:
        return asyncio.create_task(self._subscribe(job_id), name=f"watch-subscribe-{job_id}")

    async def _subscribe(self, job_id: str) -> Subscription | None:
        """Subscribe to the job's events subject; None if NATS cannot be reached now."""
        if not self._bus.connected.is_set():
            return None  # never connected yet: the streams' timers serve until a later join
        client = self._bus.client

        async def wake(_: Msg) -> None:
            self._wake(job_id)

        try:
            subscription = await client.subscribe(self._namespace.events_subject(job_id), cb=wake)
        except NATS_DOWN as error:
            log.info("cannot subscribe to the events of %s (%s); polling the store", job_id, error)
            return None
        if client.is_connected:
            # A round trip: once the server answers, it has the interest, so every event
            # the relay publishes from now on reaches us. (While NATS reconnects, nats-py
            # sends the subscription again on its own.)
            try:
                await client.flush(timeout=FLUSH_SECONDS)
            except NATS_DOWN as error:
                log.info("NATS did not confirm the watch of %s in time (%s)", job_id, error)
        return subscription

    def _unsubscribe_soon(self, subscribing: asyncio.Task[Subscription | None]) -> None:
        task = asyncio.create_task(self._unsubscribe(subscribing), name="watch-unsubscribe")
        self._unsubscribing.add(task)
        task.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, subscribing: asyncio.Task[Subscription | None]) -> None:
        subscription = await subscribing
        if subscription is None:
            return
        try:
            await subscription.unsubscribe()
        except NATS_DOWN as error:
            # The connection is gone or going, and its subscriptions with it.
            log.info("unsubscribing %s: %s", subscription.subject, error)

    def _wake(self, job_id: str) -> None:
        watched = self._jobs.get(job_id)
        for wake in watched.waiters if watched else ():
            wake.set()


def _failed(subscribing: asyncio.Task[Subscription | None]) -> bool:
    """Whether a finished subscription attempt found NATS unreachable."""
    return subscribing.done() and not subscribing.cancelled() and subscribing.result() is None
