"""The rebuild, scale and dispatch benchmarks run end to end at tiny sizes (never timed here).

`scripts/bench` runs them at full size; these prove each one works and reports what it
says, and that a generated ledger is exactly what the ledger's own code would hold: its
audit chain verifies and its views match a rebuild from its log.
"""

from __future__ import annotations

import math

import psycopg
import pytest

from app.audit.drift import check_drift
from app.audit.verify import verify_ledger
from app.relay import RELAY_NAME
from app.store import JobLedger, postgres_env
from projections import tables
from tests.bench.comparisons import dispatch, rebuild, scale
from tests.bench.generator import BENCH_OWNER, generate
from tests.chaos.lab import Lab

pytestmark = pytest.mark.e2e


def test_a_generated_ledger_verifies_and_its_views_match_a_rebuild(lab: Lab) -> None:
    dsn = lab.database()
    generated = generate(dsn, 400, workdir=lab.directory("generate"), backlog=15, batch_jobs=70)
    ledger = JobLedger(postgres_env(dsn))
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            report = verify_ledger(conn, ledger.recorder.events_table_name)  # type: ignore[attr-defined]
            statuses: dict[str, int] = dict(
                conn.execute("SELECT status, count(*) FROM jobledger_job_views GROUP BY 1")
            )
            owners = conn.execute(
                "SELECT count(*) FROM jobledger_job_views WHERE owner = %s", (BENCH_OWNER,)
            ).fetchone()
            relay = conn.execute(
                "SELECT position FROM jobledger_projection_tracking WHERE projection = %s",
                (RELAY_NAME,),
            ).fetchone()
            views_at = tables.read_position(conn)
        drift = check_drift(ledger, dsn)
        head = ledger.head()
    finally:
        ledger.close()
    assert report.ok, report.findings[:5]
    assert report.sealed_through == head == generated.head == generated.events
    assert report.signed_through == head
    assert drift.differences == [], drift.differences[:5]
    assert views_at == head and relay == (head,)
    assert sum(statuses.values()) == generated.jobs == 400
    assert statuses["pending"] == 15  # the backlog: the history itself has none pending
    assert {"completed", "failed", "canceled"} <= set(statuses)
    assert owners == (generated.owner_jobs,) and generated.owner_jobs > 0
    assert set(generated.owner_job_ids) and len(generated.owner_job_ids) <= generated.owner_jobs


def test_rebuild_compares_the_cli_with_reading_the_log(lab: Lab) -> None:
    comparison = rebuild.measure(lab, jobs=300, rounds=1)
    assert comparison.name == "rebuild"
    mine = {f.name: f.value for f in comparison.jobledger}
    theirs = {f.name: f.value for f in comparison.baseline}
    assert mine["events/s"] > 0 and theirs["events/s"] > 0
    assert comparison.ratio == pytest.approx(mine["events/s"] / theirs["events/s"])
    assert comparison.ratio is not None and comparison.met is (comparison.ratio >= rebuild.TARGET)


def test_scale_reads_both_ledgers_and_the_api_memory(lab: Lab) -> None:
    comparison = scale.measure(lab, big=300, small=100, requests=20, rounds=2, warmup=2, backlog=10)
    mine = {f.name: f.value for f in comparison.jobledger}
    theirs = {f.name: f.value for f in comparison.baseline}
    for kind in scale.KINDS:
        for figures in (mine, theirs):
            assert 0 < figures[f"{kind} p50"] <= figures[f"{kind} p99"]
    assert 20 < mine["API RSS"] < 10_000
    worst = max(mine[f"{kind} p99"] / theirs[f"{kind} p99"] for kind in scale.KINDS)
    assert comparison.ratio == pytest.approx(worst)
    assert comparison.met is not None


def test_dispatch_times_every_submission_to_its_miner(lab: Lab) -> None:
    comparison = dispatch.measure(lab, probe_seconds=1, seconds=2)
    figures = {f.name: f.value for f in comparison.jobledger}
    assert comparison.baseline == [] and comparison.ratio is None and comparison.met is None
    assert 0 < figures["p50"] <= figures["p99"]
    assert figures["p50 from 201"] <= figures["p50"]
    assert figures["submit rate"] > 0 and figures["max submit rate"] > 0
    assert not math.isnan(figures["p99 from 201"])
