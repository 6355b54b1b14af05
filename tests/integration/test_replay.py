"""Point-in-time reads of a job, replayed from a real PostgreSQL event store."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from app.audit.replay import job_as_of, parse_as_of, run_replay
from app.config import Settings
from app.store import JobLedger
from domain.errors import InvalidJobRequest, JobNotFound
from domain.jobs import RequeueCause, aggregate_id_of
from projections.jobs import JobRow, fold
from tests.integration.helpers import run_to_completion, spec

RESULT = {"location": "local:results/r", "sha256": "1" * 64, "size_bytes": 5}

# What the status view showed after each event of `driven_job`:
# (type, status, progress, attempt, miner_id, has result)
EXPECTED = [
    ("JobSubmitted", "pending", 0, 1, None, False),
    ("JobAssigned", "assigned", 0, 1, "miner_a", False),
    ("JobStarted", "running", 0, 1, "miner_a", False),
    ("JobProgressReported", "running", 30, 1, "miner_a", False),
    ("JobRequeued", "pending", 0, 2, None, False),
    ("JobAssigned", "assigned", 0, 2, "miner_b", False),
    ("JobStarted", "running", 0, 2, "miner_b", False),
    ("JobProgressReported", "running", 60, 2, "miner_b", False),
    ("JobCompleted", "completed", 100, 2, "miner_b", True),
]


@pytest.fixture
def driven_job(ledger: JobLedger) -> str:
    """A job of alice's through a lost attempt and a completed one: one save per event."""
    job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    commands: list[Any] = [
        lambda job: job.assign("miner_a"),
        lambda job: job.start(attempt=1, miner_id="miner_a"),
        lambda job: job.report_progress(attempt=1, progress=30),
        lambda job: job.requeue(RequeueCause.LEASE_EXPIRED),
        lambda job: job.assign("miner_b"),
        lambda job: job.start(attempt=2, miner_id="miner_b"),
        lambda job: job.report_progress(attempt=2, progress=60),
        lambda job: job.complete(
            attempt=2,
            result=RESULT,
            metrics={},
            gpu_seconds=Decimal("2"),
            cost=Decimal("0.07"),
        ),
    ]
    for command in commands:
        ledger.change_job(job_id, command)
    return job_id


def folded(ledger: JobLedger, job_id: str, count: int) -> JobRow:
    """The row after the job's first `count` events, folded here independently."""
    row: JobRow | None = None
    for event in list(ledger.events.get(aggregate_id_of(job_id)))[:count]:
        row = fold(row, event, 0)
    assert row is not None
    return row


def test_each_sequence_is_the_job_after_that_many_events(
    ledger: JobLedger, driven_job: str
) -> None:
    records = ledger.job_events(driven_job, owner=None)
    assert [record.type for record in records] == [expected[0] for expected in EXPECTED]
    for sequence, (_, status, progress, attempt, miner_id, has_result) in enumerate(
        EXPECTED, start=1
    ):
        row, reflected = job_as_of(ledger, driven_job, sequence, owner="alice")
        assert reflected == sequence
        assert row == folded(ledger, driven_job, sequence)
        assert (row.status, row.progress, row.attempt, row.miner_id) == (
            status,
            progress,
            attempt,
            miner_id,
        ), f"after event {sequence}"
        assert row.result == (RESULT if has_result else None)
        assert row.version == sequence
        assert row.updated_at == records[sequence - 1].timestamp
    assert job_as_of(ledger, driven_job, 2, owner="alice")[0].completed_at is None
    assert job_as_of(ledger, driven_job, 9, owner="alice")[0].cost == Decimal("0.07")


def test_a_sequence_past_the_last_event_is_the_current_state(
    ledger: JobLedger, driven_job: str
) -> None:
    current = ledger.job_row(driven_job, owner=None)
    for sequence in (len(EXPECTED), len(EXPECTED) + 1, 10**30):
        assert job_as_of(ledger, driven_job, sequence, owner=None) == (current, len(EXPECTED))
    assert job_as_of(ledger, driven_job, parse_as_of("0009"), owner=None)[1] == 9


def test_each_event_time_is_the_job_as_of_the_last_event_stamped_then(
    ledger: JobLedger, driven_job: str
) -> None:
    records = ledger.job_events(driven_job, owner=None)
    for record in records:
        stamped_by_then = max(r.sequence for r in records if r.timestamp <= record.timestamp)
        row, reflected = job_as_of(ledger, driven_job, record.timestamp, owner="alice")
        assert reflected == stamped_by_then
        assert row == folded(ledger, driven_job, stamped_by_then)
        # The same instant written in another offset, as a client would send it.
        text = record.timestamp.astimezone(timezone(timedelta(hours=2))).isoformat()
        assert text.endswith("+02:00")
        assert job_as_of(ledger, driven_job, parse_as_of(text), owner="alice")[1] == reflected


