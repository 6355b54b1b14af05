"""The authorization matrix: every route of the API against every kind of caller.

Each cell is one real request with a representative body, and its expected status.
docs/security.md prints the same table; `test_the_documented_table_is_this_one` keeps
the two equal, and `test_every_route_is_in_the_matrix` fails as soon as the app has a
route the matrix does not cover (or the matrix a route the app lost). A request that
could change something changes a resource made for that cell alone, so no cell can
break another; where it succeeds the change must show, where it is refused nothing may.

A cell where the app answers what it should not is marked `xfail(strict=True)` with
the bug (KNOWN_DEVIATIONS), and the table in docs/security.md marks it with a dagger.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from litestar.routes import HTTPRoute

from app.api.server import create_app
from app.config import Settings
from tests.e2e.conftest import SEED_JOB, Served
from tests.e2e.dispatch import register_miner
from tests.e2e.fake_miner import hold

SECURITY_DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"

# The columns, in the order of docs/security.md. M1 is the miner holding the job's
# attempt on job routes and the miner the path names (itself) on miner routes; M2 is
# any other miner. "malformed" is every string in MALFORMED_KEYS, one request each.
PRINCIPALS = ("A", "B", "M1", "M2", "auditor", "admin", "no key", "revoked", "malformed")

# Route -> status per principal, in PRINCIPALS order: the table of docs/security.md.
# fmt: off
MATRIX_ROWS: dict[str, str] = {
    "POST /v1/jobs":                                   "201 201 403 403 403 403 401 401 401",
    "GET /v1/jobs":                                    "200 200 403 403 200 200 401 401 401",
    "GET /v1/jobs/history":                            "200 200 403 403 200 200 401 401 401",
    "GET /v1/jobs/throughput":                         "200 200 403 403 200 200 401 401 401",
    "GET /v1/jobs/{job_id}":                           "200 404 403 403 200 200 401 401 401",
    "DELETE /v1/jobs/{job_id}":                        "202 404 403 403 403 202 401 401 401",
    "GET /v1/jobs/{job_id}/download":                  "409 404 403 403 409 409 401 401 401",
    "GET /v1/jobs/{job_id}/events":                    "200 404 403 403 200 200 401 401 401",
    "GET /v1/jobs/{job_id}/watch":                     "200 404 403 403 200 200 401 401 401",
    "GET /v1/jobs/{job_id}/attempts/{attempt}/input":  "403 403 200 404 403 403 401 401 401",
    "PUT /v1/jobs/{job_id}/attempts/{attempt}/result": "403 403 201 404 403 403 401 401 401",
    "POST /v1/files":                                  "201 201 403 403 403 403 401 401 401",
    "GET /v1/files/{file_id}":                         "200 404 403 403 200 200 401 401 401",
    "GET /v1/files/{file_id}/content":                 "200 404 403 403 200 200 401 401 401",
    "DELETE /v1/files/{file_id}":                      "204 404 403 403 403 204 401 401 401",
    "GET /v1/audit/key":                               "403 403 403 403 200 200 401 401 401",
    "GET /v1/audit/verify":                            "403 403 403 403 200 200 401 401 401",
    "GET /v1/audit/export":                            "403 403 403 403 200 200 401 401 401",
    "POST /v1/miners":                                 "403 403 403 403 403 201 401 401 401",
    "GET /v1/miners":                                  "403 403 403 403 200 200 401 401 401",
    "GET /v1/miners/me":                               "403 403 200 200 403 403 401 401 401",
    "GET /v1/miners/{miner_id}":                       "403 403 200 404 200 200 401 401 401",
    "PUT /v1/miners/{miner_id}":                       "403 403 200 404 403 200 401 401 401",
    "DELETE /v1/miners/{miner_id}":                    "403 403 200 404 403 200 401 401 401",
    "GET /v1/miners/{miner_id}/stats":                 "403 403 200 404 200 200 401 401 401",
    "POST /v1/miners/{miner_id}/keys":                 "403 403 201 404 403 201 401 401 401",
    "GET /v1/miners/{miner_id}/keys":                  "403 403 200 404 200 200 401 401 401",
    "DELETE /v1/miners/{miner_id}/keys/{key_id}":      "403 403 200 404 403 200 401 401 401",
    "POST /v1/admin/keys":                             "403 403 403 403 403 201 401 401 401",
    "DELETE /v1/admin/keys/{key_id}":                  "403 403 403 403 403 204 401 401 401",
    "GET /healthz":                                    "200 200 200 200 200 200 200 200 200",
    "GET /metrics":                                    "200 200 200 200 200 200 200 200 200",
    "GET /schema":                                     "200 200 200 200 200 200 200 200 200",
    "GET /schema/openapi.json":                        "200 200 200 200 200 200 200 200 200",
    "GET /schema/openapi.yaml":                        "200 200 200 200 200 200 200 200 200",
    "GET /schema/openapi.yml":                         "200 200 200 200 200 200 200 200 200",
    "GET /schema/swagger":                             "200 200 200 200 200 200 200 200 200",
    "GET /schema/redoc":                               "200 200 200 200 200 200 200 200 200",
    "GET /schema/rapidoc":                             "200 200 200 200 200 200 200 200 200",
    "GET /schema/elements":                            "200 200 200 200 200 200 200 200 200",
    "GET /schema/oauth2-redirect.html":                "200 200 200 200 200 200 200 200 200",
    "GET /schema/{path}":                              "404 404 404 404 404 404 404 404 404",
    "GET /ui":                                         "200 200 200 200 200 200 200 200 200",
    "GET /ui/{file_path}":                             "200 200 200 200 200 200 200 200 200",
    "HEAD /ui/{file_path}":                            "200 200 200 200 200 200 200 200 200",
}
# fmt: on
MATRIX: dict[str, dict[str, int]] = {
    route: dict(zip(PRINCIPALS, map(int, row.split()), strict=True))
    for route, row in MATRIX_ROWS.items()
}

# (route, principal) -> the bug, for cells where the app answers other than the table.
KNOWN_DEVIATIONS: dict[tuple[str, str], str] = {}

# 404 cells whose answer tells a caller more than "no such thing" (see the test below).
KNOWN_LEAKS: dict[tuple[str, str], str] = {}

# Strings that are not a live key. A NUL, CR, LF or other control character (but tab)
# cannot be sent: the HTTP client refuses to put it in a header.
MALFORMED_KEYS: dict[str, str | bytes] = {
    "not-a-key": "not-a-key",
    "jl_x": "jl_x",
    "10kb": "k" * 10_240,
    "unknown": f"jl_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}",
    "latin-1": b"jl_\xe9\xff\xfe",
    "tab": "jl_\tkey",
}
# One more, made once A's key exists: A's key id with another secret.
FORGED = "forged-secret"

UNKNOWN_GPU = "h100"  # no miner in this module offers it: nothing takes A's jobs but hold()
JOB = SEED_JOB | {"requirements": {"gpu_type": UNKNOWN_GPU, "gpu_count": 1, "min_vram_gb": 16}}


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def missing(prefix: str) -> str:
    """A well-formed id that names nothing."""
    return f"{prefix}_{uuid.uuid4().hex}"


def receipt_public_key() -> str:
    raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def capabilities(**changes: Any) -> dict[str, Any]:
    return {
        "gpu_type": "a100",
        "price_per_hour": "0.5",
        "gpu_count": 1,
        "vram_gb": 40,
        "location": "test",
        "max_concurrent": 2,
    } | changes


@dataclass
class Call:
    """One representative request of a route, and how to tell whether it took effect."""

    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = None
    # The key playing M1 when the route names a miner made for this cell.
    m1_key: str | None = None
    # True once the request's change shows (for state-changing routes).
    happened: Callable[[], bool] | None = None
    # The same request naming, instead, things that do not exist.
    missing_path: str | None = None


def json_call(method: str, path: str, body: Any, **rest: Any) -> Call:
    return Call(method, path, json.dumps(body).encode(), "application/json", **rest)


def key_header(key: str | bytes | None) -> list[tuple[bytes, bytes]]:
    """The X-Api-Key header for `key` (bytes go as they are), or none."""
    if key is None:
        return []
    return [(b"X-Api-Key", key if isinstance(key, bytes) else key.encode())]


@dataclass
class World:
    """One served API, a key per principal, and A's resources everyone is tried on."""

    served: Served
    http: httpx.Client
    keys: dict[str, str | bytes | None]
    m1: str
    m2: str
    malformed: dict[str, str | bytes]
    job: str = ""
    file: str = ""

    def send(self, call: Call, key: str | bytes | None) -> httpx.Response:
        headers = key_header(key)
        if call.content_type:
            headers.append((b"Content-Type", call.content_type.encode()))
        return self.http.request(call.method, call.path, content=call.body, headers=headers)

    def as_(
        self,
        principal: str,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        key = self.keys[principal]
        assert isinstance(key, str)
        return self.http.request(
            method, path, headers={"X-Api-Key": key} | (headers or {}), **kwargs
        )

    def key_of(self, principal: str, variant: str | None, call: Call) -> str | bytes | None:
        if principal == "malformed":
            assert variant is not None
            return self.malformed[variant]
        if principal == "M1" and call.m1_key is not None:
            return call.m1_key
        return self.keys[principal]

    def submit(self, principal: str = "A", **changes: Any) -> str:
        answer = self.as_(principal, "POST", "/v1/jobs", json=JOB | changes)
        assert answer.status_code == 201, answer.text
        return str(answer.json()["job_id"])

    def submit_held(self) -> tuple[str, int]:
        """A job of A's that M1 holds, fresh: well within a lease of its assignment."""
        job_id = self.submit()
        return job_id, hold(self.served, job_id, self.m1)

    def status(self, job_id: str) -> str:
        answer = self.as_("auditor", "GET", f"/v1/jobs/{job_id}")
        assert answer.status_code == 200, answer.text
        return str(answer.json()["status"])

    def upload(self) -> str:
        content = f"an input of A's, {uuid.uuid4()}".encode()
        answer = self.as_(
            "A", "POST", "/v1/files", content=content, headers={"Content-Type": "text/plain"}
        )
        assert answer.status_code == 201, answer.text
        return str(answer.json()["file_id"])

    def new_miner(self) -> tuple[str, str]:
        return register_miner(self.served, "a100")

    def miner(self, miner_id: str) -> dict[str, Any]:
        answer = self.as_("admin", "GET", f"/v1/miners/{miner_id}")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def receipt_keys(self, miner_id: str) -> dict[str, str]:
        answer = self.as_("admin", "GET", f"/v1/miners/{miner_id}/keys")
        assert answer.status_code == 200, answer.text
        return {key["public_key"]: key["status"] for key in answer.json()["keys"]}

    def create_key(self, role: str) -> dict[str, str]:
        answer = self.as_("admin", "POST", "/v1/admin/keys", json={"role": role, "name": "t"})
        assert answer.status_code == 201, answer.text
        return dict(answer.json())


# ---- one representative request per route --------------------------------------------


def cancel(w: World) -> Call:
    job_id, _ = w.submit_held()
    return Call(
        "DELETE",
        f"/v1/jobs/{job_id}",
        happened=lambda: w.status(job_id) in {"canceling", "canceled"},
        missing_path=f"/v1/jobs/{missing('job')}",
    )


def fetch_input(w: World) -> Call:
    job_id, attempt = w.submit_held()
    return Call(
        "GET",
        f"/v1/jobs/{job_id}/attempts/{attempt}/input",
        missing_path=f"/v1/jobs/{missing('job')}/attempts/{attempt}/input",
    )


def store_result(w: World) -> Call:
    job_id, attempt = w.submit_held()

    def stored() -> bool:
        answer = w.as_("auditor", "GET", f"/v1/jobs/{job_id}/events")
        return "JobResultStored" in {event["type"] for event in answer.json()["events"]}

    return Call(
        "PUT",
        f"/v1/jobs/{job_id}/attempts/{attempt}/result",
        b'{"answer": 42}',
        "application/json",
        happened=stored,
        missing_path=f"/v1/jobs/{missing('job')}/attempts/{attempt}/result",
    )


def upload(_: World) -> Call:
    return Call("POST", "/v1/files", f"input {uuid.uuid4()}".encode(), "text/plain")


def delete_file(w: World) -> Call:
    file_id = w.upload()
    return Call(
        "DELETE",
        f"/v1/files/{file_id}",
        happened=lambda: w.as_("admin", "GET", f"/v1/files/{file_id}").status_code == 404,
        missing_path=f"/v1/files/{missing('file')}",
    )


def update_miner(w: World) -> Call:
    miner_id, key = w.new_miner()
    place = f"moved-{secrets.token_hex(3)}"
    return json_call(
        "PUT",
        f"/v1/miners/{miner_id}",
        capabilities(location=place),
        m1_key=key,
        happened=lambda: w.miner(miner_id)["location"] == place,
        missing_path=f"/v1/miners/{missing('miner')}",
    )


def deregister(w: World) -> Call:
    miner_id, key = w.new_miner()
    return Call(
        "DELETE",
        f"/v1/miners/{miner_id}",
        m1_key=key,
        happened=lambda: w.miner(miner_id)["status"] == "deregistered",
        missing_path=f"/v1/miners/{missing('miner')}",
    )


def register_receipt_key(w: World) -> Call:
    miner_id, key = w.new_miner()
    public_key = receipt_public_key()
    return json_call(
        "POST",
        f"/v1/miners/{miner_id}/keys",
        {"public_key": public_key},
        m1_key=key,
        happened=lambda: public_key in w.receipt_keys(miner_id),
        missing_path=f"/v1/miners/{missing('miner')}/keys",
    )


def revoke_receipt_key(w: World) -> Call:
    miner_id, key = w.new_miner()
    public_key = receipt_public_key()
    registered = w.as_(
        "admin", "POST", f"/v1/miners/{miner_id}/keys", json={"public_key": public_key}
    )
    assert registered.status_code == 201, registered.text
    key_id = registered.json()["key_id"]
    return Call(
        "DELETE",
        f"/v1/miners/{miner_id}/keys/{key_id}",
        m1_key=key,
        happened=lambda: w.receipt_keys(miner_id)[public_key] == "revoked",
        missing_path=f"/v1/miners/{missing('miner')}/keys/{key_id}",
    )


def revoke_api_key(w: World) -> Call:
    created = w.create_key("client")
    target = created["key"]

    def revoked() -> bool:
        answer = w.http.get("/v1/jobs", headers={"X-Api-Key": target})
        return answer.status_code == 401

    return Call("DELETE", f"/v1/admin/keys/{created['key_id']}", happened=revoked)


def get(path: str) -> Callable[[World], Call]:
    """A plain GET that needs no resource."""
    return lambda _: Call("GET", path)


CALLS: dict[str, Callable[[World], Call]] = {
    "POST /v1/jobs": lambda w: json_call("POST", "/v1/jobs", JOB),
    "GET /v1/jobs": get("/v1/jobs"),
    "GET /v1/jobs/history": lambda w: Call("GET", f"/v1/jobs/history?from={today()}&to={today()}"),
    "GET /v1/jobs/throughput": get("/v1/jobs/throughput"),
    "GET /v1/jobs/{job_id}": lambda w: Call(
        "GET", f"/v1/jobs/{w.job}", missing_path=f"/v1/jobs/{missing('job')}"
    ),
    "DELETE /v1/jobs/{job_id}": cancel,
    "GET /v1/jobs/{job_id}/download": lambda w: Call(
        "GET", f"/v1/jobs/{w.job}/download", missing_path=f"/v1/jobs/{missing('job')}/download"
    ),
    "GET /v1/jobs/{job_id}/events": lambda w: Call(
        "GET", f"/v1/jobs/{w.job}/events", missing_path=f"/v1/jobs/{missing('job')}/events"
    ),
    # timeout=0: the stream sends the job's current state and closes (it runs on).
    "GET /v1/jobs/{job_id}/watch": lambda w: Call(
        "GET",
        f"/v1/jobs/{w.job}/watch?timeout=0",
        missing_path=f"/v1/jobs/{missing('job')}/watch?timeout=0",
    ),
    "GET /v1/jobs/{job_id}/attempts/{attempt}/input": fetch_input,
    "PUT /v1/jobs/{job_id}/attempts/{attempt}/result": store_result,
    "POST /v1/files": upload,
    "GET /v1/files/{file_id}": lambda w: Call(
        "GET", f"/v1/files/{w.file}", missing_path=f"/v1/files/{missing('file')}"
    ),
    "GET /v1/files/{file_id}/content": lambda w: Call(
        "GET", f"/v1/files/{w.file}/content", missing_path=f"/v1/files/{missing('file')}/content"
    ),
    "DELETE /v1/files/{file_id}": delete_file,
    "GET /v1/audit/key": get("/v1/audit/key"),
    "GET /v1/audit/verify": lambda w: Call("GET", f"/v1/audit/verify?job={w.job}"),
    "GET /v1/audit/export": lambda w: Call("GET", f"/v1/audit/export?from={today()}&to={today()}"),
    "POST /v1/miners": lambda w: json_call(
        "POST", "/v1/miners", capabilities(name=f"rig-{secrets.token_hex(3)}")
    ),
    "GET /v1/miners": get("/v1/miners"),
    "GET /v1/miners/me": get("/v1/miners/me"),
    "GET /v1/miners/{miner_id}": lambda w: Call(
        "GET", f"/v1/miners/{w.m1}", missing_path=f"/v1/miners/{missing('miner')}"
    ),
    "PUT /v1/miners/{miner_id}": update_miner,
    "DELETE /v1/miners/{miner_id}": deregister,
    "GET /v1/miners/{miner_id}/stats": lambda w: Call(
        "GET", f"/v1/miners/{w.m1}/stats", missing_path=f"/v1/miners/{missing('miner')}/stats"
    ),
    "POST /v1/miners/{miner_id}/keys": register_receipt_key,
    "GET /v1/miners/{miner_id}/keys": lambda w: Call(
        "GET", f"/v1/miners/{w.m1}/keys", missing_path=f"/v1/miners/{missing('miner')}/keys"
    ),
    "DELETE /v1/miners/{miner_id}/keys/{key_id}": revoke_receipt_key,
    "POST /v1/admin/keys": lambda w: json_call(
        "POST", "/v1/admin/keys", {"role": "client", "name": "made-in-the-matrix"}
    ),
    "DELETE /v1/admin/keys/{key_id}": revoke_api_key,
    "GET /healthz": get("/healthz"),
    "GET /metrics": get("/metrics"),
    "GET /schema": get("/schema"),
    "GET /schema/openapi.json": get("/schema/openapi.json"),
    "GET /schema/openapi.yaml": get("/schema/openapi.yaml"),
    "GET /schema/openapi.yml": get("/schema/openapi.yml"),
    "GET /schema/swagger": get("/schema/swagger"),
    "GET /schema/redoc": get("/schema/redoc"),
    "GET /schema/rapidoc": get("/schema/rapidoc"),
    "GET /schema/elements": get("/schema/elements"),
    "GET /schema/oauth2-redirect.html": get("/schema/oauth2-redirect.html"),
    "GET /schema/{path}": get("/schema/no-such-page"),
    "GET /ui": get("/ui"),
    "GET /ui/{file_path}": get("/ui/app.js"),
    "HEAD /ui/{file_path}": lambda _: Call("HEAD", "/ui/app.js"),
}


# ---- the module's world and its tally ----------------------------------------------


@dataclass
class Tally:
    """What the module checked, for its one-line summary at the end of the run."""

    cells: set[tuple[str, str]] = field(default_factory=set)
    requests: int = 0
    deviations: list[str] = field(default_factory=list)
    known: list[str] = field(default_factory=list)
    compared: int = 0
    leaks: list[str] = field(default_factory=list)

    def record(self, route: str, principal: str, variant: str | None, status: int) -> None:
        self.cells.add((route, principal))
        self.requests += 1
        expected = MATRIX[route][principal]
        if status != expected:
            who = f"{principal} ({variant})" if variant else principal
            found = f"{route} as {who}: expected {expected}, got {status}"
            known = (route, principal) in KNOWN_DEVIATIONS
            (self.known if known else self.deviations).append(found)

    def line(self) -> str:
        unexpected = "".join(f"\n  {deviation}" for deviation in self.deviations)
        return (
            f"authorization matrix: {len(self.cells)} cells ({len(MATRIX)} routes x "
            f"{len(PRINCIPALS)} principals), {self.requests} requests: "
            f"{len(self.deviations)} deviations, {len(self.known)} known bugs (xfail); "
            f"{self.compared} 404s compared with a missing resource's, "
            f"{len(self.leaks)} say more (known, xfail){unexpected}"
        )


class Summary:
    """A plugin printing the tally under pytest's own summary, past the output capture."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.write_line(self.tally.line())


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Tally:
    found = Tally()
    request.config.pluginmanager.register(Summary(found), f"authorization-summary-{id(found)}")
    return found


@pytest.fixture(scope="module")
def world(served: Served) -> World:
    """The callers, and A's job (held by M1) and file that the read routes are tried on."""
    m1, m1_key = register_miner(served, "a100", name="m1-holder")
    m2, m2_key = register_miner(served, "a100", name="m2-other")
    key_a = served.new_key("client", "alice")
    keys: dict[str, str | bytes | None] = {
        "A": key_a,
        "B": served.new_key("client", "bob"),
        "M1": m1_key,
        "M2": m2_key,
        "auditor": served.new_key("auditor"),
        "admin": served.admin_key,
        "no key": None,
    }
    forged = key_a[: len("jl_") + 13] + "A" * 43  # A's key id, another secret
    world = World(
        served=served,
        http=served.client(),
        keys=keys,
        m1=m1,
        m2=m2,
        malformed=MALFORMED_KEYS | {FORGED: forged},
    )
    revoked = world.create_key("admin")
    gone = world.as_("admin", "DELETE", f"/v1/admin/keys/{revoked['key_id']}")
    assert gone.status_code == 204, gone.text
    keys["revoked"] = revoked["key"]
    world.job, _ = world.submit_held()
    world.file = world.upload()
    return world


# ---- the tests ---------------------------------------------------------------------


def is_public(route: str) -> bool:
    """A route anyone may call, key or none (health and the OpenAPI pages)."""
    return MATRIX[route]["no key"] != 401


def assert_error_body(answer: httpx.Response, status: int) -> None:
    """The answer is the API's error body, naming its own status."""
    assert answer.headers["content-type"].startswith("application/json"), answer.text
    body = answer.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"status", "message", "details"}, body
    assert body["error"]["status"] == status, body


