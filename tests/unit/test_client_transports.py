"""Client and AsyncClient over scripted transports: retries, resumption, and how output looks.

No server: httpx.MockTransport answers what each test scripts, including connections
that drop mid-body. The e2e suite (tests/e2e/test_client.py) does the same against a ledger.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import AsyncClient, Client, RetryPolicy, errors, render

FAST = RetryPolicy(backoff_first=0.001, backoff_max=0.001)


def job(status: str = "pending", progress: int = 0) -> dict[str, Any]:
    return {
        "job_id": "job_1",
        "status": status,
        "progress": progress,
        "miner_id": None,
        "created_at": "2026-11-29T10:15:06Z",
        "started_at": None,
        "completed_at": None,
        "result": None,
        "model": "echo",
        "priority": "normal",
        "attempt": 1,
        "estimated_cost": 0.05,
        "cost": None,
        "error": None,
    }


SUBMITTED = {"job_id": "job_1", "estimated_cost": 0.05, "estimated_time_seconds": 600}


class Dropping(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that sends `data` and then breaks the connection."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        yield self.data
        raise httpx.ReadError("connection reset by peer")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data
        raise httpx.ReadError("connection reset by peer")


def scripted(
    *answers: Callable[[httpx.Request], httpx.Response],
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport answering each request with the next function; it records the requests."""
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)(request)

    return httpx.MockTransport(handle), seen


