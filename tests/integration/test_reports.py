"""Miner reports applied to jobs on a real PostgreSQL event store (the ingestor's core)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app import protocol
from app.ingestor import Outcome, apply_report, billed_seconds
from app.receipts import encode_public_key, key_id_of, raw_public_key
from app.store import JobLedger
from domain.errors import JobNotFound, NotFound
from domain.jobs import RequeueCause
from domain.miners import Capabilities
from tests.integration.helpers import spec

MAX_ATTEMPTS = 3
TERMINAL_EVENTS = {"JobCompleted", "JobFailed", "JobCanceled", "JobTimedOut"}
OUTPUT = "the answer is 42\n"


def register(ledger: JobLedger, name: str) -> str:
    miner, _ = ledger.register_miner(
        name,
        Capabilities(
            gpu_type="cpu",
            gpu_count=1,
            vram_gb=0,
            location="test",
            price_per_hour=Decimal("0.01"),
            max_concurrent=2,
        ),
    )
    return miner.miner_id


@dataclass
class Scene:
    """A job on the ledger, assigned to `miner`; `other` is a second registered miner."""

    ledger: JobLedger
    job_id: str
    miner: str
    other: str

    def report(self, report: protocol.Report, *, max_attempts: int = MAX_ATTEMPTS) -> Outcome:
        return apply_report(self.ledger, self.job_id, report, max_attempts=max_attempts)

    def status(self) -> str:
        return self.ledger.job_row(self.job_id, owner=None).status

    def event_types(self) -> list[str]:
        return [event.type for event in self.ledger.job_events(self.job_id, owner=None)]

    def terminal_events(self) -> list[str]:
        return [kind for kind in self.event_types() if kind in TERMINAL_EVENTS]


def make_scene(ledger: JobLedger, **changes: object) -> Scene:
    job_id = ledger.submit(
        owner="alice",
        spec=spec(**({"gpu_type": "cpu", "min_vram_gb": 0, "output_format": "text"} | changes)),
        idempotency_key=None,
    ).job_id
    miner, other = register(ledger, "first"), register(ledger, "second")
    ledger.change_job(job_id, lambda job: job.assign(miner))
    return Scene(ledger=ledger, job_id=job_id, miner=miner, other=other)


@pytest.fixture
def scene(ledger: JobLedger) -> Scene:
    return make_scene(ledger)


def now() -> datetime:
    return datetime.now(UTC)


def started(miner: str, attempt: int = 1) -> protocol.Started:
    return protocol.Started(miner_id=miner, attempt=attempt, at=now())


def progress(miner: str, percent: int, attempt: int = 1) -> protocol.Progress:
    return protocol.Progress(miner_id=miner, attempt=attempt, at=now(), progress=percent)


def inline(data: str = OUTPUT, *, sha256: str | None = None) -> protocol.InlineResult:
    raw = data.encode("utf-8")
    return protocol.InlineResult(
        data=data,
        content_type="text/plain",
        size_bytes=len(raw),
        sha256=sha256 or hashlib.sha256(raw).hexdigest(),
    )


def completed(
    miner: str,
    attempt: int = 1,
    *,
    result: protocol.InlineResult | None = None,
    seconds: float = 0.01,
) -> protocol.Completed:
    return protocol.Completed(
        miner_id=miner,
        attempt=attempt,
        at=now(),
        result=result or inline(),
        metrics=protocol.Metrics(execution_seconds=seconds),
    )


def failed(miner: str, code: str, message: str, attempt: int = 1) -> protocol.Failed:
    return protocol.Failed(
        miner_id=miner,
        attempt=attempt,
        at=now(),
        error=protocol.ErrorInfo(code=code, message=message),
    )


def canceled(miner: str, attempt: int = 1) -> protocol.Canceled:
    return protocol.Canceled(miner_id=miner, attempt=attempt, at=now())


def released(miner: str, attempt: int = 1) -> protocol.Released:
    return protocol.Released(miner_id=miner, attempt=attempt, at=now(), reason="draining")


def test_a_job_runs_to_completion_through_its_reports(scene: Scene) -> None:
    assert scene.report(started(scene.miner)) is Outcome.APPLIED
    assert scene.status() == "running"

    assert scene.report(progress(scene.miner, 30)) is Outcome.APPLIED
    assert scene.report(progress(scene.miner, 20)) is Outcome.IGNORED
    row = scene.ledger.job_row(scene.job_id, owner=None)
    assert (row.status, row.progress) == ("running", 30)

    assert scene.report(completed(scene.miner)) is Outcome.APPLIED
    row = scene.ledger.job_row(scene.job_id, owner=None)
    assert (row.status, row.progress) == ("completed", 100)
    assert row.cost is not None and row.cost > 0
    assert row.result is not None
    assert row.result["data"] == OUTPUT
    assert row.result["sha256"] == hashlib.sha256(OUTPUT.encode()).hexdigest()
    assert scene.event_types() == [
        "JobSubmitted",
        "JobAssigned",
        "JobStarted",
        "JobProgressReported",
        "JobCompleted",
    ]


def test_a_duplicate_completion_is_ignored(scene: Scene) -> None:
    scene.report(started(scene.miner))
    assert scene.report(completed(scene.miner)) is Outcome.APPLIED
    cost = scene.ledger.job_row(scene.job_id, owner=None).cost

    assert scene.report(completed(scene.miner, seconds=999)) is Outcome.IGNORED
    assert scene.event_types().count("JobCompleted") == 1
    assert scene.ledger.job_row(scene.job_id, owner=None).cost == cost


def test_a_duplicate_start_is_ignored(scene: Scene) -> None:
    assert scene.report(started(scene.miner)) is Outcome.APPLIED
    assert scene.report(started(scene.miner)) is Outcome.IGNORED
    assert scene.event_types().count("JobStarted") == 1


def test_a_result_whose_digest_does_not_match_fails_the_job(scene: Scene) -> None:
    scene.report(started(scene.miner))
    tampered = inline(sha256=hashlib.sha256(b"something else").hexdigest())
    assert scene.report(completed(scene.miner, result=tampered)) is Outcome.APPLIED
    row = scene.ledger.job_row(scene.job_id, owner=None)
    assert (row.status, row.error_code) == ("failed", "invalid_result")
    assert row.result is None and row.cost is None
    assert scene.terminal_events() == ["JobFailed"]


def test_a_result_whose_size_does_not_match_fails_the_job(scene: Scene) -> None:
    scene.report(started(scene.miner))
    wrong_size = protocol.InlineResult(
        data=OUTPUT,
        size_bytes=len(OUTPUT) + 1,
        sha256=hashlib.sha256(OUTPUT.encode()).hexdigest(),
    )
    scene.report(completed(scene.miner, result=wrong_size))
    row = scene.ledger.job_row(scene.job_id, owner=None)
    assert (row.status, row.error_code) == ("failed", "invalid_result")


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"output_format": "json"}, "must be valid JSON"),
        ({"output_format": "archive"}, "must be a zip file"),
        ({"output_destination": "s3://results/run"}, "must be stored through the result upload"),
    ],
)
def test_an_inline_result_the_job_did_not_ask_for_fails_it(
    ledger: JobLedger, changes: dict[str, object], problem: str
) -> None:
    scene = make_scene(ledger, **changes)
    scene.report(completed(scene.miner))
    row = scene.ledger.job_row(scene.job_id, owner=None)
    assert (row.status, row.error_code) == ("failed", "invalid_result")
    assert row.error is not None and problem in row.error


def test_a_completion_records_the_result_with_its_format(scene: Scene) -> None:
    scene.report(completed(scene.miner))
    result = scene.ledger.job_row(scene.job_id, owner=None).result
    assert result is not None
    assert (result["storage"], result["format"], result["data"]) == ("inline", "text", OUTPUT)


@pytest.mark.parametrize(
    "stale",
    [
        pytest.param(lambda s: completed(s.other), id="another-miner"),
        pytest.param(lambda s: started(s.other), id="another-miner-start"),
        pytest.param(lambda s: completed(s.miner, attempt=2), id="future-attempt"),
    ],
)
def test_a_report_from_a_non_holder_is_rejected_once_and_changes_nothing(
    scene: Scene, stale: Callable[[Scene], protocol.Report]
) -> None:
    scene.report(started(scene.miner))
    report = stale(scene)
    outcomes = [scene.report(report) for _ in range(3)]
    assert outcomes == [Outcome.REJECTED] * 3
    assert scene.event_types().count("JobReportRejected") == 1
    [rejection] = [
        e
        for e in scene.ledger.job_events(scene.job_id, owner=None)
        if e.type == "JobReportRejected"
    ]
    assert (rejection.data["miner_id"], rejection.data["attempt"]) == (
        report.miner_id,
        report.attempt,
    )
    row = scene.ledger.job_row(scene.job_id, owner=None)
    assert (row.status, row.miner_id, row.attempt, row.result) == ("running", scene.miner, 1, None)


def test_after_a_requeue_the_old_attempts_completion_is_rejected(scene: Scene) -> None:
    scene.report(started(scene.miner))
    scene.ledger.change_job(
        scene.job_id,
        lambda job: job.give_back(RequeueCause.LEASE_EXPIRED, max_attempts=MAX_ATTEMPTS),
    )
    scene.ledger.change_job(scene.job_id, lambda job: job.assign(scene.other))

    assert scene.report(completed(scene.miner, attempt=1)) is Outcome.REJECTED
    row = scene.ledger.job_row(scene.job_id, owner=None)
    assert (row.status, row.attempt, row.miner_id, row.result) == (
        "assigned",
        2,
        scene.other,
        None,
    )
    assert scene.terminal_events() == []

    # The new holder still completes it.
    assert scene.report(completed(scene.other, attempt=2)) is Outcome.APPLIED
    assert scene.status() == "completed"


def test_the_same_miner_cannot_complete_an_attempt_it_lost(scene: Scene) -> None:
    scene.ledger.change_job(
        scene.job_id,
        lambda job: job.give_back(RequeueCause.LOST_BY_MINER, max_attempts=MAX_ATTEMPTS),
    )
    scene.ledger.change_job(scene.job_id, lambda job: job.assign(scene.miner))
    assert scene.report(completed(scene.miner, attempt=1)) is Outcome.REJECTED
    assert scene.status() == "assigned"


def test_a_failure_report_fails_the_job_with_the_miners_error(scene: Scene) -> None:
    scene.report(started(scene.miner))
    outcome = scene.report(failed(scene.miner, "cuda_oom", "CUDA out of memory"))
    assert outcome is Outcome.APPLIED
    row = scene.ledger.job_row(scene.job_id, owner=None)
    assert (row.status, row.error_code, row.error) == ("failed", "cuda_oom", "CUDA out of memory")


def test_a_canceled_report_confirms_a_cancel(scene: Scene) -> None:
    scene.report(started(scene.miner))
    row, _ = scene.ledger.cancel(scene.job_id, owner="alice")
    assert row.status == "canceling"
    assert scene.report(canceled(scene.miner)) is Outcome.APPLIED
    assert scene.status() == "canceled"
    assert scene.terminal_events() == ["JobCanceled"]


def test_a_released_job_goes_back_to_the_queue_as_its_next_attempt(scene: Scene) -> None:
    scene.report(started(scene.miner))
    assert scene.report(released(scene.miner)) is Outcome.APPLIED
    row = scene.ledger.job_row(scene.job_id, owner=None)
    assert (row.status, row.attempt, row.miner_id) == ("pending", 2, None)
    [requeued] = [
        e for e in scene.ledger.job_events(scene.job_id, owner=None) if e.type == "JobRequeued"
    ]
    assert requeued.data["cause"] == "miner_released"
    assert requeued.data["previous_miner_id"] == scene.miner


def test_a_release_of_the_last_allowed_attempt_fails_the_job(scene: Scene) -> None:
    scene.report(started(scene.miner))
    assert scene.report(released(scene.miner), max_attempts=1) is Outcome.APPLIED
    row = scene.ledger.job_row(scene.job_id, owner=None)
    assert (row.status, row.error_code) == ("failed", "attempts_exhausted")
    assert scene.terminal_events() == ["JobFailed"]


def test_a_completion_racing_a_cancel_wins(scene: Scene) -> None:
    scene.report(started(scene.miner))
    scene.ledger.cancel(scene.job_id, owner="alice")
    assert scene.report(completed(scene.miner)) is Outcome.APPLIED
    # The miner's confirmation of the cancel arrives after its result: too late.
    assert scene.report(canceled(scene.miner)) is Outcome.IGNORED
    row = scene.ledger.job_row(scene.job_id, owner=None)
    assert row.status == "completed" and row.cost is not None and row.cost > 0
    assert scene.terminal_events() == ["JobCompleted"]


def test_a_report_for_an_unknown_job_is_not_found(ledger: JobLedger) -> None:
    miner = register(ledger, "lonely")
    unknown = "job_" + "0" * 32
    with pytest.raises(JobNotFound) as missing:
        apply_report(ledger, unknown, started(miner), max_attempts=MAX_ATTEMPTS)
    assert isinstance(missing.value, NotFound)
    assert ledger.head() == 1  # only the miner's registration was written


def test_a_miner_cannot_bill_more_time_than_passed_since_assignment(scene: Scene) -> None:
    scene.report(started(scene.miner))
    # A day at the hourly increment would be 24 hours of "cpu" at 0.01 per hour.
    scene.report(completed(scene.miner, seconds=86_400))
    events = scene.ledger.job_events(scene.job_id, owner=None)
    assigned = next(e for e in events if e.type == "JobAssigned")
    done = next(e for e in events if e.type == "JobCompleted")
    elapsed = Decimal(str((done.timestamp - assigned.timestamp).total_seconds()))
    assert Decimal(str(done.data["gpu_seconds"])) <= elapsed + Decimal("0.001")
    assert Decimal(str(done.data["cost"])) == Decimal("0.01")


def test_billed_seconds_is_the_lesser_of_claimed_and_observed(scene: Scene) -> None:
    job = scene.ledger.job(scene.job_id)
    assert job.assigned_at is not None
    five_seconds_later = job.assigned_at + timedelta(seconds=5)

    def billed(claimed: float) -> Decimal:
        return billed_seconds(job, protocol.Metrics(execution_seconds=claimed), five_seconds_later)

    assert billed(3600) == Decimal(5)
    assert billed(2.5) == Decimal("2.5")
    assert billed(0) == Decimal(0)


def test_a_cancel_confirmation_for_an_attempt_no_longer_held_changes_and_records_nothing(
    scene: Scene,
) -> None:
    scene.report(started(scene.miner))
    scene.ledger.change_job(
        scene.job_id,
        lambda job: job.give_back(RequeueCause.LOST_BY_MINER, max_attempts=MAX_ATTEMPTS),
    )
    before = scene.event_types()

    # The old holder answers the cancel order the requeue sent it.
    assert scene.report(canceled(scene.miner, attempt=1)) is Outcome.IGNORED
    assert scene.report(released(scene.miner, attempt=1)) is Outcome.IGNORED
    assert scene.event_types() == before


def test_a_miner_saying_timed_out_before_the_deadline_fails_the_job_instead(
    scene: Scene,
) -> None:
    scene.report(started(scene.miner))
    assert scene.report(failed(scene.miner, "timed_out", "too slow")) is Outcome.APPLIED
    view = scene.ledger.job_row(scene.job_id, owner=None)
    # The deadline (assignment + 3600 s) is far away: the ledger does not call it a timeout.
    assert (view.status, view.error_code) == ("failed", "timed_out")


def test_a_failure_while_canceling_confirms_the_cancel(scene: Scene) -> None:
    scene.report(started(scene.miner))
    scene.ledger.cancel(scene.job_id, owner=None)
    assert scene.report(failed(scene.miner, "executor_crashed", "boom")) is Outcome.APPLIED
    assert scene.status() == "canceled"
    assert scene.terminal_events() == ["JobCanceled"]


def test_an_inline_result_over_the_limit_fails_the_job(scene: Scene) -> None:
    big = "x" * (protocol.MAX_INLINE_RESULT_BYTES + 1)
    scene.report(completed(scene.miner, result=inline(big)))
    view = scene.ledger.job_row(scene.job_id, owner=None)
    assert (view.status, view.error_code) == ("failed", "invalid_result")


def test_shuffled_and_tripled_reports_end_in_one_completion(scene: Scene) -> None:
    reports: list[protocol.Report] = [
        completed(scene.miner),
        progress(scene.miner, 50),
        started(scene.miner),
        failed(scene.miner, "requested_failure", "late"),
        progress(scene.miner, 20),
        canceled(scene.miner),
    ]
    for report in reports * 3:
        scene.report(report)

    assert scene.status() == "completed"
    assert scene.terminal_events() == ["JobCompleted"]
    # Nothing after the completion was applied: no start, no progress, no rejection.
    assert scene.event_types() == ["JobSubmitted", "JobAssigned", "JobCompleted"]


def test_fencing_comes_before_receipts(scene: Scene) -> None:
    """A non-holder is refused for not holding the attempt, signed or not."""
    raw = raw_public_key(Ed25519PrivateKey.generate())
    for miner_id in (scene.miner, scene.other):
        scene.ledger.change_miner(
            miner_id, lambda miner: miner.register_key(key_id_of(raw), encode_public_key(raw))
        )
    assert scene.report(completed(scene.other)) is Outcome.REJECTED
    [rejection] = [
        e.data
        for e in scene.ledger.job_events(scene.job_id, owner=None)
        if e.type == "JobReportRejected"
    ]
    assert rejection["reason"] == f"job is on attempt 1 held by {scene.miner}"
    # The holder's unsigned completion is refused for its missing receipt instead.
    assert scene.report(completed(scene.miner)) is Outcome.REJECTED
    reasons = [
        e.data["reason"]
        for e in scene.ledger.job_events(scene.job_id, owner=None)
        if e.type == "JobReportRejected"
    ]
    assert reasons[-1].startswith("receipt: ") and scene.status() == "assigned"
