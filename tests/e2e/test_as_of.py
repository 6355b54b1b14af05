"""GET /v1/jobs/{id}?as_of=: a job as it stood at an event number or a time, over real HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import SEED_JOB, Served
from tests.e2e.dispatch import wait_for

pytestmark = pytest.mark.e2e


@dataclass
class CanceledJob:
    job_id: str
    owner: httpx.Client
    events: list[dict[str, Any]]


@pytest.fixture(scope="module")
def canceled(served: Served) -> CanceledJob:
    """A job submitted and then canceled: two events, pending then canceled."""
    owner = served.client(served.new_key("client"))
    submitted = owner.post("/v1/jobs", json=SEED_JOB)
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["job_id"]
    canceled = owner.delete(f"/v1/jobs/{job_id}")
    assert canceled.status_code == 200, canceled.text
    events = owner.get(f"/v1/jobs/{job_id}/events")
    assert events.status_code == 200, events.text
    recorded = events.json()["events"]
    assert [(e["sequence"], e["type"]) for e in recorded] == [
        (1, "JobSubmitted"),
        (2, "JobCanceled"),
    ]
    return CanceledJob(job_id, owner, recorded)


def as_of(client: httpx.Client, job_id: str, value: str) -> httpx.Response:
    return client.get(f"/v1/jobs/{job_id}", params={"as_of": value})


def test_each_sequence_shows_the_job_after_that_event(canceled: CanceledJob) -> None:
    current = canceled.owner.get(f"/v1/jobs/{canceled.job_id}").json()
    first = as_of(canceled.owner, canceled.job_id, "1")
    assert first.status_code == 200, first.text
    then = first.json()
    assert then["status"] == "pending" and then["completed_at"] is None
    assert then["pending_reason"] is None
    assert then["job_id"] == canceled.job_id
    assert then["created_at"] == current["created_at"]
    assert then.keys() == current.keys()

    second = as_of(canceled.owner, canceled.job_id, "2")
    assert second.status_code == 200, second.text
    assert second.json() == current
    assert second.json()["status"] == "canceled"
    # Past the last event is the current state, not an error.
    assert as_of(canceled.owner, canceled.job_id, "50").json() == current


def test_a_time_shows_the_job_as_it_stood_then(canceled: CanceledJob) -> None:
    submitted_at = canceled.events[0]["timestamp"]
    at_submission = as_of(canceled.owner, canceled.job_id, submitted_at)
    assert at_submission.status_code == 200, at_submission.text
    assert at_submission.json()["status"] == "pending"
    # The same instant with an offset; httpx sends the '+' as %2B.
    moment = datetime.fromisoformat(submitted_at.replace("Z", "+00:00"))
    shifted = moment.astimezone(timezone(timedelta(hours=2))).isoformat()
    assert as_of(canceled.owner, canceled.job_id, shifted).json()["status"] == "pending"
    canceled_at = canceled.events[1]["timestamp"]
    assert as_of(canceled.owner, canceled.job_id, canceled_at).json()["status"] == "canceled"
    future = as_of(canceled.owner, canceled.job_id, "2999-01-01T00:00:00Z")
    assert future.status_code == 200 and future.json()["status"] == "canceled"


def test_before_the_job_existed_is_a_404(canceled: CanceledJob) -> None:
    for value in ("0", "2001-01-01T00:00:00Z"):
        answer = as_of(canceled.owner, canceled.job_id, value)
        assert answer.status_code == 404, answer.text
        assert "did not exist yet" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    "value", ["", "2026-11-29", "yesterday", "-1", "1.5", "2026-11-29T12:00:00"]
)
def test_a_malformed_as_of_is_a_422_naming_the_field(canceled: CanceledJob, value: str) -> None:
    answer = as_of(canceled.owner, canceled.job_id, value)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["details"]["field"] == "as_of"
    assert "sequence number" in error["message"] and "RFC 3339" in error["message"]


def test_an_unencoded_plus_gets_a_hint(canceled: CanceledJob) -> None:
    answer = canceled.owner.get(f"/v1/jobs/{canceled.job_id}?as_of=2026-11-29T14:00:00+02:00")
    assert answer.status_code == 422, answer.text
    assert "%2B" in answer.json()["error"]["message"]


def test_only_the_owner_auditors_and_admins_see_it(served: Served, canceled: CanceledJob) -> None:
    stranger = served.client(served.new_key("client"))
    for value in ("1", "2", "0"):
        answer = as_of(stranger, canceled.job_id, value)
        assert answer.status_code == 404, answer.text
        assert "did not exist yet" not in answer.json()["error"]["message"]
    for reader in (served.client(served.new_key("auditor")), served.client(served.admin_key)):
        answer = as_of(reader, canceled.job_id, "1")
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "pending"
    unknown = as_of(canceled.owner, "job_" + "0" * 32, "1")
    assert unknown.status_code == 404, unknown.text


def test_a_pending_reason_is_not_part_of_the_history(served: Served) -> None:
    client = served.client(served.new_key("client"))
    submitted = client.post("/v1/jobs", json=SEED_JOB | {"input": "waits"})
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["job_id"]
    live = wait_for(
        lambda: (view := client.get(f"/v1/jobs/{job_id}").json()).get("pending_reason") and view,
        15,
        "a pending_reason",
        served.log,
    )
    assert live["status"] == "pending"
    then = as_of(client, job_id, "1").json()
    assert then["pending_reason"] is None
    assert {k: v for k, v in then.items() if k != "pending_reason"} == {
        k: v for k, v in live.items() if k != "pending_reason"
    }
