"""Items 5 and 7: report storms, and cancels racing completions, as chaos scenarios.

`report-storm` (item 5). Round after round, JOBS jobs are assigned to a miner
and every job's full report sequence (started, progress 20/50/80, completed) is
tripled and shuffled with the round's seed, as tests/integration/test_report_storms.py
does. The reports go through the ingestor's core (`apply_reports`) in batches of random
sizes, as the durable consumer fetches them, split between one, two or three
concurrent ingestors (each its own `JobLedger`, as separate ledger processes would
be); a report nak'd because another ingestor changed the job meanwhile is applied
again afterwards, as JetStream would redeliver it. A projector follows in its thread.
Pass: no report rejected and no other refusal; every job ends with exactly one
terminal event, `JobCompleted`; its versions run 1..n; each applied report recorded
exactly one event; progress is recorded at most once per step and in order; the views
follow the log to its head and equal a rebuild from it.

`command-races` (item 7). Against a served ledger, job after job (pending, assigned
or running in turn) gets RACERS concurrent commands released by one barrier: half
are the client's `DELETE /v1/jobs/{id}` over HTTP, half the completion report of the
job's holder (for a pending job, of a miner that holds nothing) applied through the
ingestion path as another ledger process's ingestor would, a little later, as
reports arriving over NATS are (tests/integration/test_races.py). Leases are long, so
the scheduler stays out of it. Pass: exactly one command per job ends it (a `200
canceled`, or an applied completion); every other DELETE is a `202 canceling` or a
409, never a 5xx; every job has exactly one terminal event and versions 1..n; a cancel
request is recorded iff some DELETE answered 202.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import psycopg

from app.ingestor import Outcome, apply_report, apply_reports
from app.projector import Projector
from app.store import JobLedger, postgres_env
from domain.errors import ConcurrentChange, DomainError
from projections import tables
from tests.chaos.checker import TERMINAL_EVENTS, job_histories, scan_log, views_equal_a_rebuild
from tests.chaos.lab import Lab, new_prefix
from tests.chaos.result import Result
from tests.e2e.conftest import SEED_JOB
from tests.integration.test_races import (
    HTTP_COMPLETION_DELAY_SECONDS,
    RACERS,
    Attempt,
    Call,
    quiet,
    race,
)
from tests.integration.test_report_storms import (
    COPIES,
    JOBS,
    STEPS,
    Report,
    assigned_jobs,
    batches,
    storm,
)
from tests.integration.test_reports import MAX_ATTEMPTS, completed, register, started

MAX_INGESTORS = 3
# A nak'd report is redelivered; one that keeps clashing this often is a finding.
MAX_REDELIVERIES = 20
# What a storm leaves after each job's assignment, and the reports of one job.
AFTER_ASSIGNMENT = {"JobStarted", "JobProgressReported", "JobCompleted"}
REPORTS_PER_JOB = (2 + len(STEPS)) * COPIES
# Long enough that the served scheduler never takes a held job back during a race.
QUIET_SCHEDULER = {"JOBLEDGER_LEASE_SECONDS": "3600", "JOBLEDGER_CANCEL_GRACE_SECONDS": "3600"}
JOB_STATES = ("pending", "assigned", "running")


# ---- report-storm -----------------------------------------------------------------


class Ingestor(JobLedger):
    """A ledger that counts the batches it had to redo one by one: the real races."""

    name = JobLedger.name  # the same event tables (the library names them after the class)
    clashes = 0

    def _one_by_one(self, commands: Any) -> Any:
        # change_jobs lands here when another writer saved one of the batch's jobs first.
        self.clashes += 1
        return super()._one_by_one(commands)


class Ingestion:
    """Every report's outcome, counted, and the reports to deliver again."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.applied: Counter[str] = Counter()  # job id → reports that recorded an event
        self.redeliver: list[Report] = []
        self.refusals: list[str] = []
        self.lock = threading.Lock()

    def record(self, batch: list[Report], results: list[Outcome | DomainError]) -> None:
        with self.lock:
            for report, result in zip(batch, results, strict=True):
                if isinstance(result, ConcurrentChange):
                    self.outcomes["nak'd: another ingestor changed the job"] += 1
                    self.redeliver.append(report)
                elif isinstance(result, DomainError):
                    self.outcomes["refused"] += 1
                    self.refusals.append(f"{report}: {result!r}")
                else:
                    self.outcomes[result.value] += 1
                    if result is Outcome.APPLIED:
                        self.applied[report[0]] += 1