def cells() -> Iterator[Any]:
    for route in MATRIX:
        for principal in PRINCIPALS:
            variants = [*MALFORMED_KEYS, FORGED] if principal == "malformed" else [None]
            for variant in variants:
                marks = []
                if (route, principal) in KNOWN_DEVIATIONS:
                    reason = KNOWN_DEVIATIONS[route, principal]
                    marks.append(pytest.mark.xfail(strict=True, reason=reason))
                name = f"{route} | {principal}" + (f" {variant}" if variant else "")
                yield pytest.param(route, principal, variant, marks=marks, id=name)


@pytest.mark.parametrize(("route", "principal", "variant"), list(cells()))
def test_cell(world: World, tally: Tally, route: str, principal: str, variant: str | None) -> None:
    """One cell: the principal's representative request answers the table's status."""
    expected = MATRIX[route][principal]
    call = CALLS[route](world)
    answer = world.send(call, world.key_of(principal, variant, call))

    tally.record(route, principal, variant, answer.status_code)
    assert answer.status_code == expected, answer.text[:500]
    if expected >= 400 and not is_public(route):
        assert_error_body(answer, expected)
    if call.happened is not None:
        # A success shows; a refusal changed nothing.
        assert call.happened() is (expected < 400)


def not_found_cells() -> Iterator[Any]:
    for route, row in MATRIX.items():
        for principal in ("B", "M2"):
            if row[principal] == 404 and not is_public(route):
                marks = []
                if (route, principal) in KNOWN_LEAKS:
                    marks.append(
                        pytest.mark.xfail(strict=True, reason=KNOWN_LEAKS[route, principal])
                    )
                yield pytest.param(route, principal, marks=marks, id=f"{route} | {principal}")


