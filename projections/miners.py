"""The miner read models: one row per registered miner, and each miner's job record.

Both are pure folds over the event log, like the job views: `fold_miner` over
Miner events, and `stats_delta` over job events, which credits or debits the
miner that held the job. The projector applies them in the same transaction as
the job views, so all three always describe the same log position.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal, Protocol

import msgspec

from domain.jobs import Job
from domain.miners import Miner, miner_id_of
from domain.pricing import to_money

_SECONDS_PER_HOUR = Decimal(3600)
# Rates are ratios, shown to four places; durations to the millisecond.
_RATE_QUANTUM = Decimal("0.0001")
_SECONDS_QUANTUM = Decimal("0.001")

# Online: heartbeat within the lease. Draining: online, shutting down, taking no new work.
# Offline: registered but silent. Deregistered: retired.
MinerStatus = Literal["online", "draining", "offline", "deregistered"]
MINER_EVENTS = (Miner.Registered, Miner.CapabilitiesUpdated, Miner.Deregistered)


class MinerRow(msgspec.Struct, kw_only=True):
    """What the registry shows about one miner, as of `version`; `seq` orders registrations."""

    miner_id: str
    name: str
    gpu_type: str
    gpu_count: int
    vram_gb: int
    location: str
    price_per_hour: Decimal
    max_concurrent: int
    active: bool
    registered_at: datetime
    updated_at: datetime
    version: int
    seq: int


class MinerView(MinerRow, kw_only=True):
    """A miner's row with what its heartbeats and the job views say about it now."""

    status: MinerStatus
    last_heartbeat_at: datetime | None
    # Jobs the ledger has handed it that are not finished (assigned, running, canceling).
    inflight: int
    # What the miner itself said it runs in its last heartbeat.
    reported_inflight: int | None
    gpus: list[dict[str, Any]]


def fold_miner(row: MinerRow | None, event: Any, seq: int) -> MinerRow:
    """The row after `event`; `seq` is the event's position in the log."""
    if isinstance(event, Miner.Registered):
        return MinerRow(
            miner_id=miner_id_of(event.originator_id),
            name=event.name,
            gpu_type=event.gpu_type,
            gpu_count=event.gpu_count,
            vram_gb=event.vram_gb,
            location=event.location,
            price_per_hour=event.price_per_hour,
            max_concurrent=event.max_concurrent,
            active=True,
            registered_at=event.timestamp,
            updated_at=event.timestamp,
            version=event.originator_version,
            seq=seq,
        )
    if row is None:
        raise ValueError(f"event {type(event).__qualname__} for a miner with no Registered event")
    changes: dict[str, Any] = {"updated_at": event.timestamp, "version": event.originator_version}
    match event:
        case Miner.CapabilitiesUpdated():
            changes |= {
                "gpu_type": event.gpu_type,
                "gpu_count": event.gpu_count,
                "vram_gb": event.vram_gb,
                "location": event.location,
                "price_per_hour": event.price_per_hour,
                "max_concurrent": event.max_concurrent,
            }
        case Miner.Deregistered():
            changes["active"] = False
        case _:
            raise ValueError(f"not a miner event: {type(event).__qualname__}")
    return msgspec.structs.replace(row, **changes)


def view_of_written(miner: Miner, seen: MinerView | None) -> MinerView:
    """The view of a miner just changed, when the views have not caught up with the change.

    What the miner offers comes from the aggregate (it holds the write); liveness
    and held jobs from the view as last seen, since no event changes them.
    """
    if seen is not None and seen.version >= miner.version:
        return seen
    status: MinerStatus = "deregistered" if not miner.active else "offline"
    if miner.active and seen is not None:
        status = seen.status  # its liveness is the same as before the write
    return MinerView(
        miner_id=miner.miner_id,
        name=miner.name,
        **msgspec.structs.asdict(miner.capabilities),
        active=miner.active,
        registered_at=miner.created_on,
        updated_at=miner.modified_on,
        version=miner.version,
        seq=seen.seq if seen is not None else 0,
        status=status,
        last_heartbeat_at=seen.last_heartbeat_at if seen is not None else None,
        inflight=seen.inflight if seen is not None else 0,
        reported_inflight=seen.reported_inflight if seen is not None else None,
        gpus=seen.gpus if seen is not None else [],
    )


