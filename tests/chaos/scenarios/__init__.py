"""The scenarios, each a `run(lab, seconds) -> Result`, with their short and full lengths."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tests.chaos.lab import Lab
from tests.chaos.result import Result
from tests.chaos.scenarios import api_killed, postgres_restarted


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    run: Callable[[Lab, float], Result]
    short_seconds: float  # in the test suite
    full_seconds: float  # in scripts/chaos


SCENARIOS = [
    Scenario(
        "api-killed",
        "kill -9 of an API process every few seconds under steady submissions",
        api_killed.run,
        short_seconds=12,
        full_seconds=120,
    ),
    Scenario(
        "postgres-restarted",
        "PostgreSQL stopped and started again under load",
        postgres_restarted.run,
        short_seconds=12,
        full_seconds=90,
    ),
]
BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}
