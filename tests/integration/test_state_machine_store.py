"""The job state machine against the real event store, driven by Hypothesis (issue 6, item 8).

Hypothesis runs random sequences of everything that can happen to jobs: clients
submit and cancel, the scheduler assigns, times out and requeues, miners (the holder
or a stranger, on the current attempt or a stale one) report started, progress,
completed, failed, canceled and released. Commands the domain refuses record nothing.
After every step the invariants hold: at most one terminal event per job, versions
contiguous from 1, and the projected views equal a replay of each job's events.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from app import protocol
from app.ingestor import apply_report
from app.projector import Projector
from app.store import JobLedger, postgres_env
from domain.errors import DomainError
from domain.jobs import RequeueCause, aggregate_id_of
from projections import tables
from projections.jobs import fold
from tests.integration.helpers import spec

TERMINAL = {"Job.Completed", "Job.Failed", "Job.Canceled", "Job.TimedOut"}
MINERS = ("miner_a", "miner_b")
OUTPUT = b"done"


def now() -> datetime:
    return datetime.now(UTC)


def inline() -> protocol.InlineResult:
    return protocol.InlineResult(
        data=OUTPUT.decode(),
        size_bytes=len(OUTPUT),
        sha256=hashlib.sha256(OUTPUT).hexdigest(),
        content_type="text/plain",
    )


def report_of(kind: str, miner: str, attempt: int) -> protocol.Report:
    common: dict[str, Any] = {"miner_id": miner, "attempt": attempt, "at": now()}
    match kind:
        case "started":
            return protocol.Started(**common)
        case "progress":
            return protocol.Progress(**common, progress=50)
        case "completed":
            return protocol.Completed(
                **common, result=inline(), metrics=protocol.Metrics(execution_seconds=0.1)
            )
        case "failed":
            return protocol.Failed(**common, error=protocol.ErrorInfo(code="oops", message="x"))
        case "canceled":
            return protocol.Canceled(**common)
        case _:
            return protocol.Released(**common)


class JobLifecycles(RuleBasedStateMachine):
    """Random histories of a few jobs on one real ledger."""

    database_url: str = ""
    jobs = Bundle("jobs")

    @initialize()
    def open_ledger(self) -> None:
        self.ledger = JobLedger(postgres_env(self.database_url))
        self.conn = psycopg.connect(self.database_url, autocommit=True)
        tables.create_schema(self.conn)
        self.projector = Projector(self.ledger, self.database_url)

    def teardown(self) -> None:
        self.conn.close()
        self.ledger.close()

    def _try(self, job_id: str, command: Any) -> None:
        # A refused command must have recorded nothing, which the invariants check.
        with contextlib.suppress(DomainError):
            self.ledger.change_job(job_id, command)

    @rule(target=jobs)
    def submit(self) -> str:
        spec_ = spec(gpu_type="cpu", min_vram_gb=0, output_format="text")
        return self.ledger.submit(owner="alice", spec=spec_, idempotency_key=None).job_id

    @rule(job_id=jobs)
    def cancel(self, job_id: str) -> None:
        with contextlib.suppress(DomainError):
            self.ledger.cancel(job_id, owner="alice")

    @rule(job_id=jobs, miner=st.sampled_from(MINERS))
    def assign(self, job_id: str, miner: str) -> None:
        self._try(job_id, lambda job: job.assign(miner))

    @rule(job_id=jobs, miner=st.sampled_from(MINERS))
    def assign_and_start(self, job_id: str, miner: str) -> None:
        """What usually happens next, so long histories are common, not rare."""
        self._try(job_id, lambda job: job.assign(miner))
        job = self.ledger.job(job_id)
        if job.miner_id is not None:
            self.report(job_id, "started", holder=True, stale=False)
            self.report(job_id, "progress", holder=True, stale=False)

    @rule(job_id=jobs)
    def time_out(self, job_id: str) -> None:
        self._try(job_id, lambda job: job.time_out())

    @rule(job_id=jobs, cause=st.sampled_from(list(RequeueCause)))
    def give_back(self, job_id: str, cause: RequeueCause) -> None:
        self._try(job_id, lambda job: job.give_back(cause, max_attempts=3))

    @rule(job_id=jobs)
    def cancel_unconfirmed(self, job_id: str) -> None:
        self._try(job_id, lambda job: job.cancel_unconfirmed("grace period over"))

    @rule(
        job_id=jobs,
        kind=st.sampled_from(
            ["started", "progress", "completed", "failed", "canceled", "released"]
        ),
        holder=st.booleans(),
        stale=st.booleans(),
    )
    def report(self, job_id: str, kind: str, holder: bool, stale: bool) -> None:
        job = self.ledger.job(job_id)
        miner = job.miner_id if holder and job.miner_id else "miner_stranger"
        attempt = max(job.attempt - 1, 1) if stale else job.attempt
        with contextlib.suppress(DomainError):
            apply_report(self.ledger, job_id, report_of(kind, miner, attempt), max_attempts=3)

    def _histories(self) -> dict[UUID, list[tuple[int, str]]]:
        rows = self.conn.execute(
            "SELECT originator_id, originator_version, topic FROM jobledger_events "
            "ORDER BY originator_id, originator_version"
        ).fetchall()
        histories: dict[UUID, list[tuple[int, str]]] = {}
        for originator_id, version, topic in rows:
            histories.setdefault(originator_id, []).append((version, topic.split(":")[-1]))
        return histories

    @invariant()
    def at_most_one_terminal_event_and_contiguous_versions(self) -> None:
        if not hasattr(self, "conn"):
            return
        for originator_id, history in self._histories().items():
            versions = [version for version, _ in history]
            assert versions == list(range(1, len(versions) + 1)), (originator_id, versions)
            terminal = [kind for _, kind in history if kind in TERMINAL]
            assert len(terminal) <= 1, (originator_id, history)
            if terminal:  # nothing but rejections may follow the end
                end = [kind for _, kind in history].index(terminal[0])
                after = {kind for _, kind in history[end + 1 :]}
                assert after <= {"Job.ReportRejected"}, (originator_id, history)

    @invariant()
    def views_equal_a_replay(self) -> None:
        if not hasattr(self, "conn"):
            return
        self.projector.catch_up(self.conn)
        views = {
            row[0]: row[1:]
            for row in self.conn.execute(
                "SELECT job_id, status, progress, attempt, miner_id, version, cost "
                "FROM jobledger_job_views"
            )
        }
        for job_id, shown in views.items():
            replayed = None
            for event in self.ledger.job_history(job_id, owner=None):
                replayed = fold(replayed, event, 0)
            assert replayed is not None
            assert shown == (
                replayed.status,
                replayed.progress,
                replayed.attempt,
                replayed.miner_id,
                replayed.version,
                replayed.cost,
            ), job_id
            assert aggregate_id_of(job_id)


def test_random_histories_keep_the_invariants(database_url: str) -> None:
    JobLifecycles.database_url = database_url
    runner = JobLifecycles.TestCase
    runner.settings = settings(
        # scripts/chaos raises it for its full-length run.
        max_examples=int(os.environ.get("JOBLEDGER_HYPOTHESIS_EXAMPLES", "25")),
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        derandomize=True,
    )
    runner().runTest()
