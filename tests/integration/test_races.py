"""Concurrent cancels and completions of one job on a real PostgreSQL ledger (issue 6, item 5).

Fifty threads released together by a barrier either cancel the job as its client or
apply the holder's completion report. Whatever the interleaving, the job's history
must hold at most one terminal event, its versions must run 1..n without gaps, and
every call must end in a result or a domain Conflict (the API's 409), nothing else.
The same race runs through a served API (DELETE /v1/jobs/{id}): 200, 202 or 409,
never a 5xx.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from litestar.testing import AsyncTestClient

from app.api.server import create_app
from app.config import Settings
from app.ingestor import Outcome, apply_report
from app.relay import RELAY_NAME
from app.store import JobLedger, postgres_env
from domain.errors import ConcurrentChange, Conflict, InvalidTransition
from domain.jobs import aggregate_id_of
from projections import tables
from projections.jobs import JobRow
from tests.e2e.conftest import SEED_JOB, start_server
from tests.integration.helpers import spec
from tests.integration.test_reports import (
    MAX_ATTEMPTS,
    TERMINAL_EVENTS,
    completed,
    register,
    started,
)
from tests.nats_names import fresh_prefix

OWNER = "alice"
ROUNDS = 10
RACERS = 50
# Long enough for 50 threads to reach the barrier on a loaded machine; a hang fails instead.
BARRIER_SECONDS = 30.0
# The longest a late racer waits after the barrier opens.
MAX_DELAY_SECONDS = 0.2
HTTP_COMPLETION_DELAY_SECONDS = 0.1


@dataclass(frozen=True)
class Attempt:
    """One racer's call and how it ended: with an answer, or with an exception."""

    kind: str  # "cancel" or "complete"
    answer: object
    error: Exception | None


# A racer: what it does ("cancel" or "complete") and the call that does it.
Call = tuple[str, Callable[[], object]]


def race(calls: list[Call], *, seed: int) -> list[Attempt]:
    """Run every call in its own thread, all released at once; returns how each ended.

    Half the racers go the moment the barrier opens; the others wait a few seeded
    milliseconds, so calls land before, during and after the first write.
    """
    barrier = threading.Barrier(len(calls), timeout=BARRIER_SECONDS)
    rng = random.Random(seed)
    delays = [rng.choice([0.0, rng.uniform(0.0, MAX_DELAY_SECONDS)]) for _ in calls]

    def run(call: Call, delay: float) -> Attempt:
        kind, function = call
        barrier.wait()
        if delay:
            time.sleep(delay)
        try:
            return Attempt(kind, function(), None)
        except Exception as error:  # recorded: the test asserts on every one of them
            return Attempt(kind, None, error)

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls, delays))


