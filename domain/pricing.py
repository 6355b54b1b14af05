"""Pricing: one pure function turns GPU time into money, for estimates and for charges alike.

    cost = rate(gpu_type) x gpu_count x billed_hours(seconds) x multiplier(priority)

`billed_hours` rounds the run time up to whole billing increments (one GPU-hour by
default, like classic cloud billing; set `billing_increment_seconds=1` for per-second
billing). All arithmetic is Decimal; results are quantized to micro-units, half up.

The time estimate learns: with no completed job of that model on that GPU type it is
`DEFAULT_ESTIMATED_SECONDS`; once some have completed it is their exponentially
weighted mean run time (recent jobs count most). Either way it never exceeds the
job's `timeout_seconds`, because the job cannot run longer than that.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from enum import StrEnum
from types import MappingProxyType

import msgspec

MONEY_QUANTUM = Decimal("0.000001")
DEFAULT_ESTIMATED_SECONDS = 600
# Weight of the newest completed run in the learned estimate.
LEARNING_RATE = Decimal("0.2")
_SECONDS_PER_HOUR = Decimal(3600)


class Priority(StrEnum):
    """How urgently a client wants its job run; higher priorities are scheduled first."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    URGENT = "urgent"

    @property
    def rank(self) -> int:
        """Scheduling order: larger runs first."""
        return _RANKS[self]


_RANKS = {Priority.LOW: 0, Priority.NORMAL: 1, Priority.HIGH: 2, Priority.URGENT: 3}

DEFAULT_RATES_PER_GPU_HOUR: Mapping[str, Decimal] = MappingProxyType(
    {
        # A pseudo GPU type: miners without a GPU (CI, demos) offer "cpu".
        "cpu": Decimal("0.01"),
        "t4": Decimal("0.02"),
        "rtx3080": Decimal("0.025"),
        "rtx3090": Decimal("0.03"),
        "l4": Decimal("0.035"),
        "rtx4090": Decimal("0.04"),
        "a10": Decimal("0.04"),
        "v100": Decimal("0.05"),
        "a40": Decimal("0.06"),
        "a6000": Decimal("0.06"),
        "l40": Decimal("0.07"),
        "l40s": Decimal("0.08"),
        "rtx6000ada": Decimal("0.08"),
        "a100": Decimal("0.10"),
        "h100": Decimal("0.20"),
        "mi300x": Decimal("0.22"),
        "h200": Decimal("0.25"),
        "b200": Decimal("0.35"),
    }
)

DEFAULT_PRIORITY_MULTIPLIERS: Mapping[Priority, Decimal] = MappingProxyType(
    {
        Priority.LOW: Decimal("0.8"),
        Priority.NORMAL: Decimal("1.0"),
        Priority.HIGH: Decimal("1.5"),
        Priority.URGENT: Decimal("2.0"),
    }
)


class RateTable(msgspec.Struct, frozen=True, kw_only=True):
    """Prices per GPU-hour by canonical GPU type, priority multipliers and billing increment."""

    per_gpu_hour: Mapping[str, Decimal] = DEFAULT_RATES_PER_GPU_HOUR
    multipliers: Mapping[Priority, Decimal] = DEFAULT_PRIORITY_MULTIPLIERS
    billing_increment_seconds: int = 3600

    def rate(self, gpu_type: str) -> Decimal | None:
        """The price of one GPU-hour of this type, or None if the ledger does not sell it."""
        return self.per_gpu_hour.get(gpu_type)


class Estimate(msgspec.Struct, frozen=True):
    """What a submission is told before it runs."""

    cost: Decimal
    seconds: int


class RuntimeStats(msgspec.Struct, frozen=True):
    """What completed jobs of one model on one GPU type taught the ledger."""

    completed: int
    mean_seconds: Decimal

    def learn(self, seconds: Decimal) -> RuntimeStats:
        """Fold one more completed run into the weighted mean."""
        if self.completed == 0:
            return RuntimeStats(1, seconds)
        mean = self.mean_seconds + LEARNING_RATE * (seconds - self.mean_seconds)
        return RuntimeStats(self.completed + 1, mean)


NO_HISTORY = RuntimeStats(0, Decimal(0))


def billed_hours(seconds: Decimal | int, increment_seconds: int) -> Decimal:
    """Run time rounded up to whole billing increments, in hours; zero time bills nothing."""
    seconds = Decimal(seconds)
    if seconds <= 0:
        return Decimal(0)
    increments = (seconds / increment_seconds).to_integral_value(rounding=ROUND_CEILING)
    return increments * increment_seconds / _SECONDS_PER_HOUR


def price(
    table: RateTable, *, gpu_type: str, gpu_count: int, seconds: Decimal | int, priority: Priority
) -> Decimal:
    """The charge for `seconds` of run time on `gpu_count` GPUs of `gpu_type`."""
    rate = table.rate(gpu_type)
    if rate is None:
        raise KeyError(gpu_type)
    hours = billed_hours(seconds, table.billing_increment_seconds)
    cost = rate * gpu_count * hours * table.multipliers[priority]
    return to_money(cost)


def to_money(amount: Decimal) -> Decimal:
    """Round to micro-units and drop trailing zeros, never into exponent notation (1E+1)."""
    tidy = amount.quantize(MONEY_QUANTUM, rounding=ROUND_HALF_UP).normalize()
    return tidy.quantize(Decimal(1)) if tidy == tidy.to_integral_value() else tidy


def estimate(
    table: RateTable,
    *,
    gpu_type: str,
    gpu_count: int,
    priority: Priority,
    timeout_seconds: int,
    history: RuntimeStats = NO_HISTORY,
) -> Estimate:
    """The expected run time and cost of a job, learned from `history` when there is some."""
    if history.completed:
        learned = int(history.mean_seconds.to_integral_value(rounding=ROUND_HALF_UP))
        seconds = max(1, learned)
    else:
        seconds = DEFAULT_ESTIMATED_SECONDS
    seconds = min(seconds, timeout_seconds)
    cost = price(table, gpu_type=gpu_type, gpu_count=gpu_count, seconds=seconds, priority=priority)
    return Estimate(cost=cost, seconds=seconds)
