"""Stopping asyncio tasks for sure.

On Python 3.11 `asyncio.wait_for` can swallow a cancellation when the awaited reply
arrives in the same turn of the event loop (fixed in 3.12), and nats-py awaits every
reply with it: a worker busy talking to NATS may survive one `cancel()`. So cancel
until the tasks are done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("jobledger.tasks")


async def cancel_all(tasks: Iterable[asyncio.Task[Any]], *, patience: float = 1.0) -> None:
    """Cancel the tasks, again every `patience` seconds, until every one has finished."""
    waiting = set(tasks)
    everything = list(waiting)
    rounds = 0
    while waiting:
        for task in waiting:
            task.cancel()
        _, waiting = await asyncio.wait(waiting, timeout=patience)
        rounds += 1
        if waiting:
            names = ", ".join(sorted(task.get_name() for task in waiting))
            log.info("cancelling again (round %d): %s kept running", rounds + 1, names)
    await asyncio.gather(*everything, return_exceptions=True)  # collect their outcomes
