"""The pure miner folds: the registry row from Miner events, the stats delta from job events."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from domain.jobs import Job, RequeueCause
from domain.miners import Capabilities, Miner
from projections.jobs import JobRow, fold
from projections.miners import (
    MinerRow,
    MinerStats,
    MinerView,
    fold_miner,
    stats_delta,
    view_of_written,
)
from tests.unit.job_builders import MINER, OTHER_MINER, submitted

FIRST_SEQ = 7


def capabilities(**changes: Any) -> Capabilities:
    fields: dict[str, Any] = {
        "gpu_type": "NVIDIA A100-SXM4-80GB",
        "gpu_count": 8,
        "vram_gb": 80,
        "location": "eu-west",
        "price_per_hour": Decimal("0.10"),
        "max_concurrent": 2,
    }
    return Capabilities(**(fields | changes))


def folded(events: list[Any]) -> MinerRow:
    row = None
    for offset, event in enumerate(events):
        row = fold_miner(row, event, FIRST_SEQ + offset)
    assert row is not None
    return row


def test_registration_folds_into_an_active_row() -> None:
    miner = Miner.register("rig-1", capabilities())
    [registered] = miner.collect_events()
    row = fold_miner(None, registered, FIRST_SEQ)
    assert row == MinerRow(
        miner_id=miner.miner_id,
        name="rig-1",
        gpu_type="a100",
        gpu_count=8,
        vram_gb=80,
        location="eu-west",
        price_per_hour=Decimal("0.10"),
        max_concurrent=2,
        active=True,
        registered_at=registered.timestamp,
        updated_at=registered.timestamp,
        version=1,
        seq=FIRST_SEQ,
    )


def test_updates_and_deregistration_match_the_aggregate() -> None:
    miner = Miner.register("rig-1", capabilities())
    miner.update_capabilities(capabilities(gpu_type="h100", gpu_count=4, location="us-east"))
    miner.deregister("retired")
    events = list(miner.collect_events())
    row = folded(events)
    assert not row.active and not miner.active
    assert (row.gpu_type, row.gpu_count, row.location) == ("h100", 4, "us-east")
    assert msgspec.structs.asdict(miner.capabilities) == {
        field: getattr(row, field) for field in Capabilities.__struct_fields__
    }
    assert row.version == miner.version == 3
    # The registration's position orders the registry; later events do not move it.
    assert row.seq == FIRST_SEQ
    assert row.registered_at == events[0].timestamp
    assert row.updated_at == events[-1].timestamp


def test_an_event_without_its_registration_is_refused() -> None:
    miner = Miner.register("rig-1", capabilities())
    miner.deregister("retired")
    _, deregistered = miner.collect_events()
    with pytest.raises(ValueError, match="no Registered event"):
        fold_miner(None, deregistered, FIRST_SEQ)


def rows_and_events(story: Callable[[Job], None]) -> list[tuple[JobRow | None, Any]]:
    """Each event of a job story with the job's row before it."""
    job = submitted()
    story(job)
    pairs: list[tuple[JobRow | None, Any]] = []
    row: JobRow | None = None
    for seq, event in enumerate(job.collect_events(), start=1):
        pairs.append((row, event))
        row = fold(row, event, seq)
    return pairs


def total_stats(story: Callable[[Job], None]) -> dict[str, MinerStats]:
    return added_up(rows_and_events(story))


def added_up(pairs: list[tuple[JobRow | None, Any]]) -> dict[str, MinerStats]:
    totals: dict[str, MinerStats] = {}
    for before, event in pairs:
        if (delta := stats_delta(before, event)) is not None:
            known = totals.get(delta.miner_id)
            totals[delta.miner_id] = known.plus(delta) if known else delta
    return totals


def completes(job: Job) -> None:
    job.assign(MINER)
    job.start(attempt=1, miner_id=MINER)
    job.complete(
        attempt=1, result={}, metrics={}, gpu_seconds=Decimal("7200"), cost=Decimal("0.25")
    )


def test_a_completion_credits_its_miner() -> None:
    pairs = rows_and_events(completes)
    started = pairs[2][1]
    completed = pairs[3][1]
    run = completed.timestamp - started.timestamp
    [stats] = added_up(pairs).values()
    assert stats == MinerStats(
        miner_id=MINER,
        finished_jobs=1,
        completed_jobs=1,
        total_run_seconds=Decimal(run.seconds) + Decimal(run.microseconds) / 1_000_000,
        gpu_seconds=Decimal("7200"),
        earnings=Decimal("0.25"),
    )
    assert stats.success_rate == 1
    assert stats.earnings_per_gpu_hour == Decimal("0.125")