@pytest.mark.parametrize(("route", "principal"), list(not_found_cells()))
def test_someone_elses_resource_reads_like_a_missing_one(
    world: World, tally: Tally, route: str, principal: str
) -> None:
    """The 404 for another's job, file, attempt or miner is word for word a missing one's."""
    call = CALLS[route](world)
    assert call.missing_path is not None, f"{route} needs a missing_path"
    key = world.key_of(principal, None, call)
    theirs = world.send(call, key)
    absent = world.send(Call(call.method, call.missing_path, call.body, call.content_type), key)
    assert (theirs.status_code, absent.status_code) == (404, 404), (theirs.text, absent.text)
    text = theirs.text
    for real, fake in zip(call.path.split("/"), call.missing_path.split("/"), strict=True):
        text = text.replace(real, fake)
    tally.compared += 1
    if json.loads(text) != absent.json():
        tally.leaks.append(f"{route} as {principal}")
    assert json.loads(text) == absent.json()


def test_naming_another_clients_file_reads_like_naming_no_file(world: World) -> None:
    """B cannot use A's upload as an input, nor learn that it exists."""
    other = missing("file")
    theirs = world.as_("B", "POST", "/v1/jobs", json=JOB | {"input": world.file})
    absent = world.as_("B", "POST", "/v1/jobs", json=JOB | {"input": other})
    assert (theirs.status_code, absent.status_code) == (422, 422), (theirs.text, absent.text)
    assert json.loads(theirs.text.replace(world.file, other)) == absent.json()


