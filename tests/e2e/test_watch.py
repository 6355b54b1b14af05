"""GET /v1/jobs/{job_id}/watch against a served ledger and a miner: the job's events, live.

One served ledger and one miner (offering t4, started only once a watcher is listening)
for the module. The stream is parsed here with a few lines of our own, not with the SDK.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Served
from tests.e2e.dispatch import Miner, events, start_miner, status, submit

pytestmark = pytest.mark.e2e

GPU = "t4"  # what the module's miner offers
NOBODY_OFFERS = "h100"  # jobs for this stay pending
TERMINAL = {"completed", "failed", "canceled", "timed_out"}
# No byte for this long fails the test instead of hanging it (keepalives come every 15 s).
READ_SECONDS = 20


@dataclass
class Frame:
    """One block of the stream: its fields (id, event, data, retry) and its comment lines."""

    fields: dict[str, str] = field(default_factory=dict)
    comments: list[str] = field(default_factory=list)

    @property
    def event(self) -> str | None:
        return self.fields.get("event")

    def json(self) -> Any:
        return json.loads(self.fields["data"])


def frames(response: httpx.Response) -> Iterator[Frame]:
    """The blocks of an SSE stream as they arrive (a blank line ends each)."""
    frame = Frame()
    for line in response.iter_lines():
        if line == "":
            if frame.fields or frame.comments:
                yield frame
            frame = Frame()
        elif line.startswith(":"):
            frame.comments.append(line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data" and "data" in frame.fields:
                value = frame.fields["data"] + "\n" + value
            frame.fields[name] = value
    assert not frame.fields and not frame.comments, f"an unterminated block: {frame}"


def messages(stream: list[Frame]) -> list[dict[str, Any]]:
    """The `event: job` messages' data, checking that each id is its sequence."""
    found = []
    for frame in stream:
        if frame.event == "job":
            data = frame.json()
            assert frame.fields["id"] == str(data["sequence"]), frame
            found.append(data)
    return found


def watch(
    client: httpx.Client,
    job_id: str,
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
) -> list[Frame]:
    """The whole stream, read until the server closes it."""
    with client.stream(
        "GET",
        f"/v1/jobs/{job_id}/watch",
        headers=headers,
        params=params,
        timeout=httpx.Timeout(30, read=READ_SECONDS),
    ) as response:
        assert response.status_code == 200, response.read()
        return list(frames(response))


@pytest.fixture(scope="module")
def key(served: Served) -> str:
    return served.new_key("client")


@pytest.fixture(scope="module")
def client(served: Served, key: str) -> httpx.Client:
    return served.client(key)


@pytest.fixture(scope="module")
def miner(
    served: Served, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], Miner]]:
    """Start the module's miner on first call (once); it is killed at the end of the module."""
    started: list[Miner] = []

    def start() -> Miner:
        if not started:
            started.append(start_miner(served, nats_url, tmp_path_factory.mktemp("miner"), GPU))
        return started[0]

    yield start
    for one in started:
        one.kill()


@dataclass
class Watched:
    """A job watched from its submission to its end, and everything the stream carried."""

    job_id: str
    stream: list[Frame]
    response: httpx.Response


@pytest.fixture(scope="module")
def watched(client: httpx.Client, served: Served, miner: Callable[[], Miner]) -> Watched:
    """Submit a job, start watching it while it is pending, then let a miner run it."""
    job_id = submit(client, "sleep", "2", gpu_type=GPU)
    stream: list[Frame] = []
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/watch", timeout=httpx.Timeout(30, read=READ_SECONDS)
    ) as response:
        assert response.status_code == 200, response.read()
        arriving = frames(response)
        # The retry line, then the current state: the job is still pending, nobody runs t4 yet.
        stream += [next(arriving), next(arriving)]
        assert stream[1].json()["job"]["status"] == "pending", stream[1]
        running = miner()
        try:
            stream += list(arriving)
        except httpx.ReadTimeout:
            pytest.fail(f"the stream stalled after {stream}\n{served.log()}\n{running.log()}")
    return Watched(job_id=job_id, stream=stream, response=response)


