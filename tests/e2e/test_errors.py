"""Bad input gets a 4xx with the JSON error body, naming what is wrong; never a 500."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import SEED_JOB, Served

ONE_MIB = 1024 * 1024
JSON = {"content-type": "application/json"}


def assert_error(answer: httpx.Response, status: int) -> dict[str, Any]:
    """The answer is `status` with exactly the documented error body; returns its `error`."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    body = answer.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"status", "message", "details"}, error
    assert error["status"] == status
    assert isinstance(error["message"], str) and error["message"], error
    return dict(error)


def assert_client_error(answer: httpx.Response) -> dict[str, Any]:
    """Some 4xx (not a 5xx) with the documented error body."""
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)
    return assert_error(answer, answer.status_code)


def fields_named(error: dict[str, Any]) -> list[str]:
    """The field paths a 422 reports, from either detail shape the API uses."""
    details = error["details"] or {}
    if "errors" in details:
        return [item["field"] for item in details["errors"]]
    return [details["field"]] if "field" in details else []


def job(**changes: Any) -> dict[str, Any]:
    """SEED_JOB with top-level changes; nested dicts are merged into the seed's."""
    body = copy.deepcopy(SEED_JOB)
    for name, value in changes.items():
        if isinstance(value, dict) and isinstance(body.get(name), dict):
            body[name] = {**body[name], **value}
        else:
            body[name] = value
    return body


def without(*names: str) -> dict[str, Any]:
    body = copy.deepcopy(SEED_JOB)
    for name in names:
        del body[name]
    return body


@pytest.fixture(scope="module")
def client(served: Served) -> httpx.Client:
    return served.client(served.new_key("client"))


def test_the_seed_job_itself_is_accepted(client: httpx.Client) -> None:
    """The baseline every mutation below departs from."""
    assert client.post("/v1/jobs", json=SEED_JOB).status_code == 201


@pytest.mark.parametrize(
    "raw",
    [b'{"model":', b"{'model': 'gpt2'}", b'{"model": "gpt2",}', b"not json", b"{}}"],
    ids=["truncated", "single-quotes", "trailing-comma", "bare-words", "extra-brace"],
)
def test_malformed_json_is_400(client: httpx.Client, raw: bytes) -> None:
    assert_error(client.post("/v1/jobs", content=raw, headers=JSON), 400)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (job(requirements={"gpu_count": "two"}), "requirements.gpu_count"),
        (job(requirements={"gpu_count": 1.5}), "requirements.gpu_count"),
        (job(requirements={"gpu_count": True}), "requirements.gpu_count"),
        (job(requirements={"min_vram_gb": "16GB"}), "requirements.min_vram_gb"),
        (job(requirements="v100"), "requirements"),
        (job(timeout_seconds="an hour"), "timeout_seconds"),
        (job(timeout_seconds=[3600]), "timeout_seconds"),
        (job(model=42), "model"),
        (job(input=["a", "b"]), "input"),
        (job(output_config="local"), "output_config"),
        (job(output_config={"format": 3}), "output_config.format"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_wrong_types_are_422_naming_the_field_path(
    client: httpx.Client, body: dict[str, Any], field: str
) -> None:
    error = assert_error(client.post("/v1/jobs", json=body), 422)
    assert fields_named(error) == [field], error
    assert field in error["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (job(timeout_seconds="3600"), "timeout_seconds"),
        (job(requirements={"gpu_count": "2"}), "requirements.gpu_count"),
    ],
    ids=["timeout-as-string", "gpu_count-as-string"],
)
def test_numbers_sent_as_strings_are_422(
    client: httpx.Client, body: dict[str, Any], field: str
) -> None:
    error = assert_error(client.post("/v1/jobs", json=body), 422)
    assert fields_named(error) == [field], error


@pytest.mark.parametrize(
    ("body", "unknown"),
    [
        (job(status="completed"), "status"),
        (job(miner_id="miner-1"), "miner_id"),
        (job(owner="someone-else"), "owner"),
        (job(cost=0), "cost"),
        (job(requirements={"gpus": 2}), "gpus"),
        (job(output_config={"compression": "gzip"}), "compression"),
    ],
    ids=["status", "miner_id", "owner", "cost", "requirements.gpus", "output_config.compression"],
)
def test_unknown_fields_are_refused_not_ignored(
    client: httpx.Client, body: dict[str, Any], unknown: str
) -> None:
    error = assert_error(client.post("/v1/jobs", json=body), 422)
    assert f"`{unknown}`" in error["message"], error


@pytest.mark.parametrize("missing", ["model", "input", "requirements"])
def test_missing_required_fields_are_422_naming_them(client: httpx.Client, missing: str) -> None:
    error = assert_error(client.post("/v1/jobs", json=without(missing)), 422)
    assert f"`{missing}`" in error["message"], error


