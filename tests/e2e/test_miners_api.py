"""The miner registry over real HTTP: register, me, update, deregister, list and stats."""

from __future__ import annotations

import re
import secrets
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Served

pytestmark = pytest.mark.e2e

MINER_ID = re.compile(r"miner_[0-9a-f]{32}")
RIG = {
    "name": "rig-1",
    "gpu_type": "NVIDIA A100-SXM4-80GB",
    "gpu_count": 8,
    "vram_gb": 80,
    "location": "eu-west",
    "price_per_hour": 0.10,
    "max_concurrent": 2,
}
CAPABILITIES = {k: v for k, v in RIG.items() if k != "name"}
VIEW_FIELDS = {
    "miner_id",
    "name",
    "status",
    "gpu_type",
    "gpu_count",
    "vram_gb",
    "location",
    "price_per_hour",
    "max_concurrent",
    "inflight",
    "reported_inflight",
    "gpus",
    "last_heartbeat_at",
    "registered_at",
    "updated_at",
}


@pytest.fixture(scope="module")
def admin(served: Served) -> httpx.Client:
    return served.client(served.admin_key)


def register(admin: httpx.Client, **changes: Any) -> dict[str, Any]:
    body = RIG | {"name": f"rig-{secrets.token_hex(3)}"} | changes
    answer = admin.post("/v1/miners", json=body)
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def assert_error(answer: httpx.Response, status: int, *mentions: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["status"] == status
    for word in mentions:
        assert word.lower() in error["message"].lower(), error["message"]
    return dict(error)


def test_an_admin_registers_a_miner_whose_key_authenticates_as_it(
    served: Served, admin: httpx.Client
) -> None:
    registered = register(admin, name="rig-registered")
    assert MINER_ID.fullmatch(registered["miner_id"])
    assert registered["api_key"].startswith("jl_")
    assert registered["status"] == "offline"  # no heartbeat yet
    assert registered["gpu_type"] == "a100"  # the vendor's name, normalised
    assert registered["price_per_hour"] == 0.1
    assert {k: registered[k] for k in ("gpu_count", "vram_gb", "location", "max_concurrent")} == {
        "gpu_count": 8,
        "vram_gb": 80,
        "location": "eu-west",
        "max_concurrent": 2,
    }
    miner = served.client(registered["api_key"])
    me = miner.get("/v1/miners/me")
    assert me.status_code == 200, me.text
    assert set(me.json()) == VIEW_FIELDS
    assert me.json()["miner_id"] == registered["miner_id"]
    assert me.json()["name"] == "rig-registered"
    assert (me.json()["inflight"], me.json()["gpus"], me.json()["last_heartbeat_at"]) == (
        0,
        [],
        None,
    )
    # Admins, auditors and the miner itself read it by id.
    auditor = served.client(served.new_key("auditor"))
    for reader in (admin, auditor, miner):
        answer = reader.get(f"/v1/miners/{registered['miner_id']}")
        assert answer.status_code == 200, answer.text
        assert answer.json() == me.json()


def test_defaults_fill_what_a_registration_leaves_out(admin: httpx.Client) -> None:
    registered = register(admin, gpu_type="cpu", price_per_hour="-0")
    minimal = admin.post(
        "/v1/miners", json={"name": "minimal", "gpu_type": "t4", "price_per_hour": 0.02}
    )
    assert minimal.status_code == 201, minimal.text
    body = minimal.json()
    assert (body["gpu_count"], body["max_concurrent"], body["vram_gb"], body["location"]) == (
        1,
        1,
        0,
        "unknown",
    )
    assert registered["gpu_type"] == "cpu"
    assert registered["price_per_hour"] == 0
    assert '"price_per_hour":0,' in admin.get(f"/v1/miners/{registered['miner_id']}").text


def test_a_miner_updates_itself_but_not_another(served: Served, admin: httpx.Client) -> None:
    own = register(admin)
    other = register(admin)
    miner = served.client(own["api_key"])
    changed = CAPABILITIES | {"gpu_type": "h100", "gpu_count": 4, "price_per_hour": "0.25"}
    answer = miner.put(f"/v1/miners/{own['miner_id']}", json=changed)
    assert answer.status_code == 200, answer.text
    assert set(answer.json()) == VIEW_FIELDS
    assert (answer.json()["gpu_type"], answer.json()["gpu_count"]) == ("h100", 4)
    assert answer.json()["price_per_hour"] == 0.25
    assert answer.json()["updated_at"] > answer.json()["registered_at"]
    # Read-your-writes: the view shows the update at once.
    assert miner.get("/v1/miners/me").json() == answer.json()

    elsewhere = miner.put(f"/v1/miners/{other['miner_id']}", json=CAPABILITIES)
    assert_error(elsewhere, 404, "not found")
    assert_error(miner.get(f"/v1/miners/{other['miner_id']}"), 404)
    assert_error(miner.get(f"/v1/miners/{other['miner_id']}/stats"), 404)
    assert_error(miner.delete(f"/v1/miners/{other['miner_id']}"), 404)
    assert admin.get(f"/v1/miners/{other['miner_id']}").json()["gpu_type"] == "a100"
    # An admin may update any miner.
    by_admin = admin.put(f"/v1/miners/{other['miner_id']}", json=CAPABILITIES | {"vram_gb": 40})
    assert by_admin.status_code == 200, by_admin.text
    assert by_admin.json()["vram_gb"] == 40


def test_roles_that_may_not_act_are_refused(served: Served, admin: httpx.Client) -> None:
    registered = register(admin)
    miner_id = registered["miner_id"]
    client = served.client(served.new_key("client"))
    for answer in (
        client.post("/v1/miners", json=RIG),
        client.get("/v1/miners"),
        client.get(f"/v1/miners/{miner_id}"),
        client.get(f"/v1/miners/{miner_id}/stats"),
        client.get("/v1/miners/me"),
        client.put(f"/v1/miners/{miner_id}", json=CAPABILITIES),
        client.delete(f"/v1/miners/{miner_id}"),
    ):
        assert_error(answer, 403, "client keys cannot")
    auditor = served.client(served.new_key("auditor"))
    assert_error(auditor.post("/v1/miners", json=RIG), 403)
    assert_error(auditor.put(f"/v1/miners/{miner_id}", json=CAPABILITIES), 403)
    assert_error(auditor.delete(f"/v1/miners/{miner_id}"), 403)
    miner = served.client(registered["api_key"])
    assert_error(miner.post("/v1/miners", json=RIG), 403)
    assert_error(miner.get("/v1/miners"), 403)
    assert_error(served.client().get("/v1/miners"), 401)
    assert admin.get(f"/v1/miners/{miner_id}").json()["status"] == "offline"


def test_unknown_and_malformed_miner_ids_are_not_found(served: Served, admin: httpx.Client) -> None:
    for miner_id in ("miner_" + "0" * 32, "miner_nope", "job_" + "0" * 32):
        assert_error(admin.get(f"/v1/miners/{miner_id}"), 404, "not found")
        assert_error(admin.get(f"/v1/miners/{miner_id}/stats"), 404)
        assert_error(admin.put(f"/v1/miners/{miner_id}", json=CAPABILITIES), 404)
        assert_error(admin.delete(f"/v1/miners/{miner_id}"), 404)
    # A miner-role key that names no miner has no "me".
    assert_error(served.client(served.new_key("miner")).get("/v1/miners/me"), 404)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"gpu_count": 0}, "gpu_count"),
        ({"gpu_count": "2"}, "gpu_count"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"vram_gb": -1}, "vram_gb"),
        ({"price_per_hour": -1}, "price_per_hour"),
        ({"price_per_hour": "NaN"}, "price_per_hour"),
        ({"price_per_hour": "Infinity"}, "price_per_hour"),
        ({"price_per_hour": 0.1234567}, "price_per_hour"),
        ({"price_per_hour": True}, "price_per_hour"),
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "rig\n1"}, "name"),
        ({"location": ""}, "location"),
        ({"gpu_type": "!!!"}, "gpu_type"),
        ({"status": "online"}, "status"),
    ],
)
def test_invalid_registrations_name_the_field(
    admin: httpx.Client, changes: dict[str, Any], field: str
) -> None:
    error = assert_error(admin.post("/v1/miners", json=RIG | changes), 422, field)
    assert field in str(error["details"])