def test_a_time_between_two_events_is_the_earlier_one(ledger: JobLedger, driven_job: str) -> None:
    records = ledger.job_events(driven_job, owner=None)
    gaps = [(a, b) for a, b in pairwise(records) if a.timestamp < b.timestamp]
    assert gaps, "every event of the job bears the same time stamp"
    for before, after in gaps:
        between = before.timestamp + (after.timestamp - before.timestamp) / 2
        assert before.timestamp <= between < after.timestamp
        row, reflected = job_as_of(ledger, driven_job, between, owner="alice")
        assert reflected == before.sequence
        assert row.status == EXPECTED[before.sequence - 1][1]
    # Nanoseconds a microsecond clock cannot hold do not pull in the next event.
    first, second = gaps[0]
    if second.timestamp - first.timestamp > timedelta(microseconds=1):
        text = first.timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "999Z"
        assert job_as_of(ledger, driven_job, parse_as_of(text), owner=None)[1] == first.sequence


def test_a_future_time_is_the_current_state(ledger: JobLedger, driven_job: str) -> None:
    current = ledger.job_row(driven_job, owner=None)
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    assert job_as_of(ledger, driven_job, tomorrow, owner="alice") == (current, len(EXPECTED))
    far = parse_as_of("9999-12-31T23:59:59-05:00")  # beyond what UTC datetimes can hold
    assert job_as_of(ledger, driven_job, far, owner="alice") == (current, len(EXPECTED))


def test_before_the_submission_the_job_did_not_exist_yet(
    ledger: JobLedger, driven_job: str
) -> None:
    submitted = ledger.job_events(driven_job, owner=None)[0].timestamp
    earlier = [
        submitted - timedelta(microseconds=1),
        submitted - timedelta(days=400),
        parse_as_of("0001-01-01T00:00:00+05:00"),  # before year 1 in UTC
    ]
    for moment in earlier:
        with pytest.raises(JobNotFound, match="did not exist yet") as caught:
            job_as_of(ledger, driven_job, moment, owner="alice")
        assert submitted.isoformat() in caught.value.message
    with pytest.raises(JobNotFound, match="did not exist yet as of sequence 0"):
        job_as_of(ledger, driven_job, 0, owner="alice")
    assert job_as_of(ledger, driven_job, submitted, owner="alice")[1] == 1


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-29",  # a bare date names a day, not a moment
        "yesterday",
        "-1",
        "1.5",
        "2026-11-29T12:00:00",  # no offset: whose noon?
        "",
        " 1",
        "+1",
        "1e3",
        "2026-02-30T00:00:00Z",
        "2026-11-29T24:00:00Z",
        "2026-11-29T12:00:00+25:00",
        "2026-11-29T12:00Z",
        "\u0661",  # ARABIC-INDIC DIGIT ONE
    ],
)
def test_malformed_as_of_names_the_field_and_both_forms(text: str) -> None:
    with pytest.raises(InvalidJobRequest) as caught:
        parse_as_of(text)
    assert caught.value.details == {"field": "as_of"}
    assert "sequence number" in caught.value.message
    assert "RFC 3339 time with an offset" in caught.value.message
    assert "2026-11-29T12:00:00Z" in caught.value.message


def test_a_plus_lost_in_a_url_gets_a_hint() -> None:
    with pytest.raises(InvalidJobRequest, match="%2B"):
        parse_as_of("2026-11-29T14:00:00 02:00")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("7", 7),
        ("2026-11-29T12:00:00Z", datetime(2026, 11, 29, 12, tzinfo=UTC)),
        ("2026-11-29t12:00:00z", datetime(2026, 11, 29, 12, tzinfo=UTC)),
        ("2026-11-29 14:00:00+02:00", datetime(2026, 11, 29, 12, tzinfo=UTC)),
        ("2026-11-29T07:00:00.5-05:00", datetime(2026, 11, 29, 12, 0, 0, 500000, tzinfo=UTC)),
        ("2026-11-29T12:00:00.123456789Z", datetime(2026, 11, 29, 12, 0, 0, 123456, tzinfo=UTC)),
    ],
)
def test_well_formed_as_of(text: str, expected: int | datetime) -> None:
    assert parse_as_of(text) == expected


