"""Who may do what: every route against every kind of caller, cell by cell.

A client sees only its own jobs, and another client's job is indistinguishable
from a job that does not exist. Auditors read everything and write nothing;
miners have no business on the client or admin routes; admins read and cancel
any job and manage keys but submit nothing. Without a working key: 401.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from tests.e2e.conftest import SEED_JOB, Served

OWNER, OTHER, MINER, AUDITOR, ADMIN = "client-a", "client-b", "miner", "auditor", "admin"
NO_KEY, REVOKED = "no-key", "revoked-key"
MALFORMED = {"malformed-jl_x": "jl_x", "malformed-garbage": "garbage", "malformed-600": "k" * 600}
UNAUTHENTICATED = (NO_KEY, REVOKED, *MALFORMED)
CALLERS = (OWNER, OTHER, MINER, AUDITOR, ADMIN, *UNAUTHENTICATED)


def assert_error(answer: httpx.Response, status: int) -> dict[str, Any]:
    """The answer is `status` with exactly the documented error body."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"status", "message", "details"}, body
    assert body["error"]["status"] == status
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body["error"])


@dataclass
class World:
    """One served API with a key per caller, A's job and B's job."""

    served: Served
    keys: dict[str, str | None]
    job_a: str
    job_b: str

    def client(self, caller: str) -> httpx.Client:
        return self.served.client(self.keys[caller])

    def submit(self, caller: str) -> str:
        answer = self.client(caller).post("/v1/jobs", json=SEED_JOB)
        assert answer.status_code == 201, answer.text
        return str(answer.json()["job_id"])

    def create_key(self, role: str) -> dict[str, str]:
        answer = self.client(ADMIN).post("/v1/admin/keys", json={"role": role, "name": "t"})
        assert answer.status_code == 201, answer.text
        return dict(answer.json())


@pytest.fixture(scope="module")
def world(served: Served) -> World:
    keys: dict[str, str | None] = {
        OWNER: served.new_key("client", "alice"),
        OTHER: served.new_key("client", "bob"),
        MINER: served.new_key("miner"),
        AUDITOR: served.new_key("auditor"),
        ADMIN: served.new_key("admin"),
        NO_KEY: None,
        **MALFORMED,
    }
    revoked = _create_key(served, "client")
    assert _revoke(served, revoked["key_id"]).status_code == 204
    keys[REVOKED] = revoked["key"]
    world = World(served=served, keys=keys, job_a="", job_b="")
    world.job_a = world.submit(OWNER)
    world.job_b = world.submit(OTHER)
    return world


def _create_key(served: Served, role: str) -> dict[str, str]:
    answer = served.client(served.admin_key).post(
        "/v1/admin/keys", json={"role": role, "name": f"{role}-{secrets.token_hex(3)}"}
    )
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def _revoke(served: Served, key_id: str) -> httpx.Response:
    return served.client(served.admin_key).delete(f"/v1/admin/keys/{key_id}")


def history_window() -> str:
    today = datetime.now(UTC).date()
    return f"from={today - timedelta(days=1)}&to={today + timedelta(days=1)}"


# route name -> (method, path template). {job} is A's job (a fresh one for DELETE),
# {key_id} a fresh key made for the cell.
ROUTES: dict[str, tuple[str, str]] = {
    "submit": ("POST", "/v1/jobs"),
    "list": ("GET", "/v1/jobs"),
    "status": ("GET", "/v1/jobs/{job}"),
    "cancel": ("DELETE", "/v1/jobs/{job}"),
    "download": ("GET", "/v1/jobs/{job}/download"),
    "history": ("GET", "/v1/jobs/history?{window}"),
    "events": ("GET", "/v1/jobs/{job}/events"),
    "create-key": ("POST", "/v1/admin/keys"),
    "revoke-key": ("DELETE", "/v1/admin/keys/{key_id}"),
}

# The spec, one row per route: what each authenticated caller gets.
MATRIX: dict[str, dict[str, int]] = {
    "submit": {OWNER: 201, OTHER: 201, MINER: 403, AUDITOR: 403, ADMIN: 403},
    "list": {OWNER: 200, OTHER: 200, MINER: 403, AUDITOR: 200, ADMIN: 200},
    "status": {OWNER: 200, OTHER: 404, MINER: 403, AUDITOR: 200, ADMIN: 200},
    "cancel": {OWNER: 200, OTHER: 404, MINER: 403, AUDITOR: 403, ADMIN: 200},
    "download": {OWNER: 409, OTHER: 404, MINER: 403, AUDITOR: 409, ADMIN: 409},
    "history": {OWNER: 200, OTHER: 200, MINER: 403, AUDITOR: 200, ADMIN: 200},
    "events": {OWNER: 200, OTHER: 404, MINER: 403, AUDITOR: 200, ADMIN: 200},
    "create-key": {OWNER: 403, OTHER: 403, MINER: 403, AUDITOR: 403, ADMIN: 201},
    "revoke-key": {OWNER: 403, OTHER: 403, MINER: 403, AUDITOR: 403, ADMIN: 204},
}
CELLS = [
    pytest.param(route, caller, MATRIX[route].get(caller, 401), id=f"{route}-{caller}")
    for route in ROUTES
    for caller in CALLERS
]