def test_a_registration_needs_a_name_and_capabilities_take_none(
    served: Served, admin: httpx.Client
) -> None:
    nameless = {k: v for k, v in RIG.items() if k != "name"}
    assert_error(admin.post("/v1/miners", json=nameless), 422, "name")
    assert_error(admin.post("/v1/miners", content=b"{"), 400)
    registered = register(admin)
    miner = served.client(registered["api_key"])
    renamed = miner.put(f"/v1/miners/{registered['miner_id']}", json=RIG)
    assert_error(renamed, 422, "name")
    cheap = miner.put(
        f"/v1/miners/{registered['miner_id']}", json=CAPABILITIES | {"price_per_hour": -0.5}
    )
    assert_error(cheap, 422, "price_per_hour")


def test_a_deregistered_miner_cannot_be_changed(served: Served, admin: httpx.Client) -> None:
    registered = register(admin)
    miner_id = registered["miner_id"]
    miner = served.client(registered["api_key"])
    gone = miner.delete(f"/v1/miners/{miner_id}")
    assert gone.status_code == 200, gone.text
    assert gone.json()["status"] == "deregistered"
    # Its key still reads, so its agent learns that it was retired.
    assert miner.get("/v1/miners/me").json()["status"] == "deregistered"
    assert_error(miner.put(f"/v1/miners/{miner_id}", json=CAPABILITIES), 409, "deregistered")
    assert_error(admin.delete(f"/v1/miners/{miner_id}"), 409, "deregistered")
    assert admin.get(f"/v1/miners/{miner_id}").json()["gpu_type"] == "a100"


