"""The scenarios, each a `run(lab, seconds) -> Result`, with their short and full lengths."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tests.chaos.lab import Lab
from tests.chaos.result import Result
from tests.chaos.scenarios import (
    api_killed,
    nats_restarted,
    postgres_restarted,
    storms_and_races,
    suites,
    workers_killed,
)
from tests.chaos.scenarios import miners as miner_faults


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    run: Callable[[Lab, float], Result]
    short_seconds: float  # in the test suite
    full_seconds: float  # in scripts/chaos
    # False for a scenario that reruns test files scripts/test already runs.
    in_test_suite: bool = True


# In the order of issue 6's list of what must be shown.
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
    Scenario(
        "nats-restarted",
        "NATS stopped and started again (outages shorter and longer than the lease) "
        "while miners run jobs",
        nats_restarted.run,
        short_seconds=16,
        full_seconds=120,
    ),
    Scenario(
        "nats-cluster-node-killed",
        "kill -9 of a node of a 3-node JetStream cluster (R3 streams) while miners run jobs",
        nats_restarted.run_cluster,
        short_seconds=14,
        full_seconds=100,
    ),
    Scenario(
        "miner-killed",
        "kill -9 of a miner holding a running job every few seconds under steady sleep jobs",
        miner_faults.run_killed,
        short_seconds=12,
        full_seconds=150,
    ),
    Scenario(
        "miner-frozen",
        "a miner frozen (SIGSTOP) mid-job past its lease, then resumed: its late "
        "completions must be rejected and recorded",
        miner_faults.run_frozen,
        short_seconds=10,
        full_seconds=150,
    ),
    Scenario(
        "report-storm",
        "every miner report delivered 3 times, shuffled, to 1-3 concurrent ingestors",
        storms_and_races.report_storm,
        short_seconds=5,
        full_seconds=60,
    ),
    Scenario(
        "workers-killed",
        "kill -9 of the process whose projector and relay catch up on a long log, again "
        "and again (its length sizes the log: 800 events a second, a kill per 12 s)",
        workers_killed.run,
        short_seconds=5,
        full_seconds=125,
    ),
    Scenario(
        "command-races",
        "50 concurrent cancels (over HTTP) and completions of one job, job after job",
        storms_and_races.command_races,
        short_seconds=8,
        full_seconds=60,
    ),
    Scenario(
        "suites",
        "the authorization, hostile-input, rate-limit, schemathesis and state-machine "
        "suites (its length is the examples per property test)",
        suites.run,
        short_seconds=25,
        full_seconds=100,
        in_test_suite=False,
    ),
]
BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}
