"""The benchmark harness runs end to end: each comparison at a tiny size (scripts/bench: full).

These prove the comparisons start what they need (a served ledger, miners, the bare app,
Celery on a private Redis), measure both sides and report a ratio, with no failed request
and every job's history complete. They never assert on speed: that is the benchmark's job.
Celery and a redis-server are dev dependencies; without them these fail, they do not skip.
"""

from __future__ import annotations

import math

import pytest

from tests.bench.comparisons import COMPARISONS, end_to_end, latency, submit
from tests.bench.report import Comparison, render
from tests.chaos.lab import Lab

pytestmark = pytest.mark.e2e


def figures(comparison: Comparison) -> dict[str, float]:
    return {f"jobledger {f.name}": f.value for f in comparison.jobledger} | {
        f"baseline {f.name}": f.value for f in comparison.baseline
    }


def assert_measured(comparison: Comparison, name: str) -> None:
    print(render(comparison))
    assert comparison.name == name
    assert comparison.jobledger and comparison.baseline, comparison
    unmeasured = {k: v for k, v in figures(comparison).items() if not math.isfinite(v)}
    assert not unmeasured, render(comparison)
    assert comparison.ratio is not None and comparison.ratio > 0, render(comparison)
    assert comparison.met in (True, False)
    assert name in render(comparison)


def test_the_comparisons_are_registered_in_the_issues_order() -> None:
    names = [name for name, _ in COMPARISONS]
    assert names[:3] == ["submit", "end-to-end", "latency"]


def test_submit_measures_the_ledger_against_the_bare_endpoint(lab: Lab) -> None:
    comparison = submit.measure(lab, seconds=0.5, rounds=1, warmup_seconds=0.2, concurrency=4)

    assert_measured(comparison, "submit")
    assert figures(comparison)["jobledger errors"] == 0, comparison.notes
    assert figures(comparison)["baseline errors"] == 0, comparison.notes
    assert figures(comparison)["jobledger throughput"] > 0


def test_end_to_end_completes_every_job_with_its_full_history(lab: Lab) -> None:
    comparison = end_to_end.measure(lab, jobs=20, rounds=1, miners=1, miner_concurrency=4)

    assert_measured(comparison, "end-to-end")
    measured = figures(comparison)
    assert measured["jobledger errors"] == 0, comparison.notes
    assert measured["jobledger jobs without a complete history"] == 0, comparison.notes
    assert measured["baseline throughput"] > 0


def test_latency_times_single_jobs_on_both_sides(lab: Lab) -> None:
    comparison = latency.measure(lab, rounds=3)

    assert_measured(comparison, "latency")
    measured = figures(comparison)
    assert measured["jobledger samples"] == measured["baseline samples"] == 3
    assert measured["jobledger p50"] <= measured["jobledger p99"]