def test_the_list_pages_newest_first(served: Served, admin: httpx.Client) -> None:
    mine = [register(admin)["miner_id"] for _ in range(3)]
    retired = register(admin)["miner_id"]
    assert admin.delete(f"/v1/miners/{retired}").status_code == 200
    auditor = served.client(served.new_key("auditor"))

    def walk(**params: Any) -> tuple[list[str], int]:
        seen: list[str] = []
        cursor = None
        while True:
            query = {"limit": 2, **params} | ({"cursor": cursor} if cursor else {})
            answer = auditor.get("/v1/miners", params=query)
            assert answer.status_code == 200, answer.text
            page = answer.json()
            assert set(page) == {"miners", "total", "has_more", "next_cursor"}
            assert len(page["miners"]) <= 2
            assert all(set(miner) == VIEW_FIELDS for miner in page["miners"])
            seen += [miner["miner_id"] for miner in page["miners"]]
            if not page["has_more"]:
                assert page["next_cursor"] is None
                return seen, page["total"]
            cursor = page["next_cursor"]

    active, total = walk()
    assert len(active) == len(set(active)) == total
    assert retired not in active
    assert [m for m in active if m in mine] == mine[::-1]
    everyone, everyone_total = walk(include_deregistered="true")
    assert everyone_total == total + len(everyone) - len(active) and retired in everyone
    assert everyone.index(retired) < everyone.index(mine[-1])
    assert_error(admin.get("/v1/miners", params={"limit": 0}), 422, "limit")
    assert_error(admin.get("/v1/miners", params={"limit": 101}), 422, "limit")
    assert_error(admin.get("/v1/miners", params={"cursor": "bogus"}), 422, "cursor")


def test_a_new_miner_has_zero_stats_and_no_rates(served: Served, admin: httpx.Client) -> None:
    registered = register(admin)
    expected = {
        "miner_id": registered["miner_id"],
        "total_jobs": 0,
        "completed_jobs": 0,
        "failed_jobs": 0,
        "timed_out_jobs": 0,
        "success_rate": None,
        "average_completion_time": None,
        "earnings": 0,
        "earnings_per_gpu_hour": None,
        "gpu_seconds": 0,
    }
    auditor = served.client(served.new_key("auditor"))
    for reader in (admin, auditor, served.client(registered["api_key"])):
        answer = reader.get(f"/v1/miners/{registered['miner_id']}/stats")
        assert answer.status_code == 200, answer.text
        assert answer.json() == expected


def test_the_routes_are_documented(served: Served) -> None:
    paths = httpx.get(served.url + "/schema/openapi.json", timeout=10).json()["paths"]
    assert {"post", "get"} <= set(paths["/v1/miners"])
    assert {"get", "put", "delete"} <= set(paths["/v1/miners/{miner_id}"])
    assert "get" in paths["/v1/miners/me"]
    assert "get" in paths["/v1/miners/{miner_id}/stats"]