def ingest(ledgers: list[Ingestor], reports: list[Report], rng: random.Random) -> Ingestion:
    """Split the storm between the ingestors, run them at once, then redeliver the nak'd."""
    ingestion = Ingestion()
    shares = [list(batches(reports[i :: len(ledgers)], rng)) for i in range(len(ledgers))]
    barrier = threading.Barrier(len(ledgers), timeout=60)

    def work(ledger: JobLedger, share: list[list[Report]]) -> None:
        try:
            barrier.wait()
            for batch in share:
                ingestion.record(batch, apply_reports(ledger, batch, max_attempts=MAX_ATTEMPTS))
        except Exception as error:  # a crash is a finding, reported with the others
            with ingestion.lock:
                ingestion.refusals.append(f"ingestor crashed: {type(error).__name__}: {error}")

    threads = [
        threading.Thread(target=work, args=(ledger, share), name=f"ingestor-{n}")
        for n, (ledger, share) in enumerate(zip(ledgers, shares, strict=True))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for _ in range(MAX_REDELIVERIES):
        if not ingestion.redeliver:
            break
        again, ingestion.redeliver = ingestion.redeliver, []
        for report in again:
            ingestion.record(
                [report], apply_reports(ledgers[0], [report], max_attempts=MAX_ATTEMPTS)
            )
    return ingestion


def storm_findings(ledger: JobLedger, job_id: str, applied: int) -> list[str]:
    """What is wrong with one job after its storm; versions are the checker's business."""
    events = ledger.job_events(job_id, owner=None)
    types = [event.type for event in events]
    findings = []
    if [t for t in types if t in TERMINAL_EVENTS] != ["JobCompleted"]:
        findings.append(f"terminal events {[t for t in types if t in TERMINAL_EVENTS]}")
    after = types[2:]
    if types[:2] != ["JobSubmitted", "JobAssigned"] or not set(after) <= AFTER_ASSIGNMENT:
        findings.append(f"history {types}")
    if after.count("JobStarted") > 1 or "JobStarted" in after[1:]:
        findings.append(f"started recorded out of place: {types}")
    steps = [event.data["progress"] for event in events if event.type == "JobProgressReported"]
    if steps != sorted(set(steps)) or not set(steps) <= set(STEPS):
        findings.append(f"progress steps {steps}")
    if applied != len(after):
        findings.append(f"{applied} reports applied, {len(after)} events recorded")
    return findings


def report_storm(lab: Lab, seconds: float) -> Result:
    result = Result("report-storm")
    began = time.monotonic()
    database = lab.database()
    # One ledger per ingestor, as in production; opened one at a time (their DDL would clash).
    ledgers = [Ingestor(postgres_env(database)) for _ in range(MAX_INGESTORS)]
    ledger = ledgers[0]
    with psycopg.connect(database, autocommit=True) as conn:
        tables.create_schema(conn)
    stop = threading.Event()
    projector = threading.Thread(
        target=Projector(ledger, database, batch_size=17).run, args=(stop,), name="projector"
    )
    projector.start()
    totals = Ingestion()
    job_ids: list[str] = []
    by_ingestors: Counter[int] = Counter()
    findings: dict[str, list[str]] = {}
    ends = time.monotonic() + seconds
    try:
        rounds = 0
        while rounds < MAX_INGESTORS or time.monotonic() < ends:
            rng = random.Random(rounds)
            ingestors = 1 + rounds % MAX_INGESTORS
            miner = register(ledger, f"storm-{rounds}")
            jobs = assigned_jobs(ledger, miner)
            ingestion = ingest(ledgers[:ingestors], storm(jobs, miner, rng), rng)
            totals.outcomes += ingestion.outcomes
            totals.applied += ingestion.applied
            totals.refusals += ingestion.refusals
            totals.redeliver += ingestion.redeliver
            job_ids += jobs
            by_ingestors[ingestors] += 1
            rounds += 1
        for job_id in job_ids:
            if problems := storm_findings(ledger, job_id, totals.applied[job_id]):
                findings[job_id] = problems
        stop.set()
        projector.join(30)
        with psycopg.connect(database, autocommit=True) as conn:
            projected = Projector(ledger, database).catch_up(conn)
            not_completed = conn.execute(
                "SELECT count(*) FROM jobledger_job_views WHERE status <> 'completed'"
            ).fetchone()
        head = ledger.head()
    finally:
        stop.set()
        for each in ledgers:
            each.close()

    result.figure("rounds (seeds)", rounds)
    result.figure(
        "rounds by concurrent ingestors",
        " ".join(f"{n}:{count}" for n, count in sorted(by_ingestors.items())),
    )
    result.figure("jobs", len(job_ids))
    result.figure("jobs per round", JOBS)
    result.figure("reports (each sent 3 times, shuffled)", len(job_ids) * REPORTS_PER_JOB)
    result.figure("reports applied", totals.outcomes[Outcome.APPLIED.value])
    result.figure("duplicates and late reports ignored", totals.outcomes[Outcome.IGNORED.value])
    result.figure(
        "nak'd after racing another ingestor (redelivered)",
        totals.outcomes["nak'd: another ingestor changed the job"],
    )
    result.figure(
        "batches that met another ingestor's commit (redone one by one)",
        sum(each.clashes for each in ledgers),
    )
    result.expect_equal(
        "reports handled",
        sum(totals.outcomes.values()) - totals.outcomes["nak'd: another ingestor changed the job"],
        len(job_ids) * REPORTS_PER_JOB,
    )
    result.expect_equal("reports rejected", totals.outcomes[Outcome.REJECTED.value], 0)
    result.expect_equal("reports refused", totals.outcomes["refused"], 0)
    result.expect_equal("reports still nak'd", len(totals.redeliver), 0)
    if totals.refusals:
        result.check("first refusals", False, totals.refusals[:3])
    result.expect_equal("jobs not ending in one completion as reported", len(findings), 0)
    if findings:
        result.check("sample of the offending jobs", False, dict(list(findings.items())[:3]))
    scan = scan_log(database)
    result.figure(
        "completions that overtook their start",
        sum("JobStarted" not in scan.types(job_id) for job_id in job_ids),
    )
    job_histories(result, scan, job_ids)
    result.expect_equal("views position", projected, head)
    result.expect_equal("job views not completed", not_completed[0] if not_completed else -1, 0)
    views_equal_a_rebuild(result, database)
    result.seconds = time.monotonic() - began
    return result


# ---- command-races -------------------------------------------------------------------


def submit(api: httpx.Client) -> str:
    answer = api.post(
        "/v1/jobs",
        json=SEED_JOB
        | {"input": "race", "output_config": {"destination": "local", "format": "text"}},
    )
    answer.raise_for_status()
    return str(answer.json()["job_id"])


def delete(api: httpx.Client, job_id: str) -> Callable[[], object]:
    """A DELETE of the job; answers (status code, the job's status or the conflict's)."""

    def call() -> tuple[int, str]:
        answer = api.delete(f"/v1/jobs/{job_id}")
        if answer.status_code >= 500:
            return answer.status_code, "server error"  # the served log has the traceback
        body: dict[str, Any] = answer.json()
        if answer.status_code == 409:
            details = body["error"].get("details") or {}
            return 409, str(details.get("status", "busy"))  # busy: ConcurrentChange
        return answer.status_code, str(body.get("status"))

    return call


def completion(ledger: JobLedger, job_id: str, miner: str) -> Callable[[], object]:
    """The miner's completion report, applied through the ingestion path."""

    def call() -> Outcome:
        time.sleep(HTTP_COMPLETION_DELAY_SECONDS)  # reports come over NATS, after a hop
        return apply_report(ledger, job_id, completed(miner), max_attempts=MAX_ATTEMPTS)

    return call


def race_one_job(
    api: httpx.Client, ledger: JobLedger, holder: str, stranger: str, state: str, seed: int
) -> tuple[str, list[Attempt]]:
    """A job brought to `state`, then RACERS commands on it at once."""
    job_id = submit(api)
    miner = stranger
    if state != "pending":
        ledger.change_job(job_id, lambda job: job.assign(holder))
        miner = holder
    if state == "running":
        apply_report(ledger, job_id, started(holder), max_attempts=MAX_ATTEMPTS)
    calls: list[Call] = [("cancel", delete(api, job_id))] * (RACERS // 2)
    calls += [("complete", completion(ledger, job_id, miner))] * (RACERS - RACERS // 2)
    random.Random(seed).shuffle(calls)
    return job_id, race(calls, seed=seed)


# What each kind of command may answer, by the job's state before the race.
ALLOWED_CANCEL_ANSWERS = {
    "pending": {(200, "canceled"), (409, "canceled")},
    "held": {(202, "canceling"), (409, "completed")},
}
ALLOWED_COMPLETIONS = {
    "pending": {Outcome.REJECTED},
    "held": {Outcome.APPLIED, Outcome.IGNORED},
}


def race_findings(state: str, attempts: list[Attempt], types: list[str]) -> list[str]:
    """What is wrong with one race's answers and the job's history after it."""
    kind = "pending" if state == "pending" else "held"
    findings = []
    for attempt in attempts:
        if attempt.error is not None:
            if not (attempt.kind == "complete" and isinstance(attempt.error, ConcurrentChange)):
                findings.append(f"{attempt.kind}: {type(attempt.error).__name__}: {attempt.error}")
        elif attempt.kind == "cancel" and attempt.answer not in ALLOWED_CANCEL_ANSWERS[kind]:
            answer = attempt.answer
            if answer != (409, "busy"):
                findings.append(f"cancel answered {answer}")
        elif attempt.kind == "complete" and attempt.answer not in ALLOWED_COMPLETIONS[kind]:
            findings.append(f"completion {attempt.answer}")
    terminal = [t for t in types if t in TERMINAL_EVENTS]
    wanted = ["JobCanceled"] if kind == "pending" else ["JobCompleted"]
    if terminal != wanted:
        findings.append(f"terminal events {terminal}, wanted {wanted}")
    accepted_202 = any(a.answer == (202, "canceling") for a in attempts)
    if types.count("JobCancelRequested") != int(accepted_202):
        findings.append(f"cancel requests recorded {types.count('JobCancelRequested')}")
    return findings


def ended_by(attempt: Attempt) -> bool:
    """True if this command is the one that ended the job."""
    return attempt.error is None and attempt.answer in ((200, "canceled"), Outcome.APPLIED)


def command_races(lab: Lab, seconds: float) -> Result:
    result = Result("command-races")
    began = time.monotonic()
    database = lab.database()
    served = lab.serve(database, prefix=new_prefix(), env=QUIET_SCHEDULER)
    api = served.client(served.new_key("client"))
    ledger = JobLedger(postgres_env(database))
    races: list[tuple[str, str, list[Attempt]]] = []
    try:
        holder, stranger = register(ledger, "racer"), register(ledger, "stranger")
        ends = time.monotonic() + seconds
        while len(races) < len(JOB_STATES) or time.monotonic() < ends:
            state = JOB_STATES[len(races) % len(JOB_STATES)]
            job_id, attempts = race_one_job(api, ledger, holder, stranger, state, len(races))
            races.append((state, job_id, attempts))
        quiet(database, ledger.head())  # an idle relay stops at once (see quiet())
    finally:
        ledger.close()
    served.stop()

    scan = scan_log(database)
    attempts = [attempt for _, _, race_attempts in races for attempt in race_attempts]
    cancels = Counter[tuple[int, str]](
        (int(a.answer[0]), str(a.answer[1]))
        for a in attempts
        if a.kind == "cancel" and isinstance(a.answer, tuple)
    )
    completions = Counter(
        a.answer.value if isinstance(a.answer, Outcome) else "nak'd: too busy"
        for a in attempts
        if a.kind == "complete"
    )
    findings = {
        job_id: problems
        for state, job_id, race_attempts in races
        if (problems := race_findings(state, race_attempts, scan.types(job_id)))
    }
    ended = Counter(sum(ended_by(a) for a in race_attempts) for _, _, race_attempts in races)
    result.figure("jobs", len(races))
    result.figure(
        "jobs by state before the race",
        " ".join(f"{s}:{sum(r[0] == s for r in races)}" for s in JOB_STATES),
    )
    result.figure("commands", len(attempts))
    result.figure("concurrent commands per job", RACERS)
    for (status, job_status), count in sorted(cancels.items()):
        result.figure(f"DELETEs answered {status} {job_status}", count)
    for outcome, count in sorted(completions.items()):
        result.figure(f"completions {outcome}", count)
    result.figure("answers 409", sum(c for (s, _), c in cancels.items() if s == 409))
    result.expect_equal("answers 5xx", sum(c for (s, _), c in cancels.items() if s >= 500), 0)
    result.expect_equal(
        "DELETEs without an answer",
        sum(a.kind == "cancel" and a.error is not None for a in attempts),
        0,
    )
    result.figure("commands that ended their job (accepted)", sum(ended_by(a) for a in attempts))
    result.expect_equal("jobs not ended by exactly one command", len(races) - ended[1], 0)
    result.expect_equal("jobs with unexpected answers or history", len(findings), 0)
    if findings:
        result.check("sample of the offending jobs", False, dict(list(findings.items())[:3]))
    terminal_counts = Counter(
        sum(t in TERMINAL_EVENTS for t in scan.types(job_id)) for _, job_id, _ in races
    )
    result.expect_equal(
        "jobs without exactly one terminal event", len(races) - terminal_counts[1], 0
    )
    job_histories(result, scan, [job_id for _, job_id, _ in races])
    result.check(
        "no traceback in the served log", "Traceback" not in served.log(), served.log()[-2000:]
    )
    result.seconds = time.monotonic() - began
    return result