def test_naive_or_negative_values_from_code_are_refused(ledger: JobLedger, driven_job: str) -> None:
    with pytest.raises(InvalidJobRequest):
        job_as_of(ledger, driven_job, datetime(2026, 11, 29, 12), owner=None)
    with pytest.raises(InvalidJobRequest):
        job_as_of(ledger, driven_job, -1, owner=None)


def test_someone_elses_or_no_job_is_not_found(ledger: JobLedger, driven_job: str) -> None:
    for job_id, owner in [
        (driven_job, "bob"),
        ("job_" + "0" * 32, None),
        ("not-a-job", None),
    ]:
        with pytest.raises(JobNotFound, match="not found"):
            job_as_of(ledger, job_id, 1, owner=owner)
    # bob may not even learn when alice's job was submitted.
    with pytest.raises(JobNotFound, match="not found"):
        job_as_of(ledger, driven_job, 0, owner="bob")
    assert job_as_of(ledger, driven_job, 1, owner=None)[0].owner == "alice"


def test_a_file_id_dressed_as_a_job_id_is_not_found(ledger: JobLedger) -> None:
    uploaded = ledger.upload_file(
        owner="alice",
        sha256="2" * 64,
        size_bytes=3,
        content_type="text/plain",
        filename=None,
        location="local:files/f",
    )
    job_id = "job_" + uploaded.file.file_id.removeprefix("file_")
    with pytest.raises(JobNotFound):
        job_as_of(ledger, job_id, 1, owner="alice")


# ---- the CLI command --------------------------------------------------------------


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=database_url, home=tmp_path)


@pytest.fixture
def completed_job(ledger: JobLedger) -> str:
    job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
    run_to_completion(ledger, job_id)
    return job_id


def test_replay_prints_the_job_then_and_the_events_up_to_it(
    settings: Settings, completed_job: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_replay(settings, completed_job, "2") == 0
    lines = capsys.readouterr().out.splitlines()
    heading = re.fullmatch(
        rf"job {completed_job} as of 2 \(event 2 of 5: JobAssigned at (\S+)\)", lines[0]
    )
    assert heading, lines[0]
    assert datetime.fromisoformat(heading.group(1)).utcoffset() is not None
    matches = [re.fullmatch(r"  (\w+): +(.*)", line) for line in lines[1:-2]]
    assert all(matches), lines
    fields = {m.group(1): m.group(2) for m in matches if m}
    assert fields["status"] == "assigned"
    assert fields["miner_id"] == "miner_test"
    assert fields["attempt"] == "1" and fields["progress"] == "0"
    assert fields["result"] == "-" and fields["cost"] == "-"
    assert "pending_reason" not in fields
    assert len({m.start(2) for m in matches if m}) == 1, "values are not aligned"
    assert lines[-2].startswith("1 JobSubmitted {")
    assert json.loads(lines[-2].removeprefix("1 JobSubmitted "))["owner"] == "alice"
    assert json.loads(lines[-1].removeprefix("2 JobAssigned ")) == {
        "miner_id": "miner_test",
        "attempt": 1,
    }


def test_replay_as_json_by_time(
    settings: Settings, ledger: JobLedger, completed_job: str, capsys: pytest.CaptureFixture[str]
) -> None:
    records = ledger.job_events(completed_job, owner=None)
    last = records[-1].timestamp.astimezone(timezone(timedelta(hours=-3))).isoformat()
    assert run_replay(settings, completed_job, last, as_json=True) == 0
    document = json.loads(capsys.readouterr().out, parse_float=Decimal)
    assert document["sequence"] == 5
    assert document["job"]["status"] == "completed"
    assert document["job"]["cost"] == Decimal("0.05")
    assert document["job"]["pending_reason"] is None
    assert [event["sequence"] for event in document["events"]] == [1, 2, 3, 4, 5]
    assert [event["type"] for event in document["events"]][-1] == "JobCompleted"

    assert run_replay(settings, completed_job, "1", as_json=True) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["sequence"], document["job"]["status"]) == (1, "pending")
    assert [event["type"] for event in document["events"]] == ["JobSubmitted"]


def test_replay_of_no_job_or_before_it_is_exit_1(
    settings: Settings, completed_job: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_replay(settings, "job_" + "f" * 32, "1") == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "not found" in captured.err
    assert run_replay(settings, completed_job, "2000-01-01T00:00:00Z") == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "did not exist yet" in captured.err


def test_replay_of_a_malformed_as_of_is_exit_2(
    settings: Settings, completed_job: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_replay(settings, completed_job, "2026-11-29") == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "RFC 3339" in captured.err and "sequence" in captured.err
