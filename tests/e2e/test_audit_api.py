"""The auditors' API on a served ledger: the key, verification, exports, and writing nothing."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.e2e.conftest import SEED_JOB, Served

# Checkpoints often, so a test need not wait long for the chain to be signed.
FAST = {"JOBLEDGER_AUDIT_CHECKPOINT_SECONDS": "0.5"}


@pytest.fixture(scope="module")
def ledger(serve_factory: Callable[..., Served]) -> Served:
    return serve_factory(env=FAST)


@pytest.fixture(scope="module")
def auditor(ledger: Served) -> httpx.Client:
    return ledger.client(ledger.new_key("auditor"))


@pytest.fixture(scope="module")
def jobs(ledger: Served) -> list[str]:
    client = ledger.client(ledger.new_key("client"))
    created = []
    for _ in range(3):
        answer = client.post("/v1/jobs", json=SEED_JOB)
        assert answer.status_code == 201, answer.text
        created.append(answer.json()["job_id"])
    assert client.delete(f"/v1/jobs/{created[0]}").status_code == 200
    return created


def signed(auditor: httpx.Client) -> dict[str, object]:
    """The verification report once every event is sealed and signed."""
    deadline = time.monotonic() + 30
    while True:
        report: dict[str, object] = auditor.get("/v1/audit/verify").json()
        if report["unsealed"] == 0 and report["signed_through"] == report["sealed_through"]:
            return report
        assert time.monotonic() < deadline, report
        time.sleep(0.2)


def test_the_key_is_published_and_a_clean_ledger_verifies(
    auditor: httpx.Client, jobs: list[str]
) -> None:
    key = auditor.get("/v1/audit/key").json()
    assert key["algorithm"] == "Ed25519" and key["key_id"].startswith("ed25519:")
    assert "BEGIN PUBLIC KEY" in key["public_key_pem"]
    report = signed(auditor)
    assert report["findings"] == [] and report["events"] >= 4
    assert report["key_ids"] == [key["key_id"]]
    one = auditor.get("/v1/audit/verify", params={"job": jobs[0]}).json()
    assert (one["scope"], one["events"], one["findings"]) == (jobs[0], 2, [])


def test_an_export_verifies_offline_with_the_pinned_key(
    auditor: httpx.Client, jobs: list[str], tmp_path: Path
) -> None:
    signed(auditor)
    exported = auditor.get("/v1/audit/export")
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("application/x-ndjson")
    path = tmp_path / "export.ndjson"
    path.write_bytes(exported.content)
    key = auditor.get("/v1/audit/key").json()["public_key"]
    checked = subprocess.run(
        [sys.executable, "-m", "app.cli", "audit", "verify", "--file", str(path), "--key", key],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "no findings" in checked.stdout
    assert all(job_id in exported.text for job_id in jobs)


def test_tampering_in_the_database_is_reported_by_the_api(
    ledger: Served, auditor: httpx.Client, jobs: list[str]
) -> None:
    signed(auditor)
    with psycopg.connect(ledger.database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE jobledger_events SET state = convert_to(replace(convert_from(state, 'UTF8'), "
            "'\"normal\"', '\"urgent\"'), 'UTF8') WHERE notification_id = 1"
        )
    findings = auditor.get("/v1/audit/verify").json()["findings"]
    assert [(f["kind"], f["position"]) for f in findings] == [("modified", 1)]


@pytest.mark.parametrize("role", ["client", "miner", None])
def test_only_auditors_and_admins_reach_the_audit_routes(ledger: Served, role: str | None) -> None:
    client = ledger.client(ledger.new_key(role) if role else None)
    for path in ("/v1/audit/key", "/v1/audit/verify", "/v1/audit/export"):
        assert client.get(path).status_code == (403 if role else 401), path


def test_an_auditor_writes_nothing(ledger: Served, auditor: httpx.Client, jobs: list[str]) -> None:
    attempts = [
        auditor.post("/v1/jobs", json=SEED_JOB),
        auditor.delete(f"/v1/jobs/{jobs[1]}"),
        auditor.post("/v1/files", content=b"x"),
        auditor.post("/v1/admin/keys", json={"role": "client", "name": "x"}),
        auditor.post(
            "/v1/miners",
            json={"name": "m", "gpu_type": "cpu", "price_per_hour": 0, "location": "x"},
        ),
    ]
    assert [answer.status_code for answer in attempts] == [403] * len(attempts)
