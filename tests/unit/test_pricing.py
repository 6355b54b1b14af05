"""Prices and estimates as a client sees them: exact Decimal money, billing increments, learning."""

from __future__ import annotations

from decimal import Decimal

import pytest

from domain.pricing import (
    DEFAULT_RATES_PER_GPU_HOUR,
    NO_HISTORY,
    Estimate,
    Priority,
    RateTable,
    RuntimeStats,
    estimate,
    price,
)

TABLE = RateTable()
PER_SECOND = RateTable(billing_increment_seconds=1)


def charge(
    gpu_type: str = "v100",
    *,
    gpu_count: int = 1,
    seconds: Decimal | int = 3600,
    priority: Priority = Priority.NORMAL,
    table: RateTable = TABLE,
) -> Decimal:
    return price(table, gpu_type=gpu_type, gpu_count=gpu_count, seconds=seconds, priority=priority)


def test_seed_example_v100_normal_without_history() -> None:
    result = estimate(
        TABLE, gpu_type="v100", gpu_count=1, priority=Priority.NORMAL, timeout_seconds=3600
    )
    assert result == Estimate(cost=Decimal("0.05"), seconds=600)
    assert str(result.cost) == "0.05"


@pytest.mark.parametrize(
    ("gpu_type", "rate"),
    [("v100", "0.05"), ("a100", "0.10"), ("rtx3090", "0.03")],
)
def test_one_gpu_hour_costs_the_rate(gpu_type: str, rate: str) -> None:
    assert charge(gpu_type) == Decimal(rate)


@pytest.mark.parametrize("gpu_type", ["h100", "h200"])
def test_hopper_gpus_are_sold(gpu_type: str) -> None:
    assert gpu_type in DEFAULT_RATES_PER_GPU_HOUR
    assert charge(gpu_type) > charge("a100")


@pytest.mark.parametrize(
    ("priority", "cost"),
    [
        (Priority.LOW, "0.08"),
        (Priority.NORMAL, "0.1"),
        (Priority.HIGH, "0.15"),
        (Priority.URGENT, "0.2"),
    ],
)
def test_priority_multiplies_the_price(priority: Priority, cost: str) -> None:
    assert charge("a100", priority=priority) == Decimal(cost)


def test_gpu_count_multiplies_the_price() -> None:
    assert charge("a100", gpu_count=8) == Decimal("0.8")
    assert charge("a100", gpu_count=8) == 8 * charge("a100")


@pytest.mark.parametrize(
    ("seconds", "hours_billed"),
    [(1, 1), (600, 1), (3599, 1), (3600, 1), (3601, 2), (7200, 2), (7201, 3)],
)
def test_default_billing_rounds_up_to_whole_hours(seconds: int, hours_billed: int) -> None:
    assert charge("v100", seconds=seconds) == Decimal("0.05") * hours_billed


def test_per_second_billing_charges_the_exact_seconds() -> None:
    assert charge("a100", seconds=1800, table=PER_SECOND) == Decimal("0.05")
    assert charge("a100", seconds=36, table=PER_SECOND) == Decimal("0.001")
    # Fractions of a second still round up to the next whole second.
    assert charge("a100", seconds=Decimal("35.2"), table=PER_SECOND) == Decimal("0.001")


@pytest.mark.parametrize("table", [TABLE, PER_SECOND], ids=["hourly", "per-second"])
def test_zero_seconds_bills_nothing(table: RateTable) -> None:
    assert charge("h100", seconds=0, table=table) == 0


@pytest.mark.parametrize(
    ("gpu_type", "gpu_count", "seconds", "priority"),
    [
        ("v100", 1, 3600, Priority.NORMAL),
        ("a100", 100, 36000, Priority.NORMAL),
        ("h200", 8, 3600 * 50, Priority.URGENT),
        ("t4", 1, 0, Priority.LOW),
        ("t4", 1, 1, Priority.LOW),
        ("rtx3090", 3, 1, Priority.HIGH),
    ],
)
@pytest.mark.parametrize("table", [TABLE, PER_SECOND], ids=["hourly", "per-second"])
def test_prices_are_plain_decimals(
    table: RateTable, gpu_type: str, gpu_count: int, seconds: int, priority: Priority
) -> None:
    result = price(
        table, gpu_type=gpu_type, gpu_count=gpu_count, seconds=seconds, priority=priority
    )
    assert type(result) is Decimal
    assert "E" not in str(result).upper()
    assert result == round(result, 6)


def test_round_prices_print_without_exponent() -> None:
    assert str(charge("a100", gpu_count=100, seconds=36000)) == "100"
    assert str(charge("v100", gpu_count=2)) == "0.1"


def test_estimate_never_exceeds_the_timeout() -> None:
    short = estimate(
        TABLE, gpu_type="v100", gpu_count=1, priority=Priority.NORMAL, timeout_seconds=120
    )
    assert short.seconds == 120
    learned = RuntimeStats(5, Decimal(5000))
    capped = estimate(
        PER_SECOND,
        gpu_type="v100",
        gpu_count=1,
        priority=Priority.NORMAL,
        timeout_seconds=3000,
        history=learned,
    )
    assert capped.seconds == 3000
    assert capped.cost == charge("v100", seconds=3000, table=PER_SECOND)


def test_learning_takes_the_first_sample_as_is_then_weights_the_newest_by_a_fifth() -> None:
    stats = NO_HISTORY.learn(Decimal(1000))
    assert stats == RuntimeStats(1, Decimal(1000))
    stats = stats.learn(Decimal(2000))
    assert stats.completed == 2
    assert stats.mean_seconds == Decimal(1200)
    stats = stats.learn(Decimal(200))
    assert stats.mean_seconds == Decimal(1000)


def test_learned_estimate_moves_toward_recent_run_times() -> None:
    stats = NO_HISTORY
    seconds_seen = []
    for _ in range(10):
        stats = stats.learn(Decimal(100))
        seconds_seen.append(
            estimate(
                PER_SECOND,
                gpu_type="a100",
                gpu_count=1,
                priority=Priority.NORMAL,
                timeout_seconds=3600,
                history=stats,
            ).seconds
        )
    assert seconds_seen == [100] * 10
    for _ in range(10):
        stats = stats.learn(Decimal(1000))
    later = estimate(
        PER_SECOND,
        gpu_type="a100",
        gpu_count=1,
        priority=Priority.NORMAL,
        timeout_seconds=3600,
        history=stats,
    )
    # 1000 - 900 * 0.8**10 = 903.36..., rounded to whole seconds.
    assert later.seconds == 903
    assert later.cost == charge("a100", seconds=903, table=PER_SECOND)


def test_cost_estimate_follows_the_learned_time() -> None:
    history = NO_HISTORY.learn(Decimal("7200.6"))
    result = estimate(
        TABLE,
        gpu_type="v100",
        gpu_count=2,
        priority=Priority.HIGH,
        timeout_seconds=86400,
        history=history,
    )
    # 7201 s bill as three hours: 0.05 x 2 GPUs x 3 h x 1.5.
    assert result == Estimate(cost=Decimal("0.45"), seconds=7201)


def test_unknown_gpu_type_has_no_price() -> None:
    with pytest.raises(KeyError):
        charge("gtx1080")
    with pytest.raises(KeyError):
        estimate(TABLE, gpu_type="tpu", gpu_count=1, priority=Priority.LOW, timeout_seconds=60)


def test_priority_ranks_urgent_first() -> None:
    ordered = sorted(Priority, key=lambda priority: priority.rank, reverse=True)
    assert ordered == [Priority.URGENT, Priority.HIGH, Priority.NORMAL, Priority.LOW]
