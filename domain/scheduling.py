"""Scheduling policy as pure functions: who runs which pending job, and what a held job needs.

`plan` matches pending jobs to miners: highest priority first, first come first within
a priority; a miner qualifies when its normalised GPU type equals the job's, it has at
least the GPUs and VRAM asked for, it is online and it has a free slot. Among those the
cheapest wins, then the one with most free slots. A job no miner takes gets a reason.

`verdict` decides what a job a miner holds needs now: nothing, a timeout, a requeue
(its miner went silent, was deregistered or lost it) or a cancel without confirmation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from domain.gpus import normalize_gpu_type
from domain.jobs import JobStatus, RequeueCause
from domain.pricing import Priority


@dataclass(frozen=True, slots=True)
class MinerOffer:
    """A registered, active miner as the scheduler sees it."""

    miner_id: str
    gpu_type: str
    gpu_count: int
    vram_gb: int
    price_per_hour: Decimal
    max_concurrent: int
    online: bool
    # Attempts the ledger has handed it that are not finished yet.
    inflight: int

    @property
    def free(self) -> int:
        """Slots it can take more work into."""
        return max(self.max_concurrent - self.inflight, 0)

    def fits(self, job: PendingJob) -> bool:
        """True if its hardware can ever run the job (whether or not it is free now)."""
        return normalize_gpu_type(self.gpu_type) == normalize_gpu_type(
            job.gpu_type
        ) and self.has_room_for(job)

    def has_room_for(self, job: PendingJob) -> bool:
        """True if it has at least the GPUs and the VRAM per GPU the job asks for."""
        return self.gpu_count >= job.gpu_count and self.vram_gb >= job.min_vram_gb


@dataclass(frozen=True, slots=True)
class PendingJob:
    """A job waiting for a miner, in log order `seq`."""

    job_id: str
    gpu_type: str
    gpu_count: int
    min_vram_gb: int
    priority: Priority
    seq: int


@dataclass(frozen=True, slots=True)
class Plan:
    """The outcome of one scheduling round."""

    # (job_id, miner_id) in the order they should be written.
    assignments: list[tuple[str, str]] = field(default_factory=list)
    # Why each job that stays pending does.
    reasons: dict[str, str] = field(default_factory=dict)


def queue_order(jobs: Sequence[PendingJob]) -> list[PendingJob]:
    """Highest priority first, then first come (lowest log position) first."""
    return sorted(jobs, key=lambda job: (-job.priority.rank, job.seq))


def plan(jobs: Sequence[PendingJob], miners: Sequence[MinerOffer]) -> Plan:
    """Assign what can run now and explain what cannot."""
    free = {miner.miner_id: miner.free for miner in miners}
    # Normalised once: a round may weigh thousands of jobs against every miner.
    by_type: dict[str, list[MinerOffer]] = {}
    for miner in miners:
        by_type.setdefault(normalize_gpu_type(miner.gpu_type), []).append(miner)
    result = Plan()
    # Jobs with the same requirements wait for the same reason; phrase it once.
    reasons: dict[tuple[object, ...], str] = {}
    for job in queue_order(jobs):
        same_type = by_type.get(normalize_gpu_type(job.gpu_type), [])
        fitting = [miner for miner in same_type if miner.has_room_for(job)]
        ready = [m for m in fitting if m.online and free[m.miner_id] > 0]
        if ready:
            chosen = min(ready, key=lambda m: (m.price_per_hour, -free[m.miner_id], m.miner_id))
            free[chosen.miner_id] -= 1
            result.assignments.append((job.job_id, chosen.miner_id))
            continue
        online = sum(m.online for m in fitting)
        key = (job.gpu_type, job.gpu_count, job.min_vram_gb, len(fitting), online)
        if key not in reasons:
            reasons[key] = _why_waiting(job, fitting)
        result.reasons[job.job_id] = reasons[key]
    return result


def _why_waiting(job: PendingJob, fitting: Sequence[MinerOffer]) -> str:
    wanted = f"{job.gpu_count}x {normalize_gpu_type(job.gpu_type)}"
    if job.min_vram_gb:
        wanted += f" with at least {job.min_vram_gb} GB VRAM"
    if not fitting:
        return f"no registered miner offers {wanted}; the job waits until one does"
    online = [m for m in fitting if m.online]
    if not online:
        return (
            f"waiting for a miner: {len(fitting)} registered miner(s) offer {wanted}, none online"
        )
    return f"waiting for capacity: {len(online)} online miner(s) offer {wanted}, all busy"


class Action(StrEnum):
    """What a held job needs."""

    NONE = "none"
    TIME_OUT = "time_out"
    GIVE_BACK = "give_back"
    CANCEL_UNCONFIRMED = "cancel_unconfirmed"


@dataclass(frozen=True, slots=True)
class HeldJob:
    """A job some miner holds (assigned, running or canceling), with its miner's liveness."""

    job_id: str
    status: JobStatus
    miner_id: str
    attempt: int
    timeout_seconds: int
    assigned_at: datetime
    # When the job entered its current status (the cancel request, for canceling jobs).
    status_since: datetime
    miner_active: bool
    last_heartbeat_at: datetime | None
    # What the miner's latest heartbeat says it holds.
    miner_holds: frozenset[tuple[str, int]]