def racers(ledger: JobLedger, job_id: str, miner: str, seed: int) -> list[Call]:
    """25 client cancels and 25 completions by the holder, in a seeded order."""

    def cancel() -> JobRow:
        row, _ = ledger.cancel(job_id, owner=OWNER)
        return row

    def complete() -> Outcome:
        return apply_report(ledger, job_id, completed(miner), max_attempts=MAX_ATTEMPTS)

    calls: list[Call] = [("cancel", cancel)] * (RACERS // 2)
    calls += [("complete", complete)] * (RACERS - RACERS // 2)
    random.Random(seed).shuffle(calls)
    return calls


def stored_versions(database_url: str, job_id: str) -> list[int]:
    """The job's versions as the events table holds them, duplicates and gaps included."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT originator_version FROM jobledger_events "
            "WHERE originator_id = %s ORDER BY originator_version",
            (aggregate_id_of(job_id),),
        ).fetchall()
    return [version for (version,) in rows]


def unexpected(attempts: list[Attempt]) -> list[str]:
    """Every call that ended in something other than an answer or a Conflict."""
    return [
        f"{a.kind}: {type(a.error).__name__}: {a.error}"
        for a in attempts
        if a.error is not None and not isinstance(a.error, Conflict)
    ]


def new_job(ledger: JobLedger) -> str:
    return ledger.submit(
        owner=OWNER,
        spec=spec(gpu_type="cpu", min_vram_gb=0, output_format="text"),
        idempotency_key=None,
    ).job_id


def check_history(ledger: JobLedger, database_url: str, job_id: str) -> list[str]:
    """The job's event types, after checking its versions are exactly 1..n."""
    events = ledger.job_events(job_id, owner=None)
    versions = stored_versions(database_url, job_id)
    assert versions == list(range(1, len(versions) + 1)), versions
    assert [e.sequence for e in events] == versions
    return [e.type for e in events]


@pytest.mark.parametrize("start", ["assigned", "running"])
def test_racing_cancels_and_completions_of_a_held_job_end_in_one_completion(
    ledger: JobLedger, database_url: str, start: str
) -> None:
    """A cancel of a held job only asks the miner to stop, so the holder's result wins."""
    miner = register(ledger, "racer")
    cancels_won = cancels_lost = 0
    for round_number in range(ROUNDS):
        job_id = new_job(ledger)
        ledger.change_job(job_id, lambda job: job.assign(miner))
        if start == "running":
            assert (
                apply_report(ledger, job_id, started(miner), max_attempts=MAX_ATTEMPTS)
                is Outcome.APPLIED
            )
        before = check_history(ledger, database_url, job_id)

        attempts = race(racers(ledger, job_id, miner, seed=round_number), seed=round_number)

        assert unexpected(attempts) == []
        completions = [a for a in attempts if a.kind == "complete"]
        cancels = [a for a in attempts if a.kind == "cancel"]
        # Exactly one completion is applied; the holder's later copies are late duplicates.
        assert [a.answer for a in completions if a.error is None].count(Outcome.APPLIED) == 1
        assert {a.answer for a in completions if a.error is None} <= {
            Outcome.APPLIED,
            Outcome.IGNORED,
        }
        assert all(isinstance(a.error, ConcurrentChange) for a in completions if a.error)
        # A cancel either found the job still held (and left it canceling) or found it
        # completed, which is a 409; "too busy, retry" is the only other refusal.
        won = [a for a in cancels if a.error is None]
        for attempt in won:
            assert isinstance(attempt.answer, JobRow)
            assert attempt.answer.status in {"canceling", "completed"}
        for attempt in cancels:
            if isinstance(attempt.error, InvalidTransition):
                assert attempt.error.status == "completed", attempt.error.message
            elif attempt.error is not None:
                assert isinstance(attempt.error, ConcurrentChange), attempt.error
        cancels_won += len(won)
        cancels_lost += len(cancels) - len(won)

        types = check_history(ledger, database_url, job_id)
        added = types[len(before) :]
        assert types[: len(before)] == before
        assert [t for t in types if t in TERMINAL_EVENTS] == ["JobCompleted"]
        # The cancel request is recorded once, before the completion, iff a cancel succeeded.
        expected = ["JobCancelRequested", "JobCompleted"] if won else ["JobCompleted"]
        assert added == expected, (round_number, added, len(won))
        row = ledger.job_row(job_id, owner=None)
        assert (row.status, row.progress) == ("completed", 100)
    # Not asserted (it depends on timing), but it tells whether the races really happened.
    print(f"{start}: cancels accepted {cancels_won}, refused {cancels_lost}")


def test_racing_cancels_and_stale_completions_of_a_pending_job_cancel_it_once(
    ledger: JobLedger, database_url: str
) -> None:
    """A pending job is canceled at once: one cancel wins, the rest are 409s."""
    miner = register(ledger, "not-the-holder")
    for round_number in range(ROUNDS):
        job_id = new_job(ledger)

        attempts = race(
            racers(ledger, job_id, miner, seed=1000 + round_number), seed=1000 + round_number
        )

        assert unexpected(attempts) == []
        won = [a for a in attempts if a.kind == "cancel" and a.error is None]
        assert len(won) == 1
        assert isinstance(won[0].answer, JobRow) and won[0].answer.status == "canceled"
        for attempt in attempts:
            if attempt.kind == "cancel" and attempt.error is not None:
                assert isinstance(attempt.error, InvalidTransition), attempt.error
                assert attempt.error.status == "canceled"
        # No one holds the job, so every completion is refused, and recorded only once.
        assert [a.answer for a in attempts if a.kind == "complete"] == [Outcome.REJECTED] * (
            RACERS - RACERS // 2
        )
        types = check_history(ledger, database_url, job_id)
        assert [t for t in types if t in TERMINAL_EVENTS] == ["JobCanceled"]
        assert sorted(types) == sorted(["JobSubmitted", "JobCanceled", "JobReportRejected"])


def test_racing_deletes_over_http_answer_200_202_or_409_never_a_server_error(
    make_database: Callable[[], str], nats_url: str, tmp_path: Path
) -> None:
    """The served API under 50 concurrent DELETEs: of a pending job, then of a running one."""
    database_url = make_database()
    served = start_server(tmp_path, database_url=database_url, nats_url=nats_url)
    ledger = JobLedger(postgres_env(database_url))
    try:
        api = served.client(served.new_key("client"))
        miner = register(ledger, "http-racer")

        def submit() -> str:
            answer = api.post(
                "/v1/jobs",
                json=SEED_JOB
                | {"input": "hello", "output_config": {"destination": "local", "format": "text"}},
            )
            assert answer.status_code == 201, answer.text
            return str(answer.json()["job_id"])

        def delete(job_id: str) -> Callable[[], object]:
            def call() -> tuple[int, str]:
                answer = api.delete(f"/v1/jobs/{job_id}")
                body = answer.json()
                if answer.status_code == 409:
                    return 409, str(body["error"]["details"].get("status"))
                return answer.status_code, str(body.get("status"))

            return call

        # A pending job is canceled at once by one DELETE; every other one is a 409.
        pending = submit()
        attempts = race([("cancel", delete(pending))] * RACERS, seed=70)
        assert [a.error for a in attempts if a.error is not None] == []
        answers = [a.answer for a in attempts]
        assert sorted(answers, key=str) == [(200, "canceled")] + [(409, "canceled")] * (
            RACERS - 1
        ), (Counter(answers), served.log()[-4000:])
        types = check_history(ledger, database_url, pending)
        assert types == ["JobSubmitted", "JobCanceled"]

        # A running job: every DELETE is accepted (202, the repeats are idempotent) until
        # the holder's completion lands, and refused (409) after it.
        running = submit()
        ledger.change_job(running, lambda job: job.assign(miner))
        apply_report(ledger, running, started(miner), max_attempts=MAX_ATTEMPTS)

        def complete() -> Outcome:
            # An HTTP round trip is slower than a report applied in-process: the results
            # arrive a little later, while DELETEs are still in flight.
            time.sleep(HTTP_COMPLETION_DELAY_SECONDS)
            return apply_report(ledger, running, completed(miner), max_attempts=MAX_ATTEMPTS)

        calls: list[Call] = [("cancel", delete(running))] * (RACERS - 10)
        calls += [("complete", complete)] * 10
        random.Random(7).shuffle(calls)
        attempts = race(calls, seed=7)

        assert unexpected(attempts) == []
        answers = [a.answer for a in attempts if a.kind == "cancel"]
        print("DELETEs of a running job:", sorted(Counter(answers).items()))
        # A taken cancel answers 202 with the job as that cancel left it, even when the
        # completion lands before the answer is written (the test below makes that certain).
        allowed = {(202, "canceling"), (409, "completed")}
        assert set(answers) <= allowed, (Counter(answers), served.log()[-4000:])
        assert [a.answer for a in attempts if a.kind == "complete"].count(Outcome.APPLIED) == 1
        types = check_history(ledger, database_url, running)
        assert [t for t in types if t in TERMINAL_EVENTS] == ["JobCompleted"]
        taken = [a for a in answers if a == (202, "canceling")]
        assert types.count("JobCancelRequested") == (1 if taken else 0)
        assert "Traceback" not in served.log()
        quiet(database_url, ledger.head())  # a quick stop: see quiet()
    finally:
        ledger.close()
        served.stop()


# The app's route declarations warn about Litestar 3 on every in-process build; not ours.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_an_accepted_cancel_of_a_running_job_is_a_202_even_if_it_completes_meanwhile(
    database_url: str,
    nats_url: str,
    tmp_path: Path,
    ledger: JobLedger,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race the HTTP test above hits now and then, made certain.

    README: DELETE answers "assigned/running -> canceling (202); finished -> 409". The
    cancel here is recorded as JobCancelRequested on a running job; the holder's
    completion is applied just after that commit and before the handler reads the job
    back, an interleaving the ledger allows (a completion may race a cancel).
    """
    admin_key = "admin-" + secrets.token_hex(16)
    settings = Settings.from_env(
        {
            "JOBLEDGER_HOME": str(tmp_path / "home"),
            "JOBLEDGER_DATABASE_URL": database_url,
            "JOBLEDGER_NATS_URL": nats_url,
            "JOBLEDGER_NATS_PREFIX": fresh_prefix(),
            "JOBLEDGER_ADMIN_KEY": admin_key,
            "JOBLEDGER_RATE_LIMITS": "off",
        }
    )
    miner = register(ledger, "window")
    read_back = JobLedger.job_history
    completing: list[str] = []

    def complete_then_read(self: JobLedger, job_id: str, *, owner: str | None) -> Sequence[object]:
        if completing and job_id == completing[0]:
            completing.clear()  # once: the handler's read-back right after the cancel's commit
            assert (
                apply_report(ledger, job_id, completed(miner), max_attempts=MAX_ATTEMPTS)
                is Outcome.APPLIED
            )
        return read_back(self, job_id, owner=owner)

    monkeypatch.setattr(JobLedger, "job_history", complete_then_read)
    async with AsyncTestClient(create_app(settings)) as api:
        answer = await api.post(
            "/v1/admin/keys",
            json={"role": "client", "name": "window"},
            headers={"X-Api-Key": admin_key},
        )
        assert answer.status_code == 201, answer.text
        api.headers["X-Api-Key"] = answer.json()["key"]
        answer = await api.post(
            "/v1/jobs",
            json=SEED_JOB
            | {"input": "hello", "output_config": {"destination": "local", "format": "text"}},
        )
        assert answer.status_code == 201, answer.text
        job_id = str(answer.json()["job_id"])
        ledger.change_job(job_id, lambda job: job.assign(miner))
        apply_report(ledger, job_id, started(miner), max_attempts=MAX_ATTEMPTS)

        completing.append(job_id)
        answer = await api.delete(f"/v1/jobs/{job_id}")
        try:
            assert completing == []  # the completion did land inside the window
            types = check_history(ledger, database_url, job_id)
            assert types[-2:] == ["JobCancelRequested", "JobCompleted"]
            # The answer describes what this cancel did; the completion shows once the views
            # fold it (it is not this client's write, so nothing waited for it).
            assert (answer.status_code, answer.json()["status"]) == (202, "canceling"), answer.text
            for _ in range(100):
                if (await api.get(f"/v1/jobs/{job_id}")).json()["status"] == "completed":
                    break
                await asyncio.sleep(0.05)
            assert (await api.get(f"/v1/jobs/{job_id}")).json()["status"] == "completed"
        finally:
            # Blocking, so off this loop (the app itself runs on the client's own thread).
            await asyncio.to_thread(quiet, database_url, ledger.head())


def quiet(database_url: str, head: int, timeout: float = 15.0) -> None:
    """Wait until the relay and the views have taken in the whole log (up to `head`).

    Called before an app shuts down. Its shutdown cancels each worker once; on Python
    3.11, asyncio.wait_for swallows that cancel when the awaited reply lands in the
    same loop turn, so a relay busy publishing (nats-py's request is a wait_for) never
    stops and the shutdown hangs. An idle relay cannot hit that window.
    """
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            found = conn.execute(
                "SELECT count(*) FROM jobledger_projection_tracking "
                "WHERE projection IN (%s, %s) AND position >= %s",
                (RELAY_NAME, tables.PROJECTION_NAME, head),
            ).fetchone()
            if found is not None and found[0] == 2:
                return
            assert time.monotonic() < deadline, "the relay or the views did not catch up"
            time.sleep(0.05)
