"""Scheduling policy: who gets which pending job, and what a held job needs now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from domain.jobs import JobStatus, RequeueCause
from domain.pricing import Priority
from domain.scheduling import (
    Action,
    HeldJob,
    Leases,
    MinerOffer,
    PendingJob,
    Verdict,
    plan,
    verdict,
)

# ---- plan -------------------------------------------------------------------


def offer(miner_id: str = "miner_a", **changes: object) -> MinerOffer:
    fields: dict[str, object] = {
        "miner_id": miner_id,
        "gpu_type": "h100",
        "gpu_count": 1,
        "vram_gb": 80,
        "price_per_hour": Decimal("1.00"),
        "max_concurrent": 1,
        "online": True,
        "inflight": 0,
    }
    return MinerOffer(**(fields | changes))  # type: ignore[arg-type]


def pending(job_id: str, seq: int, **changes: object) -> PendingJob:
    fields: dict[str, object] = {
        "job_id": job_id,
        "gpu_type": "h100",
        "gpu_count": 1,
        "min_vram_gb": 0,
        "priority": Priority.NORMAL,
        "seq": seq,
    }
    return PendingJob(**(fields | changes))  # type: ignore[arg-type]


def assigned_jobs(jobs: list[PendingJob], miners: list[MinerOffer]) -> list[str]:
    return [job_id for job_id, _ in plan(jobs, miners).assignments]


def test_higher_priorities_are_served_first_whatever_their_arrival() -> None:
    jobs = [
        pending("low", 1, priority=Priority.LOW),
        pending("normal", 2, priority=Priority.NORMAL),
        pending("high", 3, priority=Priority.HIGH),
        pending("urgent", 4, priority=Priority.URGENT),
    ]
    # One slot at a time: the order of the assignments is the order of service.
    assert assigned_jobs(jobs, [offer(max_concurrent=4)]) == ["urgent", "high", "normal", "low"]
    only_one_slot = plan(jobs, [offer(max_concurrent=1)])
    assert only_one_slot.assignments == [("urgent", "miner_a")]
    assert set(only_one_slot.reasons) == {"high", "normal", "low"}


def test_first_come_first_served_within_a_priority() -> None:
    jobs = [pending("third", 30), pending("first", 10), pending("second", 20)]
    assert assigned_jobs(jobs, [offer(max_concurrent=2)]) == ["first", "second"]


@pytest.mark.parametrize(
    ("registered_as", "asked_for"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("h100", "NVIDIA H100 80GB HBM3"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
    ],
)
def test_gpu_types_match_by_their_normalised_names(registered_as: str, asked_for: str) -> None:
    result = plan([pending("job", 1, gpu_type=asked_for)], [offer(gpu_type=registered_as)])
    assert result.assignments == [("job", "miner_a")]
    assert result.reasons == {}


def test_a_similar_but_different_gpu_does_not_match() -> None:
    # "a10" is a prefix of "a100": a job for an A100 must not land on an A10.
    result = plan([pending("job", 1, gpu_type="a100")], [offer(gpu_type="NVIDIA A10")])
    assert result.assignments == []
    assert "no registered miner offers 1x a100" in result.reasons["job"]


def test_a_miner_with_too_few_gpus_or_too_little_vram_is_not_chosen() -> None:
    miners = [
        offer("two_small", gpu_count=2, vram_gb=40),
        offer("one_big", gpu_count=1, vram_gb=80),
        offer("two_big", gpu_count=2, vram_gb=80, price_per_hour=Decimal("9.00")),
    ]
    result = plan([pending("job", 1, gpu_count=2, min_vram_gb=80)], miners)
    assert result.assignments == [("job", "two_big")]


def test_vram_exactly_as_asked_is_enough() -> None:
    result = plan([pending("job", 1, min_vram_gb=80)], [offer(vram_gb=80)])
    assert result.assignments == [("job", "miner_a")]


def test_free_capacity_is_respected_within_one_plan() -> None:
    jobs = [pending(f"job{n}", n) for n in range(5)]
    result = plan(jobs, [offer(max_concurrent=3, inflight=1)])
    assert result.assignments == [("job0", "miner_a"), ("job1", "miner_a")]
    assert set(result.reasons) == {"job2", "job3", "job4"}


def test_a_miner_running_more_than_its_limit_gets_nothing() -> None:
    result = plan([pending("job", 1)], [offer(max_concurrent=1, inflight=3)])
    assert result.assignments == []
    assert "waiting for capacity" in result.reasons["job"]


def test_offline_miners_get_nothing() -> None:
    miners = [offer("offline", online=False, price_per_hour=Decimal("0.01")), offer("online")]
    assert plan([pending("job", 1)], miners).assignments == [("job", "online")]
    assert plan([pending("job", 1)], [offer("offline", online=False)]).assignments == []


def test_the_cheapest_fitting_miner_wins() -> None:
    miners = [
        offer("dear", price_per_hour=Decimal("2.50"), max_concurrent=8),
        offer("cheap", price_per_hour=Decimal("0.75")),
        offer("middle", price_per_hour=Decimal("1.25")),
    ]
    assert plan([pending("job", 1)], miners).assignments == [("job", "cheap")]


def test_at_equal_price_the_miner_with_more_free_slots_wins() -> None:
    miners = [
        offer("busy", max_concurrent=4, inflight=3),
        offer("idle", max_concurrent=4, inflight=0),
    ]
    assert plan([pending("job", 1)], miners).assignments == [("job", "idle")]


def test_work_spreads_as_free_slots_are_used_up() -> None:
    # Both cost the same: each assignment goes to whichever has more slots left.
    miners = [offer("a", max_concurrent=2), offer("b", max_concurrent=3)]
    result = plan([pending(f"job{n}", n) for n in range(5)], miners)
    per_miner = [miner for _, miner in result.assignments]
    assert per_miner.count("a") == 2 and per_miner.count("b") == 3
    assert result.reasons == {}


def test_an_unplaceable_urgent_job_does_not_block_other_gpu_types() -> None:
    jobs = [
        pending("urgent_b200", 1, gpu_type="b200", priority=Priority.URGENT),
        pending("low_h100", 2, priority=Priority.LOW),
    ]
    result = plan(jobs, [offer()])
    assert result.assignments == [("low_h100", "miner_a")]
    assert list(result.reasons) == ["urgent_b200"]


def test_reason_when_no_miner_offers_the_hardware() -> None:
    job = pending("job", 1, gpu_type="a100", gpu_count=4, min_vram_gb=80)
    reason = plan([job], [offer(gpu_type="h100")]).reasons["job"]
    assert reason.startswith("no registered miner offers 4x a100 with at least 80 GB VRAM")


def test_reason_when_no_miner_is_registered_at_all() -> None:
    assert (
        plan([pending("job", 1)], [])
        .reasons["job"]
        .startswith("no registered miner offers 1x h100")
    )


def test_reason_when_fitting_miners_are_offline() -> None:
    miners = [offer("a", online=False), offer("b", online=False), offer("other", gpu_type="t4")]
    reason = plan([pending("job", 1)], miners).reasons["job"]
    assert "2 registered miner(s) offer 1x h100" in reason
    assert reason.endswith("none online")


def test_reason_when_fitting_online_miners_are_full() -> None:
    miners = [
        offer("full", max_concurrent=2, inflight=2),
        offer("offline", online=False),
    ]
    reason = plan([pending("job", 1)], miners).reasons["job"]
    assert reason.startswith("waiting for capacity: 1 online miner(s) offer 1x h100")
    assert "all busy" in reason


def test_assigned_jobs_have_no_reason() -> None:
    result = plan([pending("placed", 1), pending("waiting", 2)], [offer()])
    assert result.assignments == [("placed", "miner_a")]
    assert "placed" not in result.reasons
    assert "waiting" in result.reasons


# ---- verdict ----------------------------------------------------------------

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
LEASES = Leases(lease=timedelta(seconds=30), cancel_grace=timedelta(seconds=60))
LONG_AGO = NOW - timedelta(hours=1)  # the scheduler has watched heartbeats for long enough


def held(**changes: object) -> HeldJob:
    """A running job, assigned five minutes ago to a healthy miner that lists it."""
    fields: dict[str, object] = {
        "job_id": "job_1",
        "status": JobStatus.RUNNING,
        "miner_id": "miner_a",
        "attempt": 2,
        "timeout_seconds": 3600,
        "assigned_at": NOW - timedelta(minutes=5),
        "status_since": NOW - timedelta(minutes=4),
        "miner_active": True,
        "last_heartbeat_at": NOW - timedelta(seconds=2),
        "miner_holds": frozenset({("job_1", 2)}),
    }
    return HeldJob(**(fields | changes))  # type: ignore[arg-type]


def decide(job: HeldJob, *, now: datetime = NOW, watching_since: datetime = LONG_AGO) -> Verdict:
    return verdict(job, now, LEASES, watching_since=watching_since)


@pytest.mark.parametrize("status", [JobStatus.ASSIGNED, JobStatus.RUNNING])
def test_a_healthy_held_job_is_kept(status: JobStatus) -> None:
    assert decide(held(status=status)).action is Action.NONE


@pytest.mark.parametrize("status", [JobStatus.ASSIGNED, JobStatus.RUNNING])
def test_a_job_times_out_once_its_timeout_has_passed_since_assignment(status: JobStatus) -> None:
    job = held(status=status, timeout_seconds=600, assigned_at=NOW - timedelta(seconds=600))
    decision = decide(job)
    assert decision.action is Action.TIME_OUT
    assert decision.cause is None
    one_second_earlier = decide(job, now=NOW - timedelta(seconds=1))
    assert one_second_earlier.action is Action.NONE


def test_a_timeout_wins_over_a_silent_miner() -> None:
    job = held(timeout_seconds=60, assigned_at=NOW - timedelta(seconds=120), last_heartbeat_at=None)
    assert decide(job).action is Action.TIME_OUT


def test_a_silent_miner_loses_its_job() -> None:
    decision = decide(held(last_heartbeat_at=NOW - timedelta(seconds=31)))
    assert (decision.action, decision.cause) == (Action.GIVE_BACK, RequeueCause.LEASE_EXPIRED)


def test_a_miner_never_heard_from_loses_its_job() -> None:
    decision = decide(held(last_heartbeat_at=None))
    assert (decision.action, decision.cause) == (Action.GIVE_BACK, RequeueCause.LEASE_EXPIRED)


def test_a_heartbeat_within_the_lease_keeps_the_job() -> None:
    assert decide(held(last_heartbeat_at=NOW - timedelta(seconds=29))).action is Action.NONE


def test_silence_is_not_judged_right_after_a_restart() -> None:
    job = held(last_heartbeat_at=NOW - timedelta(minutes=10))
    just_started = decide(job, watching_since=NOW - timedelta(seconds=10))
    assert just_started.action is Action.NONE
    a_lease_later = decide(job, watching_since=NOW - timedelta(seconds=30))
    assert (a_lease_later.action, a_lease_later.cause) == (
        Action.GIVE_BACK,
        RequeueCause.LEASE_EXPIRED,
    )


def test_a_fresh_assignment_is_not_judged_by_silence() -> None:
    # The miner may not have picked the job up yet.
    job = held(assigned_at=NOW - timedelta(seconds=10), last_heartbeat_at=None)
    assert decide(job).action is Action.NONE


def test_a_deregistered_miners_job_is_given_back_at_once() -> None:
    job = held(miner_active=False, assigned_at=NOW - timedelta(seconds=1))
    decision = decide(job, watching_since=NOW)
    assert (decision.action, decision.cause) == (
        Action.GIVE_BACK,
        RequeueCause.MINER_DEREGISTERED,
    )


def test_a_job_the_miner_no_longer_lists_is_given_back() -> None:
    # The heartbeat came a full lease after the assignment and does not mention the attempt.
    job = held(
        assigned_at=NOW - timedelta(seconds=40),
        last_heartbeat_at=NOW - timedelta(seconds=5),
        miner_holds=frozenset({("job_other", 1)}),
    )
    decision = decide(job)
    assert (decision.action, decision.cause) == (Action.GIVE_BACK, RequeueCause.LOST_BY_MINER)


def test_a_miner_listing_an_older_attempt_has_lost_the_current_one() -> None:
    job = held(miner_holds=frozenset({("job_1", 1)}))
    decision = decide(job)
    assert (decision.action, decision.cause) == (Action.GIVE_BACK, RequeueCause.LOST_BY_MINER)


def test_a_heartbeat_too_soon_after_the_assignment_does_not_prove_a_loss() -> None:
    # Sent before the assignment could have arrived: an empty list means nothing yet.
    job = held(
        assigned_at=NOW - timedelta(seconds=40),
        last_heartbeat_at=NOW - timedelta(seconds=15),
        miner_holds=frozenset(),
    )
    assert decide(job).action is Action.NONE


def test_canceling_is_confirmed_by_the_ledger_after_the_grace_period() -> None:
    job = held(status=JobStatus.CANCELING, status_since=NOW - timedelta(seconds=61))
    assert decide(job).action is Action.CANCEL_UNCONFIRMED
    within_grace = held(status=JobStatus.CANCELING, status_since=NOW - timedelta(seconds=59))
    assert decide(within_grace).action is Action.NONE


def test_canceling_does_not_time_out_or_get_given_back() -> None:
    job = held(
        status=JobStatus.CANCELING,
        status_since=NOW - timedelta(seconds=5),
        timeout_seconds=60,
        assigned_at=NOW - timedelta(hours=2),
        miner_holds=frozenset(),
    )
    assert decide(job).action is Action.NONE


@pytest.mark.parametrize(
    "gone",
    [
        {"miner_active": False},
        {"last_heartbeat_at": NOW - timedelta(minutes=5)},
        {"last_heartbeat_at": None},
    ],
    ids=["deregistered", "silent", "never-heard"],
)
def test_canceling_with_the_miner_gone_is_canceled_at_once(gone: dict[str, object]) -> None:
    job = held(status=JobStatus.CANCELING, status_since=NOW - timedelta(seconds=1), **gone)
    decision = decide(job)
    assert decision.action is Action.CANCEL_UNCONFIRMED
    assert decision.cause is None


def test_canceling_waits_for_a_silent_miner_right_after_a_restart() -> None:
    job = held(
        status=JobStatus.CANCELING,
        status_since=NOW - timedelta(seconds=1),
        last_heartbeat_at=None,
    )
    assert decide(job, watching_since=NOW - timedelta(seconds=5)).action is Action.NONE