def job_ids(answer: httpx.Response) -> set[str]:
    return {job["job_id"] for job in answer.json()["jobs"]}


@pytest.mark.parametrize(("route", "caller", "expected"), CELLS)
def test_authorization_matrix(world: World, route: str, caller: str, expected: int) -> None:
    method, template = ROUTES[route]
    job = world.submit(OWNER) if route == "cancel" else world.job_a
    target_key = world.create_key("client") if route == "revoke-key" else None
    path = template.format(
        job=job, window=history_window(), key_id=target_key["key_id"] if target_key else ""
    )
    body: Any = None
    if route == "submit":
        body = SEED_JOB
    elif route == "create-key":
        body = {"role": "client", "name": f"made-by-{caller}"}
    auditor = world.client(AUDITOR)
    jobs_before = auditor.get("/v1/jobs").json()["total"] if route == "submit" else None

    answer = world.client(caller).request(method, path, json=body)

    if expected >= 400:
        assert_error(answer, expected)
    else:
        assert answer.status_code == expected, answer.text
    # What the caller may or may not see, and that a refusal changed nothing.
    match route, expected:
        case "submit", 201:
            assert world.client(caller).get(f"/v1/jobs/{answer.json()['job_id']}").is_success
        case "submit", _:
            assert auditor.get("/v1/jobs").json()["total"] == jobs_before
        case "list" | "history", 200:
            seen = job_ids(answer)
            own = {OWNER: world.job_a, OTHER: world.job_b}.get(caller)
            if caller == OTHER:
                assert world.job_a not in seen
                assert world.job_b in seen
            elif caller == OWNER:
                assert world.job_b not in seen
                assert world.job_a in seen
            else:
                assert {world.job_a, world.job_b} <= seen
            assert own is None or own in seen
        case "status" | "events", 200:
            assert answer.json()["job_id"] == job
        case "cancel", 200:
            assert answer.json()["status"] == "canceled"
            assert world.client(OWNER).get(f"/v1/jobs/{job}").json()["status"] == "canceled"
        case "cancel", _:
            assert world.client(OWNER).get(f"/v1/jobs/{job}").json()["status"] == "pending"
        case "create-key", 201:
            created = answer.json()
            assert created["role"] == "client"
            assert world.served.client(created["key"]).get("/v1/jobs").status_code == 200
        case "revoke-key", 204:
            assert target_key is not None
            assert world.served.client(target_key["key"]).get("/v1/jobs").status_code == 401
        case "revoke-key", _:
            assert target_key is not None
            assert world.served.client(target_key["key"]).get("/v1/jobs").status_code == 200


@pytest.mark.parametrize("route", ["status", "cancel", "download", "events"])
def test_another_clients_job_looks_exactly_like_a_missing_one(world: World, route: str) -> None:
    """B learns nothing from A's job id: the 404 reads as for an id that never existed."""
    method, template = ROUTES[route]
    missing = "job_" + uuid.uuid4().hex
    bob = world.client(OTHER)
    theirs = assert_error(bob.request(method, template.format(job=world.job_a)), 404)
    absent = assert_error(bob.request(method, template.format(job=missing)), 404)
    assert str(theirs).replace(world.job_a, missing) == str(absent)