def route_templates() -> set[str]:
    """Every (method, path template) the app serves, as the matrix spells it."""
    app = create_app(Settings(database_url="postgresql://unused", nats_url="nats://unused"))
    found = set()
    for route in app.routes:
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        if not isinstance(route, HTTPRoute):
            found.add(f"{type(route).__name__} {path}")
            continue
        # OPTIONS is Litestar's own answer on every path: test_options_needs_a_key.
        found.update(f"{method} {path}" for method in route.methods if method != "OPTIONS")
    return found


# Building the app warns about the controllers' parameter style; not this test's concern.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_every_route_is_in_the_matrix() -> None:
    served = route_templates()
    uncovered, stale = sorted(served - MATRIX.keys()), sorted(MATRIX.keys() - served)
    assert not uncovered, f"routes the matrix (and docs/security.md) must cover: {uncovered}"
    assert not stale, f"matrix rows naming no route of the app: {stale}"
    assert CALLS.keys() == MATRIX.keys(), "every row needs its representative request"


def documented_rows() -> dict[str, str]:
    """The authorization table of docs/security.md: route -> statuses, daggers kept."""
    lines = SECURITY_DOC.read_text().splitlines()
    header = "| route | " + " | ".join(PRINCIPALS) + " |"
    assert lines.count(header) == 1, f"docs/security.md needs exactly one line {header!r}"
    rows: dict[str, str] = {}
    for line in lines[lines.index(header) + 2 :]:
        if not line.startswith("|"):
            break
        route, *statuses = (cell.strip() for cell in line.strip("|").split("|"))
        rows[route.strip("`")] = " ".join(statuses)
    return rows


