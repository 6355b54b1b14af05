"""GET /metrics and the JSON logs of one served ledger with one miner, rate limits on.

Everything waits on /metrics itself (public, never rate limited), so the keys' small
budgets go to the requests under test.
"""

from __future__ import annotations

import json
import math
import secrets
from collections import Counter
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.protocol import Namespace
from tests.e2e.conftest import Served
from tests.e2e.dispatch import Miner, start_miner, submit, wait_for

pytestmark = pytest.mark.e2e

PER_MINUTE = 10
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def ledger(serve_factory: Callable[..., Served]) -> Served:
    """A ledger whose keys get PER_MINUTE requests a minute."""
    return serve_factory(
        env={"JOBLEDGER_RATE_LIMITS": "on", "JOBLEDGER_RATE_LIMIT_PER_MINUTE": str(PER_MINUTE)}
    )


@pytest.fixture(scope="module")
def miner(
    ledger: Served, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Miner]:
    started = start_miner(ledger, nats_url, tmp_path_factory.mktemp("miner"), "cpu")
    yield started
    started.stop()


def scrape(served: Served) -> Samples:
    """Every sample of a scrape, by name and labels."""
    answer = httpx.get(served.url + "/metrics", timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_need_no_key_and_speak_prometheus(ledger: Served) -> None:
    answer = httpx.get(ledger.url + "/metrics", timeout=30)
    assert answer.status_code == 200
    assert len(answer.headers["x-request-id"]) == 32
    samples = scrape(ledger)
    assert value(samples, "jobledger_postgres_up") == 1
    assert value(samples, "jobledger_build_info", version=metadata.version("jobledger")) == 1
    assert value(samples, "process_resident_memory_bytes") > 0


def test_a_scrape_names_no_job_key_or_owner(ledger: Served) -> None:
    client_key = ledger.new_key("client")
    job_id = f"job_{secrets.token_hex(16)}"
    assert ledger.client(client_key).get(f"/v1/jobs/{job_id}").status_code == 404
    text = httpx.get(ledger.url + "/metrics", timeout=30).text
    # The request is counted under its route's template, not its path.
    assert 'route="/v1/jobs/{job_id}",status="404"' in text
    key_id = client_key.split("_")[1]  # jl_<key_id>_<secret>: the key id owns its jobs
    for named in (job_id, client_key, key_id, ledger.admin_key):
        assert named not in text


def test_metrics_follow_jobs_from_submission_to_completion(ledger: Served, miner: Miner) -> None:
    before = scrape(ledger)
    for reader in ("projection", "relay"):
        for unit in ("events", "seconds"):
            lag = before[(f"jobledger_{reader}_lag_{unit}", frozenset())]
            assert math.isfinite(lag) and lag >= 0
    client = ledger.client(ledger.new_key("client"))
    jobs = [submit(client, "echo", f"metrics {n}") for n in range(2)]
    again = {"Idempotency-Key": f"metrics-{secrets.token_hex(4)}"}
    body = {"model": "echo", "input": "once", "requirements": {"gpu_type": "cpu"}}
    first = client.post("/v1/jobs", json=body, headers=again)
    replay = client.post("/v1/jobs", json=body, headers=again)
    assert (first.status_code, replay.status_code) == (201, 201), replay.text
    assert replay.headers["idempotent-replayed"] == "true"
    jobs.append(first.json()["job_id"])

    streams = Namespace(ledger.nats_prefix)
    reports, assignments = streams.stream_name("REPORTS"), streams.stream_name("ASSIGNMENTS")
    assigned = {"stream": assignments, "consumer": f"assignments_{miner.miner_id}"}

    def all_done() -> Samples | None:
        samples = scrape(ledger)
        done = value(samples, "jobledger_jobs", status="completed")
        lags = [
            value(samples, f"jobledger_{reader}_lag_{unit}")
            for reader in ("projection", "relay")
            for unit in ("events", "seconds")
        ]
        # JetStream's answer may be a couple of seconds older than the database's: wait
        # until it too shows the miner's consumer and every report applied (removed).
        settled = ("jobledger_nats_consumer_pending", frozenset(assigned.items())) in samples
        settled &= ("jobledger_nats_stream_messages", frozenset({("stream", reports)})) in samples
        settled &= value(samples, "jobledger_nats_stream_messages", stream=reports) == 0
        return samples if done == len(jobs) and lags == [0, 0, 0, 0] and settled else None

    after = wait_for(all_done, 60, "3 completed jobs and no lag", lambda: ledger.log()[-3000:])

    # Jobs by status are the views' own counts: the list API (an auditor sees every job) agrees.
    page = ledger.client(ledger.new_key("auditor")).get("/v1/jobs", params={"limit": 100})
    assert page.status_code == 200, page.text
    by_status = Counter(job["status"] for job in page.json()["jobs"])
    for status in ("pending", "assigned", "running", "canceling", "completed", "failed"):
        assert value(after, "jobledger_jobs", status=status) == by_status[status], status

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("jobledger_submit_latency_seconds_count", outcome="created") == 3
    assert grew("jobledger_submit_latency_seconds_count", outcome="replayed") == 1
    assert grew("jobledger_submit_latency_seconds_sum", outcome="created") > 0
    assert grew("jobledger_dispatch_latency_seconds_count") == 3
    assert math.isfinite(value(after, "jobledger_dispatch_latency_seconds_sum"))
    assert value(after, "jobledger_log_position") > value(before, "jobledger_log_position")
    assert grew("jobledger_http_requests_total", method="POST", route="/v1/jobs", status="201") == 4

    assert value(after, "jobledger_miners", status="online") == 1
    assert value(after, "jobledger_miners", status="offline") == 0
    assert value(after, "jobledger_nats_up") == 1
    pending = {
        dict(labels)["consumer"]: found
        for (name, labels), found in after.items()
        if name == "jobledger_nats_consumer_pending" and dict(labels)["stream"] == reports
    }
    assert pending == {"ingestor": 0}  # every report was applied
    assert after[("jobledger_nats_consumer_ack_pending", frozenset(assigned.items()))] == 0


def test_a_rate_limited_request_is_counted(ledger: Served) -> None:
    before = scrape(ledger)
    client = ledger.client(ledger.new_key("client"))
    # Until the first 429 (a minute boundary may reset the window once on the way).
    codes = []
    while 429 not in codes and len(codes) < 3 * PER_MINUTE:
        codes.append(client.get("/v1/jobs").status_code)
    assert codes[-1] == 429 and set(codes[:-1]) == {200}, codes
    after = scrape(ledger)
    refused = ("jobledger_rate_limited_total", frozenset({("role", "client")}))
    assert after[refused] - before[refused] == 1
    answered = {"method": "GET", "route": "/v1/jobs", "status": "429"}
    assert value(after, "jobledger_http_requests_total", **answered) == 1


def log_lines(served: Served) -> list[dict[str, Any]]:
    """Every complete line of the served process's output, each parsed as one JSON object."""
    complete = served.log().rpartition("\n")[0]  # the server may be writing the last one
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def test_logs_are_json_lines_carrying_the_request_id(ledger: Served) -> None:
    client = ledger.client(ledger.new_key("client"))
    request_id = f"trace-{secrets.token_hex(8)}"
    answer = client.post(
        "/v1/jobs",
        json={"model": "echo", "input": "logged", "requirements": {"gpu_type": "cpu"}},
        headers={"X-Request-Id": request_id},
    )
    assert answer.status_code == 201, answer.text
    assert answer.headers["x-request-id"] == request_id
    job_id = answer.json()["job_id"]

    def submitted() -> dict[str, Any] | None:
        found = [line for line in log_lines(ledger) if line.get("request_id") == request_id]
        return found[0] if found else None

    line = wait_for(submitted, 10, f"a log line with request id {request_id}", ledger.log)
    assert line["job_id"] == job_id and job_id in line["message"]
    assert line["level"] == "INFO" and line["logger"] == "jobledger.api.jobs"
    assert line["time"].endswith("Z")
    # uvicorn's own lines go through the same formatter.
    assert any(entry["logger"].startswith("uvicorn") for entry in log_lines(ledger))

    # An id that is not a plain token is replaced, never echoed.
    odd = client.get("/v1/jobs/nope", headers={"X-Request-Id": "two words"})
    assert odd.status_code in (404, 429)
    assert odd.headers["x-request-id"] != "two words"
    assert len(odd.headers["x-request-id"]) == 32
