"""Pauses between retries: growing while failures come close together, short again after calm."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class Backoff:
    """The next pause doubles up to `most`, and starts at `first` again after `calm` seconds."""

    def __init__(self, first: float = 0.1, most: float = 5.0, calm: float = 30.0) -> None:
        self._first = first
        self._most = most
        self._calm = calm
        self._delay = 0.0
        self._last_failure = -float("inf")

    def next_delay(self) -> float:
        """Seconds to wait before retrying after a failure now."""
        now = time.monotonic()
        if now - self._last_failure > self._calm:
            self._delay = self._first
        else:
            self._delay = min(self._delay * 2, self._most)
        self._last_failure = now
        return self._delay


def keep_running(
    work: Callable[[threading.Event], None],
    stop: threading.Event,
    *,
    name: str,
    log: logging.Logger,
    down: tuple[type[BaseException], ...],
) -> None:
    """Run a background thread's `work` until `stop`: a lost dependency (`down`) is a
    warning, anything else is logged with its traceback; either way it starts again later.
    """
    backoff = Backoff(first=0.1, most=5.0)
    while not stop.is_set():
        try:
            work(stop)
        except down as error:
            delay = backoff.next_delay()
            log.warning("%s lost the database (%s); retrying in %.1fs", name, error, delay)
            stop.wait(delay)
        except Exception:
            delay = backoff.next_delay()
            log.exception("%s failed; retrying in %.1fs", name, delay)
            stop.wait(delay)
