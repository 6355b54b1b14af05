"""Pauses between retries: growing while failures come close together, short again after calm."""

from __future__ import annotations

import time


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
