"""Listing, cursor paging, per-client visibility and the history window, over real HTTP."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import SEED_JOB, Served

pytestmark = pytest.mark.e2e

RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")
PRIORITIES = ("low", "normal", "high", "urgent", "normal")


@dataclass
class Submitted:
    job_id: str
    estimated_cost: Decimal


def submit(client: httpx.Client, index: int = 0, priority: str = "normal") -> Submitted:
    body = SEED_JOB | {"input": f"job {index}", "priority": priority}
    answer = client.post("/v1/jobs", json=body)
    assert answer.status_code == 201, answer.text
    created = json.loads(answer.text, parse_float=Decimal)
    return Submitted(created["job_id"], created["estimated_cost"])


def submit_many(client: httpx.Client, count: int) -> list[str]:
    """`count` jobs, one after another, so their order is known (oldest first)."""
    return [submit(client, index).job_id for index in range(count)]


def cancel(client: httpx.Client, job_id: str) -> None:
    answer = client.delete(f"/v1/jobs/{job_id}")
    assert answer.status_code == 200, answer.text


def get_json(client: httpx.Client, path: str, **params: Any) -> dict[str, Any]:
    answer = client.get(path, params=params)
    assert answer.status_code == 200, answer.text
    return dict(json.loads(answer.text, parse_float=Decimal))


def assert_validation_error(answer: httpx.Response, field: str) -> None:
    """A 422 with the standard error body whose message names `field`."""
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["status"] == 422
    assert field in error["message"], error["message"]


def pages(client: httpx.Client, path: str, limit: int, **params: Any) -> Iterator[dict[str, Any]]:
    """Every page of a cursor-paged listing, checking the has_more / next_cursor contract."""
    cursor = None
    for _ in range(1000):
        page = get_json(
            client, path, limit=limit, **params, **({"cursor": cursor} if cursor else {})
        )
        assert len(page["jobs"]) <= limit
        yield page
        if not page["has_more"]:
            assert page["next_cursor"] is None
            return
        assert isinstance(page["next_cursor"], str)
        assert page["next_cursor"]
        cursor = page["next_cursor"]
    raise AssertionError("paging never ended")


def all_job_ids(client: httpx.Client, path: str = "/v1/jobs", **params: Any) -> list[str]:
    return [job["job_id"] for page in pages(client, path, 100, **params) for job in page["jobs"]]


def new_client(served: Served, role: str = "client") -> httpx.Client:
    return served.client(served.new_key(role))


# --- list: limit, status filter, cursor paging --------------------------------------------


@pytest.fixture(scope="module")
def forty_five(served: Served) -> tuple[httpx.Client, list[str]]:
    """A client with 45 pending jobs, oldest first."""
    client = new_client(served)
    return client, submit_many(client, 45)


def test_every_limit_from_1_to_100_is_honoured(
    forty_five: tuple[httpx.Client, list[str]],
) -> None:
    client, job_ids = forty_five
    newest_first = job_ids[::-1]
    for limit in range(1, 101):
        page = get_json(client, "/v1/jobs", limit=limit)
        expected = newest_first[:limit]
        assert [job["job_id"] for job in page["jobs"]] == expected, limit
        assert page["total"] == 45
        assert page["has_more"] is (limit < 45)
        assert (page["next_cursor"] is None) is (limit >= 45)


@pytest.mark.parametrize("limit", ["0", "101", "abc", "-1", "1.5"])
def test_out_of_range_limits_are_validation_errors(served: Served, limit: str) -> None:
    assert_validation_error(new_client(served).get("/v1/jobs", params={"limit": limit}), "limit")


def test_cursor_paging_returns_every_job_once_newest_first(
    forty_five: tuple[httpx.Client, list[str]],
) -> None:
    client, job_ids = forty_five
    seen = list(pages(client, "/v1/jobs", 10))
    assert [len(page["jobs"]) for page in seen] == [10, 10, 10, 10, 5]
    assert all(page["total"] == 45 for page in seen)
    listed = [job for page in seen for job in page["jobs"]]
    assert [job["job_id"] for job in listed] == job_ids[::-1]
    created = [job["created_at"] for job in listed]
    assert created == sorted(created, reverse=True)


def test_a_full_last_page_says_there_is_no_more(served: Served) -> None:
    client = new_client(served)
    job_ids = submit_many(client, 6)
    seen = list(pages(client, "/v1/jobs", 3))
    assert [len(page["jobs"]) for page in seen] == [3, 3]
    assert [job["job_id"] for page in seen for job in page["jobs"]] == job_ids[::-1]


def test_status_filter_and_total_count_matching_jobs(served: Served) -> None:
    client = new_client(served)
    job_ids = submit_many(client, 5)
    for job_id in job_ids[:2]:
        cancel(client, job_id)

    pending = get_json(client, "/v1/jobs", status="pending")
    assert pending["total"] == 3
    assert {job["job_id"] for job in pending["jobs"]} == set(job_ids[2:])
    assert {job["status"] for job in pending["jobs"]} == {"pending"}

    canceled = get_json(client, "/v1/jobs", status="canceled")
    assert canceled["total"] == 2
    assert {job["job_id"] for job in canceled["jobs"]} == set(job_ids[:2])

    assert get_json(client, "/v1/jobs", status="running")["total"] == 0
    assert get_json(client, "/v1/jobs")["total"] == 5
    filtered = list(pages(client, "/v1/jobs", 1, status="pending"))
    assert [job["job_id"] for page in filtered for job in page["jobs"]] == job_ids[:1:-1]
    assert all(page["total"] == 3 for page in filtered)


@pytest.mark.parametrize("status", ["bogus", "PENDING", ""])
def test_an_unknown_status_is_a_validation_error(served: Served, status: str) -> None:
    assert_validation_error(new_client(served).get("/v1/jobs", params={"status": status}), "status")


def test_paging_neither_skips_nor_repeats_while_jobs_are_added(served: Served) -> None:
    client = new_client(served)
    existing = submit_many(client, 25)
    writer = served.client(client.headers["X-Api-Key"])
    stop = threading.Event()
    added: list[str] = []

    def keep_submitting() -> None:
        while not stop.is_set():
            added.append(submit(writer, 1000 + len(added)).job_id)

    first = get_json(client, "/v1/jobs", limit=7)
    assert first["jobs"][0]["job_id"] == existing[-1]
    listed = [job["job_id"] for job in first["jobs"]]
    cursor = first["next_cursor"]
    # Paging has started: from now on jobs arrive from another thread, and between fetches.
    background = threading.Thread(target=keep_submitting)
    background.start()
    try:
        while cursor is not None:
            added.append(submit(client, 2000 + len(added)).job_id)
            page = get_json(client, "/v1/jobs", limit=7, cursor=cursor)
            listed += [job["job_id"] for job in page["jobs"]]
            cursor = page["next_cursor"]
            assert len(listed) <= 25, "paging ran past the jobs that existed when it started"
    finally:
        stop.set()
        background.join()

    assert len(added) > 3
    assert len(listed) == len(set(listed)), "a job appeared twice"
    assert listed == existing[::-1]
    assert get_json(client, "/v1/jobs")["total"] == 25 + len(added)


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage",
        "!!!",
        base64.urlsafe_b64encode(b"seq:abc").decode(),
        base64.urlsafe_b64encode(b"offset:10").decode(),
        "x" * 201,
    ],
)
def test_a_cursor_we_did_not_issue_is_a_validation_error(served: Served, cursor: str) -> None:
    client = new_client(served)
    submit(client)
    assert_validation_error(client.get("/v1/jobs", params={"cursor": cursor}), "cursor")
    history = client.get(
        "/v1/jobs/history", params={"from": "2020-01-01", "to": "2099-12-31", "cursor": cursor}
    )
    assert_validation_error(history, "cursor")


# --- visibility ----------------------------------------------------------------------------


def test_clients_see_only_their_own_jobs_and_auditors_see_all(served: Served) -> None:
    alice, bob = new_client(served), new_client(served)
    alices, bobs = set(submit_many(alice, 3)), set(submit_many(bob, 2))
    window = {"from": "2020-01-01", "to": "2099-12-31"}

    assert set(all_job_ids(alice)) == alices
    assert set(all_job_ids(bob)) == bobs
    assert set(all_job_ids(alice, "/v1/jobs/history", **window)) == alices
    assert get_json(alice, "/v1/jobs/history", **window)["totals"]["jobs"] == 3
    assert get_json(bob, "/v1/jobs")["total"] == 2

    auditor = new_client(served, "auditor")
    assert set(all_job_ids(auditor)) >= alices | bobs
    assert set(all_job_ids(auditor, "/v1/jobs/history", **window)) >= alices | bobs
    for job_id in alices | bobs:
        assert auditor.get(f"/v1/jobs/{job_id}").status_code == 200


# --- history -------------------------------------------------------------------------------


@dataclass
class Window:
    """A client with 3 pending and 2 canceled jobs, oldest first, and their creation times."""

    client: httpx.Client
    jobs: list[Submitted]
    created: list[datetime]

    @property
    def day(self) -> str:
        return self.created[0].date().isoformat()


def parse_time(text: str) -> datetime:
    assert RFC3339_UTC.fullmatch(text), text
    return datetime.fromisoformat(text)


@pytest.fixture(scope="module")
def window(served: Served) -> Window:
    client = new_client(served)
    jobs = [submit(client, index, priority) for index, priority in enumerate(PRIORITIES)]
    for job in jobs[3:]:
        cancel(client, job.job_id)
    created = [parse_time(get_json(client, f"/v1/jobs/{j.job_id}")["created_at"]) for j in jobs]
    if created[0].date() != created[-1].date():
        pytest.skip("the jobs straddle midnight UTC")
    return Window(client, jobs, created)


def test_history_of_today_shows_todays_jobs_with_totals(window: Window) -> None:
    history = get_json(window.client, "/v1/jobs/history", **{"from": window.day, "to": window.day})
    assert {job["job_id"] for job in history["jobs"]} == {job.job_id for job in window.jobs}
    totals = history["totals"]
    assert totals["jobs"] == 5
    assert totals["by_status"] == {"pending": 3, "canceled": 2}
    assert totals["total_cost"] == Decimal(0)
    assert totals["total_estimated_cost"] == sum(job.estimated_cost for job in window.jobs)
    assert totals["total_estimated_cost"] == Decimal("0.315")  # 0.04+0.05+0.075+0.1+0.05
    assert history["has_more"] is False
    assert history["next_cursor"] is None


def test_history_echoes_its_window_in_rfc3339(window: Window) -> None:
    history = get_json(window.client, "/v1/jobs/history", **{"from": window.day, "to": window.day})
    midnight = datetime.fromisoformat(window.day).replace(tzinfo=UTC)
    assert parse_time(history["from"]) == midnight
    end = parse_time(history["to"])
    assert midnight + timedelta(hours=23, minutes=59, seconds=59) <= end
    assert end < midnight + timedelta(days=1)


def test_the_to_date_includes_its_whole_day(window: Window) -> None:
    history = get_json(
        window.client, "/v1/jobs/history", **{"from": "2020-01-01", "to": window.day}
    )
    assert history["totals"]["jobs"] == 5
    yesterday = (window.created[0] - timedelta(days=1)).date().isoformat()
    before = get_json(window.client, "/v1/jobs/history", **{"from": "2020-01-01", "to": yesterday})
    assert before["totals"]["jobs"] == 0


def test_a_window_in_the_past_is_empty(window: Window) -> None:
    history = get_json(
        window.client, "/v1/jobs/history", **{"from": "2020-01-01", "to": "2020-01-31"}
    )
    assert history["jobs"] == []
    assert history["totals"]["jobs"] == 0
    assert history["totals"]["by_status"] == {}
    assert history["totals"]["total_cost"] == Decimal(0)
    assert history["totals"]["total_estimated_cost"] == Decimal(0)
    assert history["has_more"] is False


def rfc3339(moment: datetime, offset: timedelta) -> str:
    """`moment` written in another zone; Z for UTC."""
    text = moment.astimezone(timezone(offset)).isoformat()
    return text.replace("+00:00", "Z")


@pytest.mark.parametrize(
    ("from_offset", "to_offset"),
    [
        (timedelta(0), timedelta(0)),
        (timedelta(hours=5, minutes=30), timedelta(hours=-3)),
        (timedelta(hours=-8), timedelta(hours=9)),
    ],
)
def test_history_bounds_as_rfc3339_times_with_z_or_offsets(
    window: Window, from_offset: timedelta, to_offset: timedelta
) -> None:
    created = window.created
    job_ids = [job.job_id for job in window.jobs]

    def between(start: datetime, end: datetime) -> dict[str, Any]:
        params = {"from": rfc3339(start, from_offset), "to": rfc3339(end, to_offset)}
        history = get_json(window.client, "/v1/jobs/history", **params)
        assert parse_time(history["from"]) == start
        assert parse_time(history["to"]) == end
        return history

    everything = between(created[0], created[-1])
    assert {job["job_id"] for job in everything["jobs"]} == set(job_ids)
    # Both bounds are inclusive, to the microsecond.
    middle = between(created[1], created[2])
    assert {job["job_id"] for job in middle["jobs"]} == set(job_ids[1:3])
    assert middle["totals"]["jobs"] == 2
    after = between(created[-1] + timedelta(microseconds=1), created[-1] + timedelta(hours=1))
    assert after["totals"]["jobs"] == 0


def test_history_pages_while_totals_cover_the_whole_window(window: Window) -> None:
    params = {"from": window.day, "to": window.day}
    seen = list(pages(window.client, "/v1/jobs/history", 2, **params))
    assert [len(page["jobs"]) for page in seen] == [2, 2, 1]
    listed = [job["job_id"] for page in seen for job in page["jobs"]]
    assert listed == [job.job_id for job in window.jobs][::-1]
    for page in seen:
        assert page["totals"]["jobs"] == 5
        assert page["totals"]["by_status"] == {"pending": 3, "canceled": 2}
        assert page["totals"]["total_estimated_cost"] == Decimal("0.315")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"from": "2026-02-02", "to": "2026-02-01"}, "from"),
        ({"from": "2026-01-01T12:00:00Z", "to": "2026-01-01T11:59:59Z"}, "from"),
        ({"from": "2026-13-01", "to": "2026-12-31"}, "from"),
        ({"from": "2026-01-01", "to": "yesterday"}, "to"),
        ({"from": "2026/01/01", "to": "2026-01-31"}, "from"),
        ({"from": "2026-01-01", "to": "2026-02-30"}, "to"),
        ({"from": "2026-01-01T00:00:00", "to": "2026-01-31"}, "from"),
        ({"from": "2026-01-01", "to": "2026-01-31T23:59:59"}, "to"),
        ({"from": "2026-01-01", "to": "2026-01-31", "limit": "0"}, "limit"),
        ({"from": "2026-01-01", "to": "2026-01-31", "limit": "101"}, "limit"),
    ],
)
def test_bad_history_windows_are_validation_errors(
    window: Window, params: dict[str, str], field: str
) -> None:
    assert_validation_error(window.client.get("/v1/jobs/history", params=params), field)


def test_a_date_that_is_not_yyyy_mm_dd_is_refused(window: Window) -> None:
    answer = window.client.get(
        "/v1/jobs/history", params={"from": "2026-W01-1", "to": "2026-01-31"}
    )
    assert_validation_error(answer, "from")