def test_a_key_works_as_x_api_key_and_as_bearer(world: World) -> None:
    key = world.keys[OWNER]
    assert key is not None
    url = world.served.url
    for headers in (
        {"X-Api-Key": key},
        {"Authorization": f"Bearer {key}"},
        {"Authorization": f"bearer {key}"},
    ):
        answer = httpx.get(f"{url}/v1/jobs/{world.job_a}", headers=headers, timeout=30)
        assert answer.status_code == 200, (headers, answer.text)
        assert answer.json()["job_id"] == world.job_a
    submitted = httpx.post(
        f"{url}/v1/jobs", json=SEED_JOB, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert submitted.status_code == 201, submitted.text


WRONG_PRESENTATIONS: dict[str, Callable[[str], dict[str, str]]] = {
    "basic-scheme": lambda key: {"Authorization": f"Basic {key}"},
    "no-scheme": lambda key: {"Authorization": key},
    "bearer-without-key": lambda key: {"Authorization": "Bearer"},
    "bearer-then-key-of-other-scheme": lambda key: {"Authorization": f"Token {key}"},
    "empty-x-api-key": lambda key: {"X-Api-Key": ""},
    "key-with-extra-char": lambda key: {"X-Api-Key": key + "x"},
    "truncated-key": lambda key: {"X-Api-Key": key[:-1]},
    "other-secret-same-id": lambda key: {"X-Api-Key": key[: len("jl_123456789abc_")] + "A" * 43},
    "wrong-header-name": lambda key: {"Api-Key": key},
}


@pytest.mark.parametrize("presentation", WRONG_PRESENTATIONS)
def test_keys_presented_wrongly_are_401(world: World, presentation: str) -> None:
    key = world.keys[OWNER]
    assert key is not None
    headers = WRONG_PRESENTATIONS[presentation](key)
    answer = httpx.get(f"{world.served.url}/v1/jobs", headers=headers, timeout=30)
    assert_error(answer, 401)


def test_a_revoked_key_stops_working_at_once(world: World) -> None:
    created = world.create_key("client")
    client = world.served.client(created["key"])
    job = client.post("/v1/jobs", json=SEED_JOB)
    assert job.status_code == 201
    assert client.get("/v1/jobs").status_code == 200

    revoked = world.client(ADMIN).delete(f"/v1/admin/keys/{created['key_id']}")
    assert revoked.status_code == 204, revoked.text

    assert_error(client.get("/v1/jobs"), 401)
    assert_error(client.get(f"/v1/jobs/{job.json()['job_id']}"), 401)
    bearer = {"Authorization": f"Bearer {created['key']}"}
    assert_error(httpx.get(f"{world.served.url}/v1/jobs", headers=bearer, timeout=30), 401)
    # The job it made is still there for those allowed to read it.
    assert world.client(AUDITOR).get(f"/v1/jobs/{job.json()['job_id']}").status_code == 200


@pytest.mark.parametrize("which", ["unknown", "already-revoked"])
def test_revoking_a_key_that_is_not_live_is_404(world: World, which: str) -> None:
    key_id = "000000000000"
    if which == "already-revoked":
        key_id = world.create_key("client")["key_id"]
        assert world.client(ADMIN).delete(f"/v1/admin/keys/{key_id}").status_code == 204
    assert_error(world.client(ADMIN).delete(f"/v1/admin/keys/{key_id}"), 404)


def test_a_new_key_is_shown_once_and_stored_only_as_a_hash(world: World) -> None:
    created = world.create_key("auditor")
    assert set(created) == {"key_id", "key", "role", "name"}
    assert created["role"] == "auditor"
    plaintext = created["key"]
    prefix, key_id, secret = plaintext.split("_", 2)
    assert (prefix, key_id) == ("jl", created["key_id"])
    assert len(secret) >= 32
    with psycopg.connect(world.served.database_url) as conn:
        rows = conn.execute("SELECT * FROM jobledger_api_keys").fetchall()
        row = conn.execute(
            "SELECT * FROM jobledger_api_keys WHERE key_id = %s", (created["key_id"],)
        ).fetchone()
    assert row is not None, "the key's row is where the test looks"
    dumped = repr(rows).encode() + b"".join(
        bytes(value) for row_ in rows for value in row_ if isinstance(value, bytes | memoryview)
    )
    for revealing in (plaintext, secret, secret[:16]):
        assert revealing.encode() not in dumped
    # Works, though nothing readable was stored.
    assert world.served.client(plaintext).get("/v1/jobs").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"role": "root", "name": "x"},
        {"role": "client"},
        {"role": "client", "name": ""},
        {"role": "client", "name": "x" * 101},
        {"role": "client", "name": "x", "subject": "someone-else"},
    ],
    ids=["unknown-role", "no-name", "empty-name", "long-name", "subject-not-settable"],
)
def test_bad_key_requests_are_422(world: World, body: dict[str, str]) -> None:
    assert_error(world.client(ADMIN).post("/v1/admin/keys", json=body), 422)


def test_the_bootstrap_admin_key_is_an_admin(world: World) -> None:
    admin = world.served.client(world.served.admin_key)
    assert admin.get(f"/v1/jobs/{world.job_a}").status_code == 200
    assert_error(admin.post("/v1/jobs", json=SEED_JOB), 403)
