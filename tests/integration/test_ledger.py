"""The write side on a real PostgreSQL event store."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError

from app.store import JobLedger
from domain.errors import (
    Conflict,
    IdempotencyConflict,
    InvalidJobRequest,
    InvalidTransition,
    JobNotFound,
)
from domain.jobs import Job, aggregate_id_of
from tests.integration.helpers import run_to_completion, spec
from tests.unit.job_builders import RIG


def stored_events(database_url: str, job_id: str) -> list[tuple[int, str]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT originator_version, topic FROM jobledger_events "
            "WHERE originator_id = %s ORDER BY originator_version",
            (aggregate_id_of(job_id),),
        ).fetchall()
    return [(version, topic.rsplit(".", 1)[-1]) for version, topic in rows]


def test_submission_is_one_stored_event(ledger: JobLedger, database_url: str) -> None:
    outcome = ledger.submit(owner="alice", spec=spec(), idempotency_key=None)
    assert outcome.created
    assert outcome.estimated_cost == Decimal("0.05") and outcome.estimated_time_seconds == 600
    assert stored_events(database_url, outcome.job_id) == [(1, "Submitted")]
    assert ledger.head() == outcome.position


def test_racing_idempotent_submissions_create_one_job(ledger: JobLedger, database_url: str) -> None:
    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = list(
            pool.map(
                lambda _: ledger.submit(owner="alice", spec=spec(), idempotency_key="k-1"),
                range(20),
            )
        )
    assert len({o.job_id for o in outcomes}) == 1
    assert sum(o.created for o in outcomes) == 1
    assert stored_events(database_url, outcomes[0].job_id) == [(1, "Submitted")]


def test_idempotency_key_with_another_body_is_refused(ledger: JobLedger) -> None:
    first = ledger.submit(owner="alice", spec=spec(), idempotency_key="k-2")
    with pytest.raises(IdempotencyConflict) as refused:
        ledger.submit(owner="alice", spec=spec(model="llama"), idempotency_key="k-2")
    assert refused.value.details["job_id"] == first.job_id


def test_idempotency_keys_belong_to_their_client(ledger: JobLedger) -> None:
    alice = ledger.submit(owner="alice", spec=spec(), idempotency_key="shared")
    bob = ledger.submit(owner="bob", spec=spec(), idempotency_key="shared")
    assert alice.job_id != bob.job_id and bob.created


def test_unknown_gpu_type_is_refused_before_anything_is_stored(ledger: JobLedger) -> None:
    with pytest.raises(InvalidJobRequest, match="known types"):
        ledger.submit(owner="alice", spec=spec(gpu_type="tpu9000"), idempotency_key=None)
    assert ledger.head() == 0


def test_versions_are_checked_optimistically(ledger: JobLedger) -> None:
    job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    first: Job = ledger.repository.get(aggregate_id_of(job_id))
    second: Job = ledger.repository.get(aggregate_id_of(job_id))
    first.assign("miner_a")
    second.assign("miner_b")
    ledger.save(first)
    with pytest.raises(IntegrityError):
        ledger.save(second)
    assert ledger.repository.get(aggregate_id_of(job_id)).miner_id == "miner_a"


def test_concurrent_cancels_record_one_terminal_event(ledger: JobLedger, database_url: str) -> None:
    job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id

    def cancel(_: int) -> str:
        try:
            ledger.cancel(job_id, owner="alice")
        except InvalidTransition:
            return "409"
        except Conflict:
            return "busy"
        return "ok"

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(cancel, range(50)))
    assert answers.count("ok") == 1
    assert answers.count("409") == 49
    assert stored_events(database_url, job_id) == [(1, "Submitted"), (2, "Canceled")]


def test_cancel_of_a_running_job_asks_the_miner_first(ledger: JobLedger) -> None:
    job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    job: Job = ledger.repository.get(aggregate_id_of(job_id))
    job.assign("miner_a")
    job.start(attempt=1, miner_id="miner_a")
    ledger.save(job)
    row, position = ledger.cancel(job_id, owner="alice")
    assert row.status == "canceling" and position > 0
    # Asking again changes nothing and writes nothing.
    row, position = ledger.cancel(job_id, owner="alice")
    assert row.status == "canceling" and position == 0


def test_other_owners_jobs_are_not_found(ledger: JobLedger) -> None:
    job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    for read in (ledger.job_row, ledger.job_events):
        with pytest.raises(JobNotFound):
            read(job_id, owner="mallory")
    with pytest.raises(JobNotFound):
        ledger.cancel(job_id, owner="mallory")
    assert ledger.job_row(job_id, owner=None).status == "pending"


def test_events_read_back_in_order_with_their_data(ledger: JobLedger) -> None:
    job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key="k").job_id
    ledger.cancel(job_id, owner="alice")
    events = ledger.job_events(job_id, owner="alice")
    assert [(e.sequence, e.type) for e in events] == [(1, "JobSubmitted"), (2, "JobCanceled")]
    assert events[0].timestamp <= events[1].timestamp
    assert events[0].data["model"] == "gpt2"
    assert events[0].data["idempotency_key"] == "k"
    assert "originator_id" not in events[0].data


def test_change_jobs_commits_many_commands_together_and_reports_each_outcome(
    ledger: JobLedger,
) -> None:
    first, second, gone = (
        ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id for _ in range(3)
    )
    ledger.cancel(gone, owner=None)
    head = ledger.head()

    results, position = ledger.change_jobs(
        [
            (first, lambda job: job.assign("miner_a")),
            (second, lambda job: job.assign("miner_b")),
            (gone, lambda job: job.assign("miner_a")),  # canceled: refused, records nothing
            (first, lambda job: job.start(attempt=1, miner_id="miner_a")),  # same job, in order
        ]
    )

    assert results[0] is None and results[1] is None and results[3] is None
    assert isinstance(results[2], InvalidTransition)
    assert position == ledger.head() == head + 3
    assert [e.type for e in ledger.job_events(first, owner=None)][-2:] == [
        "JobAssigned",
        "JobStarted",
    ]
    assert ledger.job_row(gone, owner=None).status == "canceled"


def test_change_jobs_runs_each_command_alone_when_another_writer_got_in_first(
    ledger: JobLedger, database_url: str
) -> None:
    job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    other = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    interrupted: list[bool] = []

    def assign_after_a_racing_cancel(job: Job) -> None:
        if not interrupted:  # another writer saves version 2 while we hold version 1
            interrupted.append(True)
            ledger.cancel(job_id, owner=None)
        job.assign("miner_a")

    results, _ = ledger.change_jobs(
        [(job_id, assign_after_a_racing_cancel), (other, lambda job: job.assign("miner_b"))]
    )

    # The batch was refused as a whole, then each command ran on fresh state.
    assert isinstance(results[0], InvalidTransition)  # the job was canceled meanwhile
    assert results[1] is None
    assert stored_events(database_url, job_id) == [(1, "Submitted"), (2, "Canceled")]
    assert [v for v, _ in stored_events(database_url, other)] == [1, 2]


def test_jobs_now_reads_many_jobs_as_the_repository_would(ledger: JobLedger) -> None:
    first = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    second = ledger.submit(owner="bob", spec=spec(model="llama"), idempotency_key=None).job_id
    run_to_completion(ledger, second)
    miner, _ = ledger.register_miner("m", RIG)
    found = ledger.jobs_now(
        [first, second, "job_" + "0" * 32, "not-a-job-id", "job_" + miner.id.hex]
    )
    assert set(found) == {first, second}  # unknown, malformed and a miner's id: left out
    for job_id, job in found.items():
        expected = ledger.job(job_id)
        assert (job.version, job.status, job.owner) == (
            expected.version,
            expected.status,
            expected.owner,
        )