def test_a_watcher_sees_the_job_pending_assigned_running_progressing_and_completed(
    client: httpx.Client, watched: Watched
) -> None:
    assert watched.response.headers["content-type"] == "text/event-stream"
    assert watched.response.headers["cache-control"] == "no-cache"
    assert watched.response.headers["x-accel-buffering"] == "no"
    assert watched.stream[0].fields == {"retry": "2000"}
    sent = messages(watched.stream)
    stored = events(client, watched.job_id)
    # One message per stored event, in order, none skipped or repeated.
    assert [m["sequence"] for m in sent] == list(range(1, len(stored) + 1))
    assert [m["type"] for m in sent] == [e["type"] for e in stored]
    assert [m["timestamp"] for m in sent] == [e["timestamp"] for e in stored]
    statuses = [m["job"]["status"] for m in sent]
    moves = [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]
    assert moves == ["pending", "assigned", "running", "completed"], statuses
    progress = [m["job"]["progress"] for m in sent if m["type"] == "JobProgressReported"]
    assert progress, statuses  # `sleep 2` reports as it goes
    assert progress == sorted(progress)
    # `job` is the status body as it stood: at the end, exactly what GET answers now.
    assert sent[-1]["job"] == status(client, watched.job_id)
    # Then `end`, and the server closed the stream (frames() returned).
    assert watched.stream[-1].event == "end"
    assert watched.stream[-1].json() == {"status": "completed"}
    assert "id" not in watched.stream[-1].fields


def test_resuming_after_last_event_id_gives_exactly_the_events_after_it(
    client: httpx.Client, watched: Watched
) -> None:
    sent = messages(watched.stream)
    last = len(sent)
    for seen in (0, 1, 3, last - 1):
        resumed = watch(client, watched.job_id, headers={"Last-Event-ID": str(seen)})
        assert resumed[0].fields == {"retry": "2000"}
        assert messages(resumed) == sent[seen:], seen
        assert resumed[-1].json() == {"status": "completed"}
    # Everything seen already: the job has ended, so only `end`.
    resumed = watch(client, watched.job_id, headers={"Last-Event-ID": str(last)})
    assert [f.event for f in resumed] == [None, "end"]


def test_the_query_parameter_resumes_too_and_the_header_wins_over_it(
    client: httpx.Client, watched: Watched
) -> None:
    sent = messages(watched.stream)
    by_query = watch(client, watched.job_id, params={"last_event_id": "2"})
    assert messages(by_query) == sent[2:]
    # An EventSource keeps its URL when it reconnects and sends the id it saw in the header.
    both = watch(
        client, watched.job_id, headers={"Last-Event-ID": "4"}, params={"last_event_id": "1"}
    )
    assert messages(both) == sent[4:]


def test_without_last_event_id_a_finished_job_sends_its_last_state_and_ends_at_once(
    client: httpx.Client, watched: Watched
) -> None:
    stream = watch(client, watched.job_id)
    assert [f.event for f in stream] == [None, "job", "end"]
    assert messages(stream) == messages(watched.stream)[-1:]


def test_an_auditor_watches_any_job_and_a_miner_may_not(
    served: Served, client: httpx.Client, watched: Watched
) -> None:
    auditor = served.client(served.new_key("auditor"))
    stream = watch(auditor, watched.job_id, headers={"Last-Event-ID": "0"})
    assert messages(stream) == messages(watched.stream)
    miner_key = served.new_key("miner")
    answer = served.client(miner_key).get(f"/v1/jobs/{watched.job_id}/watch")
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"]["status"] == 403


def test_a_cancel_is_pushed_to_the_watcher_and_ends_the_stream(client: httpx.Client) -> None:
    job_id = submit(client, "sleep", "1", gpu_type=NOBODY_OFFERS)
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/watch", timeout=httpx.Timeout(30, read=READ_SECONDS)
    ) as response:
        arriving = frames(response)
        assert next(arriving).fields == {"retry": "2000"}
        assert next(arriving).json()["job"]["status"] == "pending"
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
        rest = list(arriving)
    assert [(m["sequence"], m["type"]) for m in messages(rest)] == [(2, "JobCanceled")]
    assert messages(rest)[0]["job"]["status"] == "canceled"
    assert rest[-1].json() == {"status": "canceled"}


