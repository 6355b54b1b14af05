"""The Python SDK against a served ledger and a miner: jobs run, retries, resumption, integrity.

Faults are injected on the client side (tests/e2e/client_faults.py): the server really
handles every request, and a wrapping transport loses an answer, cuts a stream or flips
a byte on the way back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from app.client import (
    AsyncClient,
    Client,
    Conflict,
    FileInput,
    IntegrityError,
    NotFound,
    RetryPolicy,
    Unauthorized,
)
from tests.e2e.client_faults import (
    CutFirstDownload,
    CutWatches,
    FlipDownloadedByte,
    LoseFirstSubmitAnswer,
)
from tests.e2e.conftest import Served
from tests.e2e.dispatch import Miner, start_miner

pytestmark = pytest.mark.e2e

# Short pauses between retries and reconnects (the server's `retry: 2000` is capped by it).
FAST = RetryPolicy(backoff_first=0.05, backoff_max=0.05)
WAIT_SECONDS = 60
NOBODY_OFFERS = "h100"  # the module's miner offers cpu: such jobs stay pending


@pytest.fixture(scope="module")
def miner(
    served: Served, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Miner]:
    started = start_miner(
        served, nats_url, tmp_path_factory.mktemp("miner"), "cpu", max_concurrent=4
    )
    yield started
    started.kill()


@pytest.fixture(scope="module")
def key(served: Served) -> str:
    return served.new_key("client")


@pytest.fixture
def client(served: Served, key: str) -> Iterator[Client]:
    with Client(served.url, key, retry_policy=FAST) as sdk:
        yield sdk


def test_a_job_submitted_and_waited_for_completes_and_downloads_verified(
    client: Client, miner: Miner, tmp_path: Path
) -> None:
    submitted = client.submit("echo", "hello, sdk", gpu_type="cpu", output_format="text")
    assert submitted.job_id.startswith("job_") and submitted.estimated_cost > 0
    final = client.wait(submitted.job_id, timeout=WAIT_SECONDS)
    assert final.status == "completed", final
    assert final.result is not None

    result = client.download(submitted.job_id, tmp_path)
    assert result.path == tmp_path / f"{submitted.job_id}.txt"
    assert result.path.read_bytes() == b"hello, sdk"
    assert result.sha256 == final.result["sha256"] == hashlib.sha256(b"hello, sdk").hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == [result.path.name]  # no temp file left

    events = client.events(submitted.job_id).events
    assert events[0].type == "JobSubmitted" and events[-1].type == "JobCompleted"
    assert submitted.job_id in {job.job_id for job in client.iter_jobs("completed")}
    today = datetime.now(UTC).date()
    history = client.history(today, today)
    assert submitted.job_id in {job.job_id for job in history.jobs}
    assert history.totals.by_status.get("completed", 0) >= 1


def test_an_uploaded_file_is_the_input_and_comes_back_byte_for_byte(
    client: Client, miner: Miner, tmp_path: Path
) -> None:
    data = secrets.token_bytes(3 * 1024 * 1024 + 5)
    source = tmp_path / "input.bin"
    source.write_bytes(data)
    seen: list[tuple[int, int | None]] = []
    file_id = client.upload(source, progress=lambda done, total: seen.append((done, total)))
    assert file_id.startswith("file_") and seen[-1] == (len(data), len(data))
    job = client.submit("echo", FileInput(file_id=file_id), gpu_type="cpu", output_format="binary")
    assert client.wait(job.job_id, timeout=WAIT_SECONDS).status == "completed"
    result = client.download(job.job_id, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    assert result.sha256 == hashlib.sha256(data).hexdigest()


def test_a_download_cut_halfway_resumes_with_a_range_and_arrives_whole(
    served: Served, key: str, client: Client, miner: Miner, tmp_path: Path
) -> None:
    data = secrets.token_bytes(2 * 1024 * 1024 + 3)
    file_id = client.upload(data, filename="in.bin")
    job = client.submit("echo", FileInput(file_id=file_id), gpu_type="cpu", output_format="binary")
    assert client.wait(job.job_id, timeout=WAIT_SECONDS).status == "completed"
    transport = CutFirstDownload()
    with Client(served.url, key, transport=transport, retry_policy=FAST) as cut:
        result = cut.download(job.job_id, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    assert result.size_bytes == len(data)
    first, resumed = (r for r in transport.requests if r.url.path.endswith("/download"))
    assert "Range" not in first.headers
    assert resumed.headers["Range"] == f"bytes={len(data) // 2}-"
    assert resumed.headers["If-Range"] == f'"{result.sha256}"'
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_submission_whose_answer_was_lost_is_retried_into_the_same_job(
    served: Served, key: str
) -> None:
    transport = LoseFirstSubmitAnswer()
    before = Client(served.url, key).list().total
    with Client(served.url, key, transport=transport, retry_policy=FAST) as client:
        submitted = client.submit("echo", "only once", gpu_type=NOBODY_OFFERS)
        assert client.list().total == before + 1  # one job, though the server was asked twice
        recorded = client.events(submitted.job_id).events[0].data
    posts = [r for r in transport.requests if r.method == "POST"]
    assert len(posts) == 2
    assert posts[0].headers["Idempotency-Key"] == posts[1].headers["Idempotency-Key"]
    assert recorded["idempotency_key"] == posts[0].headers["Idempotency-Key"]


def test_a_watch_cut_twice_resumes_with_last_event_id_without_gaps_or_repeats(
    served: Served, key: str, miner: Miner
) -> None:
    transport = CutWatches(cuts=2, messages=2)
    with Client(served.url, key, transport=transport, retry_policy=FAST) as client:
        job = client.submit("sleep", "1.5", gpu_type="cpu")
        updates = list(client.watch(job.job_id, last_event_id=0))
        stored = client.events(job.job_id).events
    assert (
        [u.sequence for u in updates]
        == [e.sequence for e in stored]
        == list(range(1, len(stored) + 1))
    )
    assert [u.type for u in updates] == [e.type for e in stored]
    assert updates[-1].job.status == "completed" and updates[-1].job.progress == 100
    watches = [r for r in transport.requests if r.url.path.endswith("/watch")]
    resumed_after = [int(r.headers["Last-Event-ID"]) for r in watches]
    assert len(watches) == 3 and resumed_after[0] == 0
    assert resumed_after[1] >= 2 and resumed_after[2] > resumed_after[1]


def test_a_watch_without_last_event_id_starts_with_the_current_state(
    client: Client, miner: Miner
) -> None:
    job = client.submit("echo", "state", gpu_type="cpu")
    final = client.wait(job.job_id, timeout=WAIT_SECONDS)
    updates = list(client.watch(job.job_id))
    assert len(updates) == 1 and updates[0].job.status == final.status == "completed"


def test_errors_name_what_went_wrong(served: Served, client: Client, miner: Miner) -> None:
    with pytest.raises(NotFound) as missing:
        client.get("job_" + "0" * 32)
    assert missing.value.status == 404 and missing.value.exit_code == 5
    other = Client(served.url, served.new_key("client"))
    mine = client.submit("echo", "mine", gpu_type="cpu")
    with pytest.raises(NotFound):
        other.get(mine.job_id)
    with pytest.raises(Unauthorized) as refused, Client(served.url, "jl_not_a_key") as stranger:
        stranger.list()
    assert refused.value.exit_code == 4 and "refused" in refused.value.hint

    client.wait(mine.job_id, timeout=WAIT_SECONDS)
    with pytest.raises(Conflict) as finished:
        client.cancel(mine.job_id)
    assert finished.value.details["status"] == "completed"
    pending = client.submit("echo", "never runs", gpu_type=NOBODY_OFFERS)
    assert client.cancel(pending.job_id).status == "canceled"


def test_a_download_with_a_changed_byte_raises_and_keeps_nothing(
    served: Served, key: str, client: Client, miner: Miner, tmp_path: Path
) -> None:
    job = client.submit("echo", "integrity", gpu_type="cpu", output_format="text")
    assert client.wait(job.job_id, timeout=WAIT_SECONDS).status == "completed"
    with (
        Client(served.url, key, transport=FlipDownloadedByte()) as tampered,
        pytest.raises(IntegrityError) as mismatch,
    ):
        tampered.download(job.job_id, tmp_path / "result.txt")
    assert mismatch.value.expected == hashlib.sha256(b"integrity").hexdigest()
    assert mismatch.value.actual != mismatch.value.expected
    assert list(tmp_path.iterdir()) == []


def test_the_async_client_runs_the_same_loop(
    served: Served, key: str, miner: Miner, tmp_path: Path
) -> None:
    async def main() -> tuple[Any, ...]:
        async with AsyncClient(served.url, key, retry_policy=FAST) as client:
            file_id = await client.upload(b'{"from": "async"}', filename="in.json")
            job = await client.submit(
                "echo", FileInput(file_id=file_id), gpu_type="cpu", output_format="binary"
            )
            final = await client.wait(job.job_id, timeout=WAIT_SECONDS)
            result = await client.download(job.job_id, tmp_path / "out.json")
            listed = [j.job_id async for j in client.iter_jobs()]
            return job.job_id, final.status, result, listed

    job_id, final_status, result, listed = asyncio.run(main())
    assert final_status == "completed" and job_id in listed
    assert json.loads(result.path.read_bytes()) == {"from": "async"}


@pytest.mark.parametrize("example", ["sdk_sync.py", "sdk_async.py"])
def test_the_documented_sdk_examples_run(
    served: Served, key: str, miner: Miner, tmp_path: Path, example: str
) -> None:
    script = Path(__file__).resolve().parents[2] / "docs" / "examples" / example
    environment = {k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")} | {
        "JOBLEDGER_URL": served.url,
        "JOBLEDGER_API_KEY": key,
        "JOBLEDGER_CONFIG": str(tmp_path / "no-such-config.toml"),
    }
    ran = subprocess.run(
        [sys.executable, str(script), "cpu"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    if example == "sdk_sync.py":
        [saved] = tmp_path.glob("job_*.txt")
        assert saved.read_text() == hashlib.sha256(b"Hello, GPU").hexdigest()
        assert "verified" in ran.stdout
    else:
        assert "final: completed, completed, completed" in ran.stdout