class MinerStats(msgspec.Struct, frozen=True, kw_only=True):
    """A miner's job record: finished attempts by outcome, run time, GPU time and earnings."""

    miner_id: str
    finished_jobs: int = 0
    completed_jobs: int = 0
    failed_jobs: int = 0
    timed_out_jobs: int = 0
    # From start (or assignment, if no start was reported) to completion, completed jobs only.
    total_run_seconds: Decimal = Decimal(0)
    gpu_seconds: Decimal = Decimal(0)
    earnings: Decimal = Decimal(0)

    def plus(self, other: MinerStats) -> MinerStats:
        """These stats with `other` (of the same miner) added."""
        if other.miner_id != self.miner_id:
            raise ValueError(f"cannot add stats of {other.miner_id} to {self.miner_id}")
        return MinerStats(
            miner_id=self.miner_id,
            finished_jobs=self.finished_jobs + other.finished_jobs,
            completed_jobs=self.completed_jobs + other.completed_jobs,
            failed_jobs=self.failed_jobs + other.failed_jobs,
            timed_out_jobs=self.timed_out_jobs + other.timed_out_jobs,
            total_run_seconds=self.total_run_seconds + other.total_run_seconds,
            gpu_seconds=self.gpu_seconds + other.gpu_seconds,
            earnings=self.earnings + other.earnings,
        )

    @property
    def success_rate(self) -> Decimal | None:
        """Completed out of finished, to four places; None before anything finished."""
        if self.finished_jobs == 0:
            return None
        return _tidy(Decimal(self.completed_jobs) / self.finished_jobs, _RATE_QUANTUM)

    @property
    def average_completion_time(self) -> Decimal | None:
        """Mean run time of completed jobs in seconds; None before any completed."""
        if self.completed_jobs == 0:
            return None
        return _tidy(self.total_run_seconds / self.completed_jobs, _SECONDS_QUANTUM)

    @property
    def earnings_per_gpu_hour(self) -> Decimal | None:
        """Earnings per GPU-hour actually used; None while no GPU time is recorded."""
        if self.gpu_seconds == 0:
            return None
        return to_money(self.earnings / (self.gpu_seconds / _SECONDS_PER_HOUR))


class HeldJob(Protocol):
    """What the stats need of a job's row before an event (a `JobRow` provides it)."""

    @property
    def miner_id(self) -> str | None: ...

    @property
    def assigned_at(self) -> datetime | None: ...

    @property
    def started_at(self) -> datetime | None: ...


def stats_delta(before: HeldJob | None, event: Any) -> MinerStats | None:
    """What a job event adds to a miner's stats, given the job's row before it; None if nothing.

    `before` is None for a job not seen yet (its Submitted event). A completion
    credits the miner that completed it; a failure or time-out counts against
    the miner holding the job. Requeues and cancels count for no one.
    """
    if before is None:
        return None
    match event:
        case Job.Completed():
            began = before.started_at or before.assigned_at
            run = _seconds(event.timestamp - began) if began is not None else Decimal(0)
            return MinerStats(
                miner_id=event.miner_id,
                finished_jobs=1,
                completed_jobs=1,
                total_run_seconds=max(run, Decimal(0)),
                gpu_seconds=event.gpu_seconds,
                earnings=event.cost,
            )
        case Job.Failed() if before.miner_id is not None:
            return MinerStats(miner_id=before.miner_id, finished_jobs=1, failed_jobs=1)
        case Job.TimedOut() if before.miner_id is not None:
            return MinerStats(miner_id=before.miner_id, finished_jobs=1, timed_out_jobs=1)
    return None


def _seconds(elapsed: timedelta) -> Decimal:
    """A duration in exact decimal seconds (microsecond resolution)."""
    whole = elapsed.days * 86400 + elapsed.seconds
    return whole + Decimal(elapsed.microseconds) / 1_000_000


def _tidy(value: Decimal, quantum: Decimal) -> Decimal:
    """Round half up to `quantum` and drop trailing zeros, never into exponent notation."""
    rounded = value.quantize(quantum, rounding=ROUND_HALF_UP).normalize()
    return rounded.quantize(Decimal(1)) if rounded == rounded.to_integral_value() else rounded