def test_timeout_closes_the_stream_of_a_job_that_goes_on(client: httpx.Client) -> None:
    job_id = submit(client, "sleep", "1", gpu_type=NOBODY_OFFERS)
    at_once = watch(client, job_id, params={"timeout": "0"})
    assert [f.event for f in at_once] == [None, "job", None]
    assert at_once[-1].comments[0].startswith("timeout")
    later = watch(client, job_id, headers={"Last-Event-ID": "1"}, params={"timeout": "1"})
    assert messages(later) == []
    assert "end" not in [f.event for f in later]


def test_another_clients_job_and_a_job_that_does_not_exist_are_not_found(
    served: Served, watched: Watched
) -> None:
    other = served.client(served.new_key("client"))
    for job_id in (watched.job_id, "job_" + "0" * 32, "nonsense"):
        answer = other.get(f"/v1/jobs/{job_id}/watch")
        assert answer.status_code == 404, answer.text
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.json()["error"]["status"] == 404


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", "1e3", "9" * 19])
def test_a_malformed_last_event_id_is_a_422(
    client: httpx.Client, watched: Watched, value: str
) -> None:
    by_header = client.get(f"/v1/jobs/{watched.job_id}/watch", headers={"Last-Event-ID": value})
    assert by_header.status_code == 422, by_header.text
    error = by_header.json()["error"]
    assert error["details"]["errors"][0]["field"] == "Last-Event-ID", error
    by_query = client.get(f"/v1/jobs/{watched.job_id}/watch", params={"last_event_id": value})
    assert by_query.status_code == 422, by_query.text
    assert by_query.json()["error"]["details"]["errors"][0]["field"] == "last_event_id"


def test_a_bad_timeout_is_a_422(client: httpx.Client, watched: Watched) -> None:
    for value in ("-1", "x", "86401", "null", ""):
        answer = client.get(f"/v1/jobs/{watched.job_id}/watch", params={"timeout": value})
        assert answer.status_code == 422, answer.text


def test_the_server_stops_promptly_with_a_watcher_connected(
    serve_factory: Callable[..., Served], tmp_path: Path
) -> None:
    """uvicorn waits for open responses on shutdown: the watch streams must end themselves."""
    served = serve_factory()
    client = served.client(served.new_key("client"))
    job_id = submit(client, "sleep", "1", gpu_type=NOBODY_OFFERS)
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/watch", timeout=httpx.Timeout(30, read=READ_SECONDS)
    ) as response:
        arriving = frames(response)
        assert next(arriving).fields == {"retry": "2000"}
        assert next(arriving).json()["job"]["status"] == "pending"
        served.process.terminate()
        try:
            code = served.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not stop with a watcher connected:\n{served.log()}")
        rest = list(arriving)
    assert code == 0, served.log()
    # The stream ended without `end` (the job goes on): the client reconnects elsewhere.
    assert "end" not in [f.event for f in rest]


def test_the_openapi_document_describes_the_stream(served: Served) -> None:
    document = httpx.get(f"{served.url}/schema/openapi.json", timeout=30).json()
    operation = document["paths"]["/v1/jobs/{job_id}/watch"]["get"]
    success = operation["responses"]["200"]
    assert list(success["content"]) == ["text/event-stream"]
    assert {"Cache-Control", "X-Accel-Buffering"} <= set(success["headers"])
    assert {"401", "403", "404", "422", "429"} <= set(operation["responses"])
    assert "event: end" in operation["description"]
    parameters = {(p["in"], p["name"]): p["schema"] for p in operation["parameters"]}
    assert parameters[("header", "Last-Event-ID")]["pattern"] == "^[0-9]{1,18}$"
    assert parameters[("query", "last_event_id")]["type"] == "string"
    assert parameters[("query", "timeout")]["minimum"] == 0
    # A new job links to its stream, bounded: a link followed by a tool must not stream forever.
    link = document["paths"]["/v1/jobs"]["post"]["responses"]["201"]["links"]["watch"]
    assert link["operationId"] == operation["operationId"]
    assert link["parameters"]["timeout"] == "0"