def test_a_missing_gpu_type_is_422(client: httpx.Client) -> None:
    body = job(requirements={"gpu_count": 1})
    body["requirements"] = {"gpu_count": 1}
    error = assert_error(client.post("/v1/jobs", json=body), 422)
    assert "gpu_type" in error["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (job(timeout_seconds=0), "timeout_seconds"),
        (job(timeout_seconds=-1), "timeout_seconds"),
        (job(timeout_seconds=604801), "timeout_seconds"),
        (job(requirements={"gpu_count": 0}), "requirements.gpu_count"),
        (job(requirements={"gpu_count": 65}), "requirements.gpu_count"),
        (job(requirements={"min_vram_gb": -1}), "requirements.min_vram_gb"),
        (job(priority="asap"), "priority"),
        (job(output_config={"format": "xml"}), "output_config.format"),
        (job(model=""), "model"),
        (job(model="m" * 201), "model"),
    ],
    ids=[
        "timeout-0",
        "timeout-negative",
        "timeout-over-a-week",
        "gpu_count-0",
        "gpu_count-65",
        "min_vram-negative",
        "priority-asap",
        "format-xml",
        "model-empty",
        "model-too-long",
    ],
)
def test_out_of_range_values_are_422_naming_the_field(
    client: httpx.Client, body: dict[str, Any], field: str
) -> None:
    error = assert_error(client.post("/v1/jobs", json=body), 422)
    assert fields_named(error) == [field], error
    assert field in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        job(timeout_seconds=1),
        job(timeout_seconds=604800),
        job(requirements={"gpu_count": 64}),
        job(requirements={"min_vram_gb": 0}),
        job(priority="urgent"),
        job(output_config={"format": "archive"}),
    ],
    ids=["timeout-1", "timeout-a-week", "gpu_count-64", "min_vram-0", "urgent", "archive"],
)
def test_boundary_values_are_accepted(client: httpx.Client, body: dict[str, Any]) -> None:
    """The limits above are exactly where the schema says, not one off."""
    answer = client.post("/v1/jobs", json=body)
    assert answer.status_code == 201, answer.text


def test_an_unknown_gpu_type_is_422_listing_the_known_ones(client: httpx.Client) -> None:
    error = assert_error(
        client.post("/v1/jobs", json=job(requirements={"gpu_type": "tpu9000"})), 422
    )
    assert "tpu9000" in error["message"]
    for known in ("v100", "a100", "h100"):
        assert known in error["message"], error
    assert fields_named(error) == ["requirements.gpu_type"]


@pytest.mark.parametrize(
    "destination",
    ["ftp://x", "s3://not-allowed-bucket/x", "s3://", "/etc/passwd", "file:///tmp/x", ""],
)
def test_output_destinations_other_than_local_or_allowed_s3_are_422(
    client: httpx.Client, destination: str
) -> None:
    body = job(output_config={"destination": destination})
    error = assert_error(client.post("/v1/jobs", json=body), 422)
    assert fields_named(error) == ["output_config.destination"], error


def test_a_body_over_one_mib_is_413_with_the_error_body(client: httpx.Client) -> None:
    body = json.dumps(job(input="x" * ONE_MIB)).encode()
    assert len(body) > ONE_MIB
    assert_error(client.post("/v1/jobs", content=body, headers=JSON), 413)


def test_a_chunked_body_over_one_mib_is_413_too(client: httpx.Client) -> None:
    """Without a Content-Length the limit still holds while the body streams in."""

    def chunks() -> Any:
        yield b'{"model": "gpt2", "input": "'
        for _ in range(11):
            yield b"x" * 100_000
        yield b'", "requirements": {"gpu_type": "v100"}}'

    assert_error(client.post("/v1/jobs", content=chunks(), headers=JSON), 413)


def test_a_body_just_under_one_mib_is_accepted(client: httpx.Client) -> None:
    overhead = len(json.dumps(job(input="")).encode())
    body = json.dumps(job(input="x" * (ONE_MIB - overhead - 16))).encode()
    assert ONE_MIB - 64 < len(body) < ONE_MIB
    answer = client.post("/v1/jobs", content=body, headers=JSON)
    assert answer.status_code == 201, answer.text[:500]


def test_the_body_limit_follows_the_environment(serve_factory: Callable[..., Served]) -> None:
    small = serve_factory(env={"JOBLEDGER_MAX_JSON_BODY_BYTES": "2048"})
    client = small.client(small.new_key("client"))
    assert client.post("/v1/jobs", json=SEED_JOB).status_code == 201
    body = json.dumps(job(input="x" * 3000)).encode()
    assert 3000 < len(body) < 3300
    assert_error(client.post("/v1/jobs", content=body, headers=JSON), 413)


