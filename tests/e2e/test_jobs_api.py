"""The client job routes over real HTTP: submit, status, idempotency, cancel, events, OpenAPI."""

from __future__ import annotations

import json
import re
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import SEED_JOB, Served

pytestmark = pytest.mark.e2e

JOB_ID = re.compile(r"job_[0-9a-f]{32}")
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")
SEED_STATUS_FIELDS = {
    "job_id",
    "status",
    "progress",
    "miner_id",
    "created_at",
    "started_at",
    "completed_at",
    "result",
}
EXTRA_STATUS_FIELDS = {"model", "priority", "attempt", "estimated_cost", "cost", "error"}


def job_body(**changes: Any) -> dict[str, Any]:
    """The seed's job with some fields replaced (requirements merged, not replaced)."""
    body = json.loads(json.dumps(SEED_JOB))
    body["requirements"] |= changes.pop("requirements", {})
    body |= changes
    return body


def submit(client: httpx.Client, body: dict[str, Any] | None = None, **headers: str) -> str:
    answer = client.post("/v1/jobs", json=body or SEED_JOB, headers=headers)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["job_id"])


def assert_error(answer: httpx.Response, status: int, *mentions: str) -> dict[str, Any]:
    """The standard JSON error body with the given status, its message naming `mentions`."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()["error"]
    assert error["status"] == status
    assert isinstance(error["message"], str)
    assert error["message"]
    for word in mentions:
        assert word.lower() in error["message"].lower(), error["message"]
    return dict(error)


def list_total(client: httpx.Client) -> int:
    answer = client.get("/v1/jobs", params={"limit": 100})
    assert answer.status_code == 200, answer.text
    return int(answer.json()["total"])


def events_of(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    answer = client.get(f"/v1/jobs/{job_id}/events")
    assert answer.status_code == 200, answer.text
    assert answer.json()["job_id"] == job_id
    return list(answer.json()["events"])


@pytest.fixture
def client(served: Served) -> httpx.Client:
    """A brand-new client key, so counts and lists start empty."""
    return served.client(served.new_key("client"))


# --- submit and status -------------------------------------------------------------------


def test_submit_answers_id_and_estimates_and_status_shows_every_field(
    client: httpx.Client,
) -> None:
    answer = client.post("/v1/jobs", json=SEED_JOB)
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert set(created) >= {"job_id", "estimated_cost", "estimated_time_seconds"}
    assert JOB_ID.fullmatch(created["job_id"]), created["job_id"]
    assert created["estimated_cost"] == 0.05
    assert created["estimated_time_seconds"] == 600

    status = client.get(f"/v1/jobs/{created['job_id']}")
    assert status.status_code == 200, status.text
    job = status.json()
    assert set(job) >= SEED_STATUS_FIELDS | EXTRA_STATUS_FIELDS
    assert job["job_id"] == created["job_id"]
    assert job["status"] == "pending"
    assert job["progress"] == 0
    assert job["miner_id"] is None
    assert job["started_at"] is None
    assert job["completed_at"] is None
    assert job["result"] is None
    assert job["model"] == "gpt2"
    assert job["priority"] == "normal"
    assert job["attempt"] == 1
    assert Decimal(str(job["estimated_cost"])) == Decimal("0.05")
    assert job["cost"] is None
    assert job["error"] is None
    assert RFC3339_UTC.fullmatch(job["created_at"]), job["created_at"]


def test_two_submissions_of_the_same_body_are_two_jobs(client: httpx.Client) -> None:
    first, second = submit(client), submit(client)
    assert first != second
    assert list_total(client) == 2


def test_read_your_writes_holds_under_200_concurrent_submissions(served: Served) -> None:
    """Every 201 is readable at once by id; one in ten is also checked in the list at once."""
    key, sampled_key = served.new_key("client"), served.new_key("client")
    local = threading.local()

    def clients() -> tuple[httpx.Client, httpx.Client]:
        if not hasattr(local, "pair"):
            local.pair = (served.client(key), served.client(sampled_key))
        return local.pair  # type: ignore[no-any-return]

    def one(index: int) -> tuple[str, list[str]]:
        bulk, sampled = clients()
        # The sampled client owns few jobs, so its first page always holds them all.
        use = sampled if index % 10 == 0 else bulk
        body = job_body(
            input=f"job {index}", priority=["low", "normal", "high", "urgent"][index % 4]
        )
        answer = use.post("/v1/jobs", json=body)
        problems: list[str] = []
        if answer.status_code != 201:
            return "", [f"submit {index}: {answer.status_code} {answer.text}"]
        job_id = answer.json()["job_id"]
        status = use.get(f"/v1/jobs/{job_id}")
        if status.status_code != 200 or status.json()["job_id"] != job_id:
            problems.append(f"GET {job_id}: {status.status_code} {status.text}")
        if use is sampled:
            listed = sampled.get("/v1/jobs", params={"limit": 100})
            if job_id not in {job["job_id"] for job in listed.json()["jobs"]}:
                problems.append(f"{job_id} missing from the list right after its 201")
        return job_id, problems

    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(one, range(200)))

    problems = [problem for _, found in outcomes for problem in found]
    assert not problems, problems[:5]
    job_ids = [job_id for job_id, _ in outcomes]
    assert len(set(job_ids)) == 200
    assert list_total(served.client(key)) == 180
    assert list_total(served.client(sampled_key)) == 20


# --- Idempotency-Key -----------------------------------------------------------------------


def test_a_retried_submission_with_the_same_key_returns_the_same_job(
    client: httpx.Client,
) -> None:
    key = "retry-" + secrets.token_hex(8)
    first = client.post("/v1/jobs", json=SEED_JOB, headers={"Idempotency-Key": key})
    second = client.post("/v1/jobs", json=SEED_JOB, headers={"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    assert second.status_code == 201, second.text
    assert first.headers.get("Idempotent-Replayed") is None
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert second.json() == first.json()
    job_id = first.json()["job_id"]
    assert [event["type"] for event in events_of(client, job_id)] == ["JobSubmitted"]
    assert list_total(client) == 1


def test_twenty_racing_requests_with_one_key_make_one_job(served: Served) -> None:
    key = served.new_key("client")
    before = list_total(served.client(key))
    idempotency_key = "race-" + secrets.token_hex(8)
    clients = [served.client(key) for _ in range(20)]
    start = threading.Barrier(20)

    def post(http: httpx.Client) -> httpx.Response:
        start.wait()
        return http.post("/v1/jobs", json=SEED_JOB, headers={"Idempotency-Key": idempotency_key})

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(post, clients))

    assert all(answer.is_success for answer in answers), [a.text for a in answers]
    job_ids = {answer.json()["job_id"] for answer in answers}
    assert len(job_ids) == 1
    replayed = [a.headers.get("Idempotent-Replayed") == "true" for a in answers]
    assert replayed.count(False) == 1  # exactly one request created the job
    (job_id,) = job_ids
    assert list_total(clients[0]) == before + 1
    assert [event["type"] for event in events_of(clients[0], job_id)] == ["JobSubmitted"]


def test_the_same_key_with_a_different_body_is_a_conflict(client: httpx.Client) -> None:
    key = "conflict-" + secrets.token_hex(8)
    job_id = submit(client, SEED_JOB, **{"Idempotency-Key": key})
    other = client.post(
        "/v1/jobs", json=job_body(priority="urgent"), headers={"Idempotency-Key": key}
    )
    assert_error(other, 409, "Idempotency-Key")
    assert list_total(client) == 1
    assert client.get(f"/v1/jobs/{job_id}").json()["priority"] == "normal"


def test_idempotency_keys_belong_to_one_client(served: Served) -> None:
    alice = served.client(served.new_key("client"))
    bob = served.client(served.new_key("client"))
    key = "shared-" + secrets.token_hex(8)
    alices = submit(alice, **{"Idempotency-Key": key})
    bobs = bob.post("/v1/jobs", json=SEED_JOB, headers={"Idempotency-Key": key})
    assert bobs.status_code == 201, bobs.text
    assert bobs.headers.get("Idempotent-Replayed") is None
    bobs_id = bobs.json()["job_id"]
    assert bobs_id != alices
    assert bob.get(f"/v1/jobs/{bobs_id}").status_code == 200
    assert_error(bob.get(f"/v1/jobs/{alices}"), 404)
    assert list_total(alice) == 1
    assert list_total(bob) == 1


# --- cancel, download, events --------------------------------------------------------------


def test_cancel_a_pending_job_then_cancel_again(client: httpx.Client) -> None:
    job_id = submit(client)
    canceled = client.delete(f"/v1/jobs/{job_id}")
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled"

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "canceled"
    assert job["completed_at"] is not None
    assert RFC3339_UTC.fullmatch(job["completed_at"]), job["completed_at"]
    assert job["completed_at"] >= job["created_at"]

    again = client.delete(f"/v1/jobs/{job_id}")
    assert_error(again, 409, "canceled")

    events = events_of(client, job_id)
    assert [(e["sequence"], e["type"]) for e in events] == [
        (1, "JobSubmitted"),
        (2, "JobCanceled"),
    ]
    for event in events:
        assert RFC3339_UTC.fullmatch(event["timestamp"]), event["timestamp"]
    assert events[0]["timestamp"] <= events[1]["timestamp"]
    # The refused second cancel recorded nothing.
    assert len(events) == 2


def test_download_of_a_job_without_a_result_is_a_conflict(client: httpx.Client) -> None:
    job_id = submit(client)
    assert_error(client.get(f"/v1/jobs/{job_id}/download"), 409)


def test_events_list_the_submission_with_its_data(client: httpx.Client) -> None:
    body = job_body(priority="high", requirements={"gpu_type": "a100", "gpu_count": 2})
    answer = client.post("/v1/jobs", json=body)
    assert answer.status_code == 201, answer.text
    job_id = answer.json()["job_id"]
    events = json.loads(client.get(f"/v1/jobs/{job_id}/events").text, parse_float=Decimal)["events"]
    assert [event["sequence"] for event in events] == [1]
    (submitted,) = events
    assert submitted["type"] == "JobSubmitted"
    assert RFC3339_UTC.fullmatch(submitted["timestamp"])
    assert submitted["data"]["model"] == "gpt2"
    assert submitted["data"]["priority"] == "high"
    # a100 (0.10/GPU-hour) x 2 GPUs x 1 h x high (1.5)
    assert submitted["data"]["estimated_cost"] == Decimal("0.3")


def test_history_is_a_route_not_a_job_id(client: httpx.Client) -> None:
    answer = client.get("/v1/jobs/history")
    assert answer.status_code != 404, answer.text
    error = assert_error(answer, answer.status_code, "history")
    assert "not found" not in error["message"].lower()
    window = {"from": "2026-01-01", "to": "2026-01-31"}
    assert client.get("/v1/jobs/history", params=window).json()["jobs"] == []


@pytest.mark.parametrize(
    ("params", "missing"),
    [({}, ("from", "to")), ({"from": "2026-01-01"}, ("to",)), ({"to": "2026-01-31"}, ("from",))],
)
def test_history_without_its_window_is_a_validation_error(
    client: httpx.Client, params: dict[str, str], missing: tuple[str, ...]
) -> None:
    error = assert_error(client.get("/v1/jobs/history", params=params), 422, *missing)
    assert "not found" not in error["message"].lower()


@pytest.mark.parametrize(
    "job_id",
    [
        "job_" + "0" * 32,
        "job_" + secrets.token_hex(16),
        "nonsense",
        "JOB_" + secrets.token_hex(16).upper(),
        "job_" + secrets.token_hex(15),
    ],
)
@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", ""), ("DELETE", ""), ("GET", "/events"), ("GET", "/download")],
)
def test_unknown_job_ids_are_not_found(
    served: Served, job_id: str, method: str, suffix: str
) -> None:
    client = served.client(served.new_key("client"))
    assert_error(client.request(method, f"/v1/jobs/{job_id}{suffix}"), 404, "not found")


def test_another_clients_job_is_not_found_for_every_route(served: Served) -> None:
    owner = served.client(served.new_key("client"))
    stranger = served.client(served.new_key("client"))
    job_id = submit(owner)
    for method, suffix in [("GET", ""), ("GET", "/events"), ("GET", "/download")]:
        assert_error(stranger.request(method, f"/v1/jobs/{job_id}{suffix}"), 404)
    assert_error(stranger.delete(f"/v1/jobs/{job_id}"), 404)
    assert owner.get(f"/v1/jobs/{job_id}").json()["status"] == "pending"


# --- pricing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "cost", "seconds"),
    [
        ({"priority": "low"}, "0.04", 600),
        ({"priority": "normal"}, "0.05", 600),
        ({"priority": "high"}, "0.075", 600),
        ({"priority": "urgent"}, "0.1", 600),
        ({"requirements": {"gpu_type": "a100", "gpu_count": 2}}, "0.2", 600),
        ({"timeout_seconds": 60}, "0.05", 60),
        ({"requirements": {"gpu_type": "NVIDIA V100"}}, "0.05", 600),
    ],
)
def test_prices_through_the_api(
    client: httpx.Client, changes: dict[str, Any], cost: str, seconds: int
) -> None:
    answer = client.post("/v1/jobs", json=job_body(**changes))
    assert answer.status_code == 201, answer.text
    created = json.loads(answer.text, parse_float=Decimal)
    assert created["estimated_cost"] == Decimal(cost)
    assert created["estimated_time_seconds"] == seconds
    job = json.loads(client.get(f"/v1/jobs/{created['job_id']}").text, parse_float=Decimal)
    assert job["estimated_cost"] == Decimal(cost)


# --- OpenAPI -------------------------------------------------------------------------------

ROUTES: dict[tuple[str, str], set[int]] = {
    ("post", "/v1/jobs"): {401, 409, 422, 429},
    ("get", "/v1/jobs"): {401, 422, 429},
    ("get", "/v1/jobs/{job_id}"): {401, 404, 429},
    ("delete", "/v1/jobs/{job_id}"): {401, 404, 409, 429},
    ("get", "/v1/jobs/{job_id}/download"): {401, 404, 409, 410, 416, 429, 503},
    ("post", "/v1/files"): {400, 401, 403, 413, 422, 429, 503},
    ("get", "/v1/files/{file_id}"): {401, 403, 404, 429},
    ("get", "/v1/files/{file_id}/content"): {401, 403, 404, 410, 416, 429},
    ("delete", "/v1/files/{file_id}"): {401, 403, 404, 409, 429},
    ("get", "/v1/jobs/{job_id}/attempts/{attempt}/input"): {401, 403, 404, 410, 416, 429},
    ("put", "/v1/jobs/{job_id}/attempts/{attempt}/result"): {400, 401, 403, 404, 413, 422, 503},
    ("get", "/v1/jobs/history"): {401, 422, 429},
    ("get", "/v1/jobs/{job_id}/events"): {401, 404, 429},
    ("post", "/v1/admin/keys"): {401, 422, 429},
    ("post", "/v1/miners"): {401, 403, 422, 429},
    ("get", "/v1/miners"): {401, 403, 429},
    ("get", "/v1/miners/me"): {401, 403, 404, 429},
    ("get", "/v1/miners/{miner_id}"): {401, 403, 404, 429},
    ("put", "/v1/miners/{miner_id}"): {401, 403, 404, 409, 422, 429},
    ("delete", "/v1/miners/{miner_id}"): {401, 403, 404, 409, 429},
    ("get", "/v1/miners/{miner_id}/stats"): {401, 403, 404, 429},
    ("get", "/healthz"): set(),
}


@pytest.fixture(scope="module")
def openapi(served: Served) -> dict[str, Any]:
    answer = httpx.get(served.url + "/schema/openapi.json", timeout=30)  # no key
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """The schema a reference (or a one-element allOf around one) points to."""
    while "$ref" in schema or len(schema.get("allOf", [])) == 1:
        if "allOf" in schema:
            schema = schema["allOf"][0]
            continue
        name = schema["$ref"].removeprefix("#/components/schemas/")
        schema = document["components"]["schemas"][name]
    return schema


def test_openapi_describes_every_route_with_its_error_answers(openapi: dict[str, Any]) -> None:
    paths = openapi["paths"]
    for (method, path), codes in ROUTES.items():
        assert path in paths, f"{path} missing from {sorted(paths)}"
        assert method in paths[path], f"{method.upper()} {path} undocumented"
        responses = paths[path][method]["responses"]
        for code in codes:
            assert str(code) in responses, f"{method.upper()} {path} does not document {code}"
            schema = resolve(openapi, responses[str(code)]["content"]["application/json"]["schema"])
            error = resolve(openapi, schema["properties"]["error"])
            assert {"status", "message", "details"} <= set(error["properties"])
            assert {"status", "message"} <= set(error.get("required", []))


def test_openapi_documents_streamed_upload_bodies(openapi: dict[str, Any]) -> None:
    upload = openapi["paths"]["/v1/files"]["post"]["requestBody"]["content"]
    assert upload["application/octet-stream"]["schema"]["format"] == "binary"
    assert "file" in upload["multipart/form-data"]["schema"]["properties"]
    result = openapi["paths"]["/v1/jobs/{job_id}/attempts/{attempt}/result"]["put"]
    assert "application/octet-stream" in result["requestBody"]["content"]
    submit = resolve(openapi, openapi["components"]["schemas"]["SubmitJobRequest"])
    kinds = submit["properties"]["input"]["oneOf"]
    assert {"type": "string"} in kinds and any("$ref" in kind for kind in kinds)


def test_openapi_documents_the_submit_body_with_the_seed_example(
    openapi: dict[str, Any], client: httpx.Client
) -> None:
    operation = openapi["paths"]["/v1/jobs"]["post"]
    assert "201" in operation["responses"]
    content = operation["requestBody"]["content"]["application/json"]
    schema = resolve(openapi, content["schema"])
    assert {"model", "input", "requirements"} <= set(schema.get("required", []))
    assert {"output_config", "priority", "timeout_seconds"} <= set(schema["properties"])
    requirements = resolve(openapi, schema["properties"]["requirements"])
    assert {"gpu_type", "gpu_count", "min_vram_gb"} <= set(requirements["properties"])
    examples = [
        *(example["value"] for example in content.get("examples", {}).values()),
        *content["schema"].get("examples", []),
        *schema.get("examples", []),
    ]
    assert examples, "the submit body has no example"
    # The seed's "input" is a placeholder ("string or file_id"); every other field is the seed's.
    seed_without_input = {k: v for k, v in SEED_JOB.items() if k != "input"}
    matching = [
        example
        for example in examples
        if {k: v for k, v in example.items() if k != "input"} == seed_without_input
    ]
    assert matching, examples
    # The documented example is a body the API actually accepts.
    assert client.post("/v1/jobs", json=matching[0]).status_code == 201
