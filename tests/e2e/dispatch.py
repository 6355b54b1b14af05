"""Helpers for the dispatch tests: miners in subprocesses, jobs over HTTP, waiting for outcomes."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.e2e.conftest import Served

T = TypeVar("T")
TERMINAL = {"completed", "failed", "canceled", "timed_out"}


@dataclass
class Miner:
    """A `jobledger miner` subprocess and its identity."""

    miner_id: str
    key: str
    process: subprocess.Popen[bytes] | None
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the miner vanishes without a word."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def register_miner(
    served: Served, gpu_type: str, *, max_concurrent: int = 2, name: str | None = None
) -> tuple[str, str]:
    """Register a miner through the admin API; returns (miner_id, its key)."""
    answer = httpx.post(
        served.url + "/v1/miners",
        headers={"X-Api-Key": served.admin_key},
        json={
            "name": name or f"test-{gpu_type}-{secrets.token_hex(3)}",
            "gpu_type": gpu_type,
            "gpu_count": 1,
            "location": "test",
            "price_per_hour": 0.5,
            "max_concurrent": max_concurrent,
        },
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    body = answer.json()
    return str(body["miner_id"]), str(body["api_key"])


def start_miner(
    served: Served,
    nats_url: str,
    tmp_path: Path,
    gpu_type: str,
    *,
    max_concurrent: int = 2,
    key: tuple[str, str] | None = None,
    extra: list[str] | None = None,
) -> Miner:
    """Register (unless `key` is given) and start a miner offering `gpu_type`."""
    miner_id, miner_key = key or register_miner(served, gpu_type, max_concurrent=max_concurrent)
    log_path = tmp_path / f"miner-{miner_id}-{secrets.token_hex(2)}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")} | {
        "JOBLEDGER_NATS_PREFIX": served.nats_prefix,
        "JOBLEDGER_MINER_KEY": miner_key,
        # Its work directory (fetched inputs, packaged results) lives under the test's tmp.
        "JOBLEDGER_HOME": str(tmp_path / f"miner-home-{miner_id}"),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "miner",
                "--api",
                served.url,
                "--nats",
                nats_url,
                "--gpu-type",
                gpu_type,
                "--max-concurrent",
                str(max_concurrent),
                "--heartbeat-seconds",
                "0.5",
                *(extra or []),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Miner(miner_id=miner_id, key=miner_key, process=process, log_path=log_path)


def wait_for(
    probe: Callable[[], T | None], timeout: float, what: str, on_fail: Callable[[], str] = str
) -> T:
    """Poll `probe` until it returns something other than None (or False)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value not in (None, False):
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{on_fail()}")
        time.sleep(0.1)


def submit(client: httpx.Client, model: str, job_input: str, **extra: Any) -> str:
    """Submit a job and return its id."""
    body = {
        "model": model,
        "input": job_input,
        "requirements": {"gpu_type": extra.pop("gpu_type", "cpu"), "gpu_count": 1},
        "timeout_seconds": extra.pop("timeout_seconds", 300),
    } | extra
    answer = client.post("/v1/jobs", json=body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["job_id"])


def status(client: httpx.Client, job_id: str) -> dict[str, Any]:
    answer = client.get(f"/v1/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    answer = client.get(f"/v1/jobs/{job_id}/events")
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["events"]
    return found


def event_types(client: httpx.Client, job_id: str) -> list[str]:
    return [event["type"] for event in events(client, job_id)]


def wait_status(
    client: httpx.Client,
    job_id: str,
    wanted: set[str],
    timeout: float = 60,
    on_fail: Callable[[], str] = str,
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        current = status(client, job_id)
        return current if current["status"] in wanted else None

    return wait_for(
        probe,
        timeout,
        f"{job_id} to be {sorted(wanted)}",
        lambda: f"now: {status(client, job_id)}\n{on_fail()}",
    )


def wait_all_terminal(
    client: httpx.Client, job_ids: list[str], timeout: float, on_fail: Callable[[], str] = str
) -> dict[str, dict[str, Any]]:
    """Wait until every job is terminal; returns their rows from the list view."""
    wanted = set(job_ids)
    deadline = time.monotonic() + timeout
    while True:
        rows = {job["job_id"]: job for job in _all_jobs(client) if job["job_id"] in wanted}
        unfinished = [
            job_id for job_id in wanted if rows.get(job_id, {}).get("status") not in TERMINAL
        ]
        if not unfinished:
            return rows
        if time.monotonic() > deadline:
            sample = [status(client, job_id) for job_id in sorted(unfinished)[:3]]
            raise AssertionError(
                f"{len(unfinished)} job(s) unfinished after {timeout}s, e.g. {sample}\n{on_fail()}"
            )
        time.sleep(0.3)


def _all_jobs(client: httpx.Client) -> Iterator[dict[str, Any]]:
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/jobs", params=params).json()
        yield from page["jobs"]
        cursor = page.get("next_cursor")
        if not page["has_more"]:
            return