@pytest.mark.parametrize("raw", [b"[]", b'"x"', b"null", b"42", b"true", b"[{}]"])
def test_json_that_is_not_an_object_is_a_client_error(client: httpx.Client, raw: bytes) -> None:
    assert_client_error(client.post("/v1/jobs", content=raw, headers=JSON))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "gpt2", "input": "s", "requirements": {"gpu_type": "v100"}, '
        b'"timeout_seconds": 1e400}',
        b'{"model": "gpt2", "input": "s", "requirements": {"gpu_type": "v100", '
        b'"gpu_count": 1180591620717411303424}}',
        b'{"model": "gpt2", "input": "s", "requirements": {"gpu_type": "v100", '
        b'"min_vram_gb": -1e400}}',
        b'{"model": "gpt2", "input": "s", "requirements": {"gpu_type": "v100"}, '
        b'"timeout_seconds": ' + b"9" * 5000 + b"}",
    ],
    ids=["1e400", "2**70", "-1e400", "5000-digits"],
)
def test_huge_numbers_are_a_client_error(client: httpx.Client, raw: bytes) -> None:
    assert_client_error(client.post("/v1/jobs", content=raw, headers=JSON))


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\xff\xfe{}", id="bom-ish"),
        pytest.param(b"\x80" * 10, id="lone-continuation"),
        pytest.param(
            b'{"model": "gpt\xc3\x28", "input": "s", "requirements": {"gpu_type": "v100"}}',
            id="invalid-utf8-inside-a-string",
        ),
    ],
)
def test_non_utf8_bytes_are_a_client_error(client: httpx.Client, raw: bytes) -> None:
    assert_client_error(client.post("/v1/jobs", content=raw, headers=JSON))


def test_an_empty_body_is_a_client_error(client: httpx.Client) -> None:
    assert_client_error(client.post("/v1/jobs", content=b"", headers=JSON))


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/v1/jobs"), ("PATCH", "/v1/jobs"), ("DELETE", "/v1/jobs"), ("POST", "/v1/jobs/x")],
)
def test_unsupported_methods_are_405_with_the_error_body(
    client: httpx.Client, method: str, path: str
) -> None:
    assert_error(client.request(method, path, json=SEED_JOB), 405)


def test_an_unknown_route_is_404_with_the_error_body(client: httpx.Client) -> None:
    assert_error(client.get("/v1/nothing-here"), 404)


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("/v1/jobs?limit=0", 422),
        ("/v1/jobs?limit=101", 422),
        ("/v1/jobs?limit=abc", 422),
        ("/v1/jobs?status=bogus", 422),
        ("/v1/jobs?cursor=not-a-cursor", 422),
        ("/v1/jobs/history?from=2026-02-01&to=2026-01-01", 422),
        ("/v1/jobs/history?from=yesterday&to=2026-01-01", 422),
        ("/v1/jobs/history?from=2026-01-01T00:00:00&to=2026-01-02", 422),
        ("/v1/jobs/history?to=2026-01-01", 422),
    ],
)
def test_bad_query_parameters_are_client_errors(
    client: httpx.Client, query: str, status: int
) -> None:
    assert_error(client.get(query), status)


@pytest.mark.parametrize(
    "query",
    [
        "/v1/jobs/history?from=0001-01-01T00:00:00%2B05:00&to=2026-01-01",
        "/v1/jobs/history?from=2026-01-01&to=9999-12-31T23:00:00-05:00",
    ],
    ids=["before-year-1", "after-year-9999"],
)
def test_history_bounds_beyond_the_calendar_are_client_errors(
    client: httpx.Client, query: str
) -> None:
    assert_client_error(client.get(query))


def test_a_nul_character_in_the_model_is_a_client_error(client: httpx.Client) -> None:
    assert_client_error(client.post("/v1/jobs", json=job(model="gpt\u00002")))


def test_a_nul_character_in_a_job_id_is_not_found(client: httpx.Client) -> None:
    assert_error(client.get("/v1/jobs/job_%00"), 404)


GARBAGE: list[Any] = [
    None,
    True,
    0,
    -1,
    2**63,
    1.5,
    "",
    "x" * 300,
    "🚀",
    [],
    [1, "a"],
    {},
    {"nested": {"deeper": [None]}},
    "s3://",
    "local",
]


def mutate(rng: random.Random, body: Any, depth: int = 0) -> Any:
    """One random change somewhere in `body`: drop a key, swap a type, or nest garbage."""
    if not isinstance(body, dict) or not body or depth > 3:
        return rng.choice(GARBAGE)
    body = dict(body)
    name = rng.choice(sorted(body))
    action = rng.randrange(5)
    if action == 0:
        del body[name]
    elif action == 1:
        body[name] = rng.choice(GARBAGE)
    elif action == 2:
        body[name] = mutate(rng, body[name], depth + 1)
    elif action == 3:
        body[rng.choice(["extra", name.upper(), "requirements ", "__proto__"])] = rng.choice(
            GARBAGE
        )
    else:
        body[name] = {"wrapped": body[name]}
    return body


def test_two_hundred_random_mutations_never_answer_5xx(client: httpx.Client) -> None:
    rng = random.Random(0)
    outcomes: dict[int, int] = {}
    failures = []
    for _ in range(200):
        body: Any = SEED_JOB
        for _ in range(rng.randint(1, 3)):
            body = mutate(rng, body)
        answer = client.post("/v1/jobs", json=body)
        outcomes[answer.status_code] = outcomes.get(answer.status_code, 0) + 1
        if answer.status_code >= 500:
            failures.append((body, answer.status_code, answer.text))
        elif answer.status_code != 201:
            assert_client_error(answer)
    assert failures == []
    # The mutations really exercise the validator: most are refused, not all accepted.
    assert sum(n for code, n in outcomes.items() if 400 <= code < 500) > 100, outcomes