@dataclass(frozen=True, slots=True)
class Verdict:
    """An action and, for a give-back, its cause; `reason` says why, for logs and events."""

    action: Action
    cause: RequeueCause | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Leases:
    """The time limits that `verdict` applies."""

    lease: timedelta
    cancel_grace: timedelta


KEEP = Verdict(Action.NONE)


def verdict(job: HeldJob, now: datetime, leases: Leases, *, watching_since: datetime) -> Verdict:
    """What `job` needs at `now`; heartbeats only count once we watched them for a lease."""
    silent = job.last_heartbeat_at is None or job.last_heartbeat_at < now - leases.lease
    # Right after a (re)start nobody has heard the miners yet: give them one lease first.
    gone = not job.miner_active or (silent and now - watching_since >= leases.lease)
    if job.status is JobStatus.CANCELING:
        return _canceling(job, now, leases, gone=gone)
    if now >= job.assigned_at + timedelta(seconds=job.timeout_seconds):
        return Verdict(Action.TIME_OUT, reason=f"ran out of its {job.timeout_seconds} s")
    if not job.miner_active:
        return Verdict(Action.GIVE_BACK, RequeueCause.MINER_DEREGISTERED, "miner deregistered")
    if now - job.assigned_at < leases.lease:
        return KEEP  # too early to judge: the miner may not have picked it up yet
    if gone:
        return Verdict(Action.GIVE_BACK, RequeueCause.LEASE_EXPIRED, "miner heartbeats stopped")
    return _lost_check(job, leases)


def _canceling(job: HeldJob, now: datetime, leases: Leases, *, gone: bool) -> Verdict:
    grace = leases.cancel_grace
    if now - job.status_since >= grace:
        reason = f"the miner did not confirm within {grace.total_seconds():g} s"
        return Verdict(Action.CANCEL_UNCONFIRMED, reason=reason)
    if gone:
        return Verdict(Action.CANCEL_UNCONFIRMED, reason="the miner is gone")
    return KEEP


def _lost_check(job: HeldJob, leases: Leases) -> Verdict:
    """A live miner whose heartbeats, well after the assignment, do not list the attempt."""
    if job.last_heartbeat_at is None or job.last_heartbeat_at - job.assigned_at < leases.lease:
        return KEEP
    if (job.job_id, job.attempt) in job.miner_holds:
        return KEEP
    return Verdict(Action.GIVE_BACK, RequeueCause.LOST_BY_MINER, "miner no longer holds it")