def test_run_time_counts_from_assignment_when_no_start_was_reported() -> None:
    job = submitted()
    job.assign(MINER)
    job.complete(attempt=1, result={}, metrics={}, gpu_seconds=Decimal(1), cost=Decimal(0))
    submitted_event, assigned_event, completed_event = job.collect_events()
    before = fold(fold(None, submitted_event, 1), assigned_event, 2)
    assert before.started_at is None
    # As if the assignment had been an exact 90.5 s before the completion.
    before.assigned_at = completed_event.timestamp - timedelta(seconds=90.5)
    delta = stats_delta(before, completed_event)
    assert delta is not None
    assert delta.total_run_seconds == Decimal("90.5")
    assert delta.average_completion_time == Decimal("90.5")


def fails_after_a_requeue(job: Job) -> None:
    job.assign(MINER)
    job.start(attempt=1, miner_id=MINER)
    job.requeue(RequeueCause.LEASE_EXPIRED)
    job.assign(OTHER_MINER)
    job.fail(attempt=2, error="model weights not found")


def test_a_failure_counts_against_the_miner_holding_the_job_not_the_requeued_one() -> None:
    totals = total_stats(fails_after_a_requeue)
    assert totals == {OTHER_MINER: MinerStats(miner_id=OTHER_MINER, finished_jobs=1, failed_jobs=1)}
    assert totals[OTHER_MINER].success_rate == 0
    assert totals[OTHER_MINER].average_completion_time is None
    assert totals[OTHER_MINER].earnings_per_gpu_hour is None


def times_out_while_running(job: Job) -> None:
    job.assign(MINER)
    job.start(attempt=1, miner_id=MINER)
    job.time_out()


def test_a_time_out_counts_against_the_miner() -> None:
    assert total_stats(times_out_while_running) == {
        MINER: MinerStats(miner_id=MINER, finished_jobs=1, timed_out_jobs=1)
    }


def times_out_while_pending(job: Job) -> None:
    job.time_out()


def canceled_while_running(job: Job) -> None:
    job.assign(MINER)
    job.start(attempt=1, miner_id=MINER)
    job.request_cancel()
    job.confirm_canceled(attempt=1)


def requeued(job: Job) -> None:
    job.assign(MINER)
    job.requeue(RequeueCause.MINER_DEREGISTERED)


@pytest.mark.parametrize("story", [times_out_while_pending, canceled_while_running, requeued])
def test_cancels_requeues_and_unheld_time_outs_count_for_no_one(
    story: Callable[[Job], None],
) -> None:
    assert total_stats(story) == {}


def test_rates_are_rounded_decimals() -> None:
    stats = MinerStats(
        miner_id=MINER,
        finished_jobs=3,
        completed_jobs=2,
        failed_jobs=1,
        total_run_seconds=Decimal("10.0005"),
        gpu_seconds=Decimal("5400"),
        earnings=Decimal("1"),
    )
    assert stats.success_rate == Decimal("0.6667")
    assert stats.average_completion_time == Decimal("5")
    assert str(stats.average_completion_time) == "5"
    assert stats.earnings_per_gpu_hour == Decimal("0.666667")


def test_a_new_miner_has_zeros_and_no_rates() -> None:
    stats = MinerStats(miner_id=MINER)
    assert (stats.finished_jobs, stats.earnings, stats.gpu_seconds) == (0, 0, 0)
    assert stats.success_rate is None
    assert stats.average_completion_time is None
    assert stats.earnings_per_gpu_hour is None


def test_stats_of_different_miners_do_not_add() -> None:
    with pytest.raises(ValueError, match="cannot add"):
        MinerStats(miner_id=MINER).plus(MinerStats(miner_id=OTHER_MINER))


def view_of(row: MinerRow, **liveness: Any) -> MinerView:
    fields: dict[str, Any] = {
        "status": "online",
        "last_heartbeat_at": row.updated_at,
        "inflight": 1,
        "reported_inflight": 1,
        "gpus": [{"index": 0}],
    }
    return MinerView(**msgspec.structs.asdict(row), **(fields | liveness))


def test_a_written_view_prefers_the_views_once_they_caught_up() -> None:
    miner = Miner.register("rig-1", capabilities())
    seen = view_of(folded(list(miner.collect_events())))
    assert view_of_written(miner, seen) is seen


def test_a_written_view_applies_the_write_when_the_views_lag() -> None:
    miner = Miner.register("rig-1", capabilities())
    seen = view_of(folded(list(miner.collect_events())))
    miner.update_capabilities(capabilities(gpu_count=2))
    updated = view_of_written(miner, seen)
    assert (updated.gpu_count, updated.version, updated.status) == (2, 2, "online")
    assert (updated.inflight, updated.gpus, updated.seq) == (1, [{"index": 0}], FIRST_SEQ)
    miner.deregister("retired")
    assert view_of_written(miner, seen).status == "deregistered"


def test_a_written_view_of_a_miner_the_views_never_saw_is_offline() -> None:
    miner = Miner.register("rig-1", capabilities())
    view = view_of_written(miner, None)
    assert (view.status, view.inflight, view.gpus, view.last_heartbeat_at) == (
        "offline",
        0,
        [],
        None,
    )
    assert view.miner_id == miner.miner_id and view.gpu_type == "a100"
