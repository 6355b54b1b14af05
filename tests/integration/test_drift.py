"""`jobledger audit drift` on real PostgreSQL: a scratch rebuild against the live views."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from app.audit import drift
from app.audit.drift import Difference, DriftReport, ViewsMissing, check_drift, run_drift
from app.config import Settings
from app.projector import Projector
from app.store import JobLedger, postgres_env
from domain.miners import Capabilities
from projections import tables
from tests.integration.helpers import run_to_completion, spec

pytestmark = pytest.mark.integration


@dataclass
class World:
    """A ledger with three jobs (two completed on one miner) and views folded up to its head."""

    ledger: JobLedger
    dsn: str
    conn: psycopg.Connection[Any]
    miner_id: str
    completed: list[str]
    pending: str


def project(world: World) -> int:
    # One event per batch: the live views are folded in other batches than the rebuild's.
    return Projector(world.ledger, world.dsn, batch_size=1).catch_up(world.conn)


@pytest.fixture
def world(database_url: str) -> Iterator[World]:
    ledger = JobLedger(postgres_env(database_url))
    with psycopg.connect(database_url, autocommit=True) as conn:
        tables.create_schema(conn)
        miner, _ = ledger.register_miner(
            "rig",
            Capabilities(
                gpu_type="v100",
                gpu_count=2,
                vram_gb=16,
                location="eu-west",
                price_per_hour=Decimal("0.05"),
                max_concurrent=2,
            ),
        )
        completed = [
            ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id for _ in range(2)
        ]
        for job_id in completed:
            run_to_completion(ledger, job_id, miner.miner_id)
        pending = ledger.submit(owner="bob", spec=spec(model="bert"), idempotency_key=None).job_id
        world = World(ledger, database_url, conn, miner.miner_id, completed, pending)
        assert project(world) == ledger.head()
        yield world
    ledger.close()


def scratch_schemas(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [
            name
            for (name,) in conn.execute(
                "SELECT schema_name FROM information_schema.schemata "
                "WHERE schema_name LIKE 'jobledger_drift_%'"
            )
        ]


def live_rows(conn: psycopg.Connection[Any]) -> dict[str, list[Any]]:
    return {
        table.name: conn.execute(f"SELECT * FROM {table.name} ORDER BY 1, 2").fetchall()
        for table in drift.COMPARED
    }


def test_a_healthy_ledger_has_no_drift_and_leaves_nothing_behind(world: World) -> None:
    before = live_rows(world.conn)
    report = check_drift(world.ledger, world.dsn)
    assert report.differences == []
    assert report.position == world.ledger.head()
    assert report.tables == {
        "jobledger_job_views": 3,
        "jobledger_job_counts": 2,
        "jobledger_runtime_stats": 1,
        "jobledger_miner_views": 1,
        "jobledger_miner_stats": 1,
    }
    assert scratch_schemas(world.dsn) == []
    assert live_rows(world.conn) == before
    assert tables.read_position(world.conn) == report.position


def test_the_audit_announces_no_view_position(world: World) -> None:
    with psycopg.connect(world.dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {tables.VIEWS_CHANNEL}")
        assert check_drift(world.ledger, world.dsn).differences == []
        assert list(listener.notifies(timeout=0.5)) == []
        # The listener works: the live projector's batches are announced.
        world.ledger.submit(owner="carol", spec=spec(), idempotency_key=None)
        project(world)
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == [
            str(world.ledger.head())
        ]


def test_a_changed_column_is_reported_with_both_values(world: World) -> None:
    job_id = world.completed[0]
    world.conn.execute(
        "UPDATE jobledger_job_views SET status = 'running' WHERE job_id = %s", (job_id,)
    )
    report = check_drift(world.ledger, world.dsn)
    assert report.differences == [
        Difference("jobledger_job_views", job_id, "different", {"status": ("running", "completed")})
    ]


def test_timestamps_numbers_and_json_compare_exactly(world: World) -> None:
    job_id = world.completed[1]
    world.conn.execute(
        "UPDATE jobledger_job_views SET updated_at = updated_at + interval '1 microsecond', "
        "cost = cost + 0.000001, result = result || '{\"size_bytes\": 3}' WHERE job_id = %s",
        (job_id,),
    )
    # The same value written with another scale is the same number: not drift.
    world.conn.execute("UPDATE jobledger_job_views SET estimated_cost = estimated_cost * 1.000")
    [difference] = check_drift(world.ledger, world.dsn).differences
    assert (difference.table, difference.key, difference.kind) == (
        "jobledger_job_views",
        job_id,
        "different",
    )
    assert set(difference.columns) == {"updated_at", "cost", "result"}
    assert difference.columns["cost"] == ("0.050001", "0.05")
    live_result, rebuilt_result = difference.columns["result"]
    assert (live_result["size_bytes"], rebuilt_result["size_bytes"]) == (3, 2)
    live_at, rebuilt_at = difference.columns["updated_at"]
    assert live_at != rebuilt_at and live_at[:19] == rebuilt_at[:19]


def test_missing_and_extra_rows_are_reported(world: World) -> None:
    world.conn.execute("DELETE FROM jobledger_job_views WHERE job_id = %s", (world.pending,))
    world.conn.execute(
        "INSERT INTO jobledger_job_views "
        "SELECT 'job_bogus', seq, owner, model, priority, status, progress, attempt, miner_id, "
        "gpu_type, gpu_count, min_vram_gb, timeout_seconds, output_destination, output_format, "
        "estimated_cost, estimated_time_seconds, cost, error, result, created_at, started_at, "
        "completed_at, updated_at, version, error_code, assigned_at, status_since "
        "FROM jobledger_job_views WHERE job_id = %s",
        (world.completed[0],),
    )
    report = check_drift(world.ledger, world.dsn)
    assert sorted((d.key, d.kind, d.columns) for d in report.differences) == sorted(
        [(world.pending, "missing", {}), ("job_bogus", "extra", {})]
    )
    assert report.tables["jobledger_job_views"] == 4  # the three jobs and the bogus one


def test_runtime_and_miner_tables_are_compared_too(world: World) -> None:
    world.conn.execute("UPDATE jobledger_runtime_stats SET completed = completed + 1")
    world.conn.execute("UPDATE jobledger_miner_views SET active = false")
    world.conn.execute("UPDATE jobledger_miner_stats SET earnings = earnings + 1")
    world.conn.execute(
        "INSERT INTO jobledger_runtime_stats VALUES ('llama', 'h100', 1, 60)",
    )
    world.conn.execute("DELETE FROM jobledger_miner_stats")
    report = check_drift(world.ledger, world.dsn)
    assert sorted((d.table, d.key, d.kind, d.columns) for d in report.differences) == [
        ("jobledger_miner_stats", world.miner_id, "missing", {}),
        ("jobledger_miner_views", world.miner_id, "different", {"active": (False, True)}),
        ("jobledger_runtime_stats", "gpt2/v100", "different", {"completed": (3, 2)}),
        ("jobledger_runtime_stats", "llama/h100", "extra", {}),
    ]


def test_a_tracking_position_past_the_log_is_reported(world: World) -> None:
    head = world.ledger.head()
    world.conn.execute(
        "UPDATE jobledger_projection_tracking SET position = %s WHERE projection = %s",
        (head + 5, tables.PROJECTION_NAME),
    )
    report = check_drift(world.ledger, world.dsn)
    assert report.position == head + 5
    assert report.differences == [
        Difference(
            "jobledger_projection_tracking",
            "job_views",
            "different",
            {"position": (head + 5, head)},
        )
    ]


def test_events_the_views_have_not_reached_are_not_drift(world: World) -> None:
    position = world.ledger.head()
    world.ledger.submit(owner="carol", spec=spec(), idempotency_key=None)
    run_to_completion(world.ledger, world.pending, world.miner_id)
    report = check_drift(world.ledger, world.dsn)
    assert report.differences == []
    assert report.position == position < world.ledger.head()
    assert report.tables["jobledger_job_views"] == 3


def test_views_moving_during_the_audit_are_compared_as_of_the_snapshot(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    position = world.ledger.head()
    world.ledger.submit(owner="carol", spec=spec(), idempotency_key=None)
    run_to_completion(world.ledger, world.pending, world.miner_id)
    rebuild = tables.rebuild

    def projector_runs_meanwhile(conn: psycopg.Connection[Any], batches: Any) -> int:
        assert project(world) == world.ledger.head()
        return rebuild(conn, batches)

    monkeypatch.setattr(tables, "rebuild", projector_runs_meanwhile)
    report = check_drift(world.ledger, world.dsn)
    assert report.differences == []
    assert report.position == position
    assert tables.read_position(world.conn) == world.ledger.head()


def test_the_live_views_may_be_rebuilt_while_the_audit_rebuilds_its_copy(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    position = world.ledger.head()
    world.ledger.submit(owner="carol", spec=spec(), idempotency_key=None)
    rebuild = tables.rebuild
    # Fails instead of hanging if the audit still held locks on the live tables.
    impatient = make_conninfo(world.dsn, options="-c lock_timeout=5s")

    def live_rebuild_meanwhile(conn: psycopg.Connection[Any], batches: Any) -> int:
        with psycopg.connect(impatient, autocommit=True) as live:
            assert rebuild(live, world.ledger.read_whole_log()) == world.ledger.head()
        return rebuild(conn, batches)

    monkeypatch.setattr(tables, "rebuild", live_rebuild_meanwhile)
    report = check_drift(world.ledger, world.dsn)
    assert report.differences == []
    assert report.position == position
    assert report.tables["jobledger_job_views"] == 3
    assert tables.read_position(world.conn) == world.ledger.head()


@pytest.mark.parametrize("error", [RuntimeError("comparison failed"), KeyboardInterrupt()])
def test_the_scratch_schema_is_dropped_when_the_check_fails(
    world: World, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    seen: list[str] = []

    def failing(scratch: psycopg.Connection[Any], schema: str, *args: Any) -> int:
        seen.extend(scratch_schemas(world.dsn))
        raise error

    monkeypatch.setattr(drift, "_compare_table", failing)
    before = live_rows(world.conn)
    with pytest.raises(type(error)):
        check_drift(world.ledger, world.dsn)
    assert len(seen) == 1 and seen[0].startswith("jobledger_drift_")
    assert scratch_schemas(world.dsn) == []
    assert live_rows(world.conn) == before


def test_a_database_without_views_is_refused(database_url: str) -> None:
    ledger = JobLedger(postgres_env(database_url))
    try:
        with pytest.raises(ViewsMissing):
            check_drift(ledger, database_url)
    finally:
        ledger.close()
    assert scratch_schemas(database_url) == []


def test_run_drift_prints_the_verdict_and_exits_0_or_1(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(database_url=world.dsn)
    head = world.ledger.head()
    assert run_drift(settings) == 0
    assert capsys.readouterr().out == (
        "compared 3 job views, 2 job counts, 1 runtime stats, 1 miner views, 1 miner stats "
        f"at log position {head}: no drift\n"
    )

    job_id = world.completed[0]
    world.conn.execute(
        "UPDATE jobledger_job_views SET status = 'failed', error = NULL, progress = 99 "
        "WHERE job_id = %s",
        (job_id,),
    )
    world.conn.execute("DELETE FROM jobledger_job_views WHERE job_id = %s", (world.pending,))
    assert run_drift(settings) == 1
    rows = sorted(
        [
            f"jobledger_job_views {job_id}: status live=failed rebuilt=completed, "
            "progress live=99 rebuilt=100",
            f"jobledger_job_views {world.pending}: missing from the live views "
            "(the rebuild has it)",
        ],
        key=lambda line: line.split(":")[0],
    )
    assert capsys.readouterr().out.splitlines() == [
        *rows,
        "compared 3 job views, 2 job counts, 1 runtime stats, 1 miner views, 1 miner stats "
        f"at log position {head}: 2 differences",
    ]

    assert run_drift(settings, as_json=True) == 1
    report = msgspec.json.decode(capsys.readouterr().out, type=DriftReport)
    assert report.position == head
    assert [(d.key, d.kind) for d in report.differences] == sorted(
        [(job_id, "different"), (world.pending, "missing")]
    )
    assert scratch_schemas(world.dsn) == []
