"""Retry pauses grow while failures keep coming and start small again after calm."""

from __future__ import annotations

import pytest

from app import backoff as module
from app.backoff import Backoff


def test_pauses_double_up_to_the_most_and_start_over_after_calm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    backoff = Backoff(first=0.1, most=0.5, calm=30)

    delays = []
    for _ in range(5):
        delays.append(backoff.next_delay())
        clock[0] += 1
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5]

    clock[0] += 31  # a long calm: the next failure is a fresh start
    assert backoff.next_delay() == 0.1