def answer(
    status: int, body: Any = None, **headers: str
) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, json=body, headers=headers)


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def lose_answer(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadError("the answer was lost", request=request)


def test_a_submission_retried_after_a_lost_answer_and_a_429_keeps_its_idempotency_key() -> None:
    transport, seen = scripted(
        lose_answer, answer(429, {"error": {}}, **{"Retry-After": "0"}), answer(201, SUBMITTED)
    )
    with Client("http://ledger.test", "jl_k", transport=transport, retry_policy=FAST) as client:
        submitted = client.submit("echo", "hi", gpu_type="cpu")
    assert submitted.job_id == "job_1" and submitted.estimated_cost == Decimal("0.05")
    keys = {request.headers["Idempotency-Key"] for request in seen}
    assert len(seen) == 3 and len(keys) == 1
    assert all(request.headers["X-Api-Key"] == "jl_k" for request in seen)


def test_an_upload_is_not_sent_again_once_it_may_have_arrived() -> None:
    transport, seen = scripted(refuse, lose_answer)
    with (
        Client("http://ledger.test", transport=transport, retry_policy=FAST) as client,
        pytest.raises(errors.ConnectionFailed, match="lost"),
    ):
        client.upload(b"input bytes")
    assert len(seen) == 2  # the refused connection was retried, the lost answer was not
    assert seen[1].headers["Content-Length"] == "11"


def test_a_cancel_whose_first_answer_was_lost_reports_the_cancellation() -> None:
    canceled = {
        "error": {"status": 409, "message": "it is canceled", "details": {"status": "canceled"}}
    }
    transport, _ = scripted(lose_answer, answer(409, canceled), answer(200, job("canceled")))
    with Client("http://ledger.test", transport=transport, retry_policy=FAST) as client:
        assert client.cancel("job_1").status == "canceled"
    transport, _ = scripted(answer(409, canceled))
    with (
        Client("http://ledger.test", transport=transport, retry_policy=FAST) as client,
        pytest.raises(errors.Conflict),
    ):
        client.cancel("job_1")  # asked once, refused once: a real conflict


def sse(*frames: str) -> bytes:
    return "".join(frames).encode()


def job_frame(sequence: int, status: str, progress: int = 0) -> str:
    data = {
        "sequence": sequence,
        "type": "JobProgressReported",
        "timestamp": "2026-11-29T10:15:07Z",
        "job": job(status, progress),
    }
    return f"id: {sequence}\nevent: job\ndata: {json.dumps(data)}\n\n"


END = 'event: end\ndata: {"status": "completed"}\n\n'


def watch_script() -> tuple[httpx.MockTransport, list[httpx.Request]]:
    first = sse("retry: 1\n\n", job_frame(1, "pending"), job_frame(2, "running", 10))
    return scripted(
        lambda r: httpx.Response(200, stream=Dropping(first + b"id: 3\nevent: jo")),
        lambda r: httpx.Response(503, json={"error": {}}),
        lambda r: httpx.Response(
            200, content=sse(job_frame(2, "running", 10), job_frame(3, "completed", 100), END)
        ),
    )


def test_a_watch_reconnects_with_last_event_id_and_neither_skips_nor_repeats() -> None:
    transport, seen = watch_script()
    with Client("http://ledger.test", transport=transport, retry_policy=FAST) as client:
        updates = list(client.watch("job_1"))
    assert [u.sequence for u in updates] == [1, 2, 3]
    assert updates[-1].job.status == "completed"
    assert [r.headers.get("Last-Event-ID") for r in seen] == [None, "2", "2"]
    assert seen[0].url.path == "/v1/jobs/job_1/watch"


def test_the_async_client_watches_and_waits_the_same_way() -> None:
    transport, seen = watch_script()

    async def main() -> list[int]:
        async with AsyncClient("http://ledger.test", transport=transport, retry_policy=FAST) as c:
            return [update.sequence async for update in c.watch("job_1")]

    assert asyncio.run(main()) == [1, 2, 3]
    assert [r.headers.get("Last-Event-ID") for r in seen] == [None, "2", "2"]

    transport, _ = watch_script()

    async def wait() -> str:
        async with AsyncClient("http://ledger.test", transport=transport, retry_policy=FAST) as c:
            return (await c.wait("job_1", timeout=10)).status

    assert asyncio.run(wait()) == "completed"


def download_script(
    data: bytes, sent_first: int, tamper: bool = False
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    digest = hashlib.sha256(data).hexdigest()
    headers = {"ETag": f'"{digest}"', "Content-Disposition": 'attachment; filename="job_1.bin"'}
    rest = data[sent_first:]
    if tamper:
        rest = bytes([rest[0] ^ 1]) + rest[1:]
    return scripted(
        lambda r: httpx.Response(
            200,
            stream=Dropping(data[:sent_first]),
            headers=headers | {"Content-Length": str(len(data))},
        ),
        lambda r: httpx.Response(
            206,
            content=rest,
            headers=headers | {"Content-Range": f"bytes {sent_first}-{len(data) - 1}/{len(data)}"},
        ),
    )


def test_a_dropped_download_resumes_where_it_stopped_and_lands_whole(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    transport, seen = download_script(data, sent_first=100_000)
    progress: list[tuple[int, int | None]] = []
    with Client("http://ledger.test", transport=transport, retry_policy=FAST) as client:
        result = client.download("job_1", tmp_path, progress=lambda d, t: progress.append((d, t)))
    assert result.path == tmp_path / "job_1.bin" and result.path.read_bytes() == data
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert seen[1].headers["Range"] == "bytes=100000-"
    assert seen[1].headers["If-Range"] == f'"{result.sha256}"'
    assert progress[-1] == (len(data), len(data))
    assert [p.name for p in tmp_path.iterdir()] == ["job_1.bin"]


@pytest.mark.parametrize("use_async", [False, True])
def test_a_tampered_download_leaves_nothing_behind(tmp_path: Path, use_async: bool) -> None:
    data = b"result bytes " * 1000
    transport, _ = download_script(data, sent_first=5000, tamper=True)
    target = tmp_path / "out.bin"
    with pytest.raises(errors.IntegrityError) as mismatch:
        if use_async:

            async def main() -> None:
                async with AsyncClient("http://t", transport=transport, retry_policy=FAST) as c:
                    await c.download("job_1", target)

            asyncio.run(main())
        else:
            with Client("http://t", transport=transport, retry_policy=FAST) as client:
                client.download("job_1", target)
    assert mismatch.value.expected == hashlib.sha256(data).hexdigest()
    assert list(tmp_path.iterdir()) == []


# ---- how it looks -----------------------------------------------------------------------


def test_money_durations_and_tables_read_well() -> None:
    assert [render.money(Decimal(v)) for v in ("0.050000", "1", "0.000123", "12.5")] == [
        "0.05",
        "1.00",
        "0.000123",
        "12.50",
    ]
    assert [render.duration(s) for s in (5, 65, 3725, 90000)] == [
        "5s",
        "1m 05s",
        "1h 02m",
        "1d 01h",
    ]
    now = datetime(2026, 11, 29, 12, tzinfo=UTC)
    assert render.ago(now - timedelta(minutes=3), now) == "3m 00s ago"
    assert render.ago(now - timedelta(days=30), now) == "2026-10-30"
    assert render.table(["ID", "COST"], [["a", "0.05"], ["long-id", "12.50"]], frozenset({1})) == (
        "ID        COST\na         0.05\nlong-id  12.50"
    )


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_are_drawn_only_on_a_terminal() -> None:
    plain, terminal = io.StringIO(), Terminal()
    for stream in (plain, terminal):
        bar = render.TransferBar(render.StatusLine(stream, stream.isatty()), "upload")
        bar(50, 100)
        bar(100, 100)
    assert plain.getvalue() == ""
    assert "\r" in terminal.getvalue() and "100%" in terminal.getvalue()
    assert render.bar(0.5, 10, unicode=False) == "#####-----"