def test_the_documented_table_is_this_one() -> None:
    documented = documented_rows()
    assert list(documented) == list(MATRIX_ROWS), "the same routes, in the same order"
    for route, row in documented.items():
        assert row.replace("†", "") == MATRIX_ROWS[route], route
    daggers = {
        (route, principal)
        for route, row in documented.items()
        for principal, status in zip(PRINCIPALS, row.split(), strict=True)
        if "†" in status
    }
    assert daggers == KNOWN_DEVIATIONS.keys(), "daggers mark exactly the known deviations"


def concrete(template: str) -> str:
    """A path of the template, with ids that name nothing."""
    return (
        template.replace("{job_id}", missing("job"))
        .replace("{file_id}", missing("file"))
        .replace("{miner_id}", missing("miner"))
        .replace("{attempt}", "1")
        .replace("{key_id}", "000000000000")
        .replace("{path}", "no-such-page")
    )


@pytest.mark.parametrize("template", sorted({route.split(" ", 1)[1] for route in MATRIX}))
def test_options_needs_a_key(world: World, template: str) -> None:
    """OPTIONS (Litestar's, listing the methods) is no way around the key on a private path."""
    public = all(is_public(route) for route in MATRIX if route.endswith(f" {template}"))
    path = concrete(template)
    for key in (None, world.keys["revoked"], "jl_x"):
        answer = world.http.options(path, headers=key_header(key))
        assert answer.status_code == (204 if public else 401), (key, answer.text)
    assert world.as_("admin", "OPTIONS", path).status_code == 204
