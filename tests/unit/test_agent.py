"""The miner agent: what it offers, and how an attempt's input and result travel.

Attempts run through the agent's AttemptRunner against a fake ledger API (httpx's
MockTransport); reports are collected instead of published to JetStream.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app import protocol
from app.miner.agent import (
    AgentConfig,
    AgentError,
    Attempt,
    AttemptRunner,
    MinerAgent,
    clear_work_dir,
    inline_result,
    load_or_create_receipt_key,
    offered_capabilities,
    receipt_key_path,
    travels_inline,
)
from app.miner.executors import (
    Echo,
    ExecutionContext,
    ExecutorRegistry,
    Output,
    Sha256,
)
from app.receipts import (
    check_claims,
    encode_public_key,
    key_id_of,
    raw_public_key,
    verify_receipt,
)

REGISTERED = {"location": "lab", "price_per_hour": 2.5, "max_concurrent": 3}
H100 = protocol.GpuInfo(
    index=0,
    name="NVIDIA H100 80GB HBM3",
    uuid="GPU-1",
    memory_total_mb=81559,
    driver="550.54",
)


def config(**changes: object) -> AgentConfig:
    return AgentConfig(  # type: ignore[misc]
        api_url="http://x", nats_urls=["nats://x"], key="k", work_dir=Path("work"), **changes
    )


def test_nvml_gpus_become_capabilities_with_normalised_names() -> None:
    offered = offered_capabilities(config(), [H100, H100], REGISTERED)
    assert (offered.gpu_type, offered.gpu_count, offered.vram_gb) == ("h100", 2, 79)
    assert (offered.location, offered.price_per_hour, offered.max_concurrent) == (
        "lab",
        Decimal("2.5"),
        3,
    )


def test_a_pseudo_type_overrides_what_nvml_finds() -> None:
    offered = offered_capabilities(config(gpu_type="CPU", max_concurrent=8), [], REGISTERED)
    assert (offered.gpu_type, offered.gpu_count, offered.vram_gb) == ("cpu", 1, 0)
    assert offered.max_concurrent == 8


def test_no_gpu_and_no_type_is_refused_with_what_to_do() -> None:
    with pytest.raises(AgentError, match="--gpu-type cpu"):
        offered_capabilities(config(), [], REGISTERED)


def decoded(result: protocol.InlineResult) -> bytes:
    """The bytes of an inline result, checked against its size and digest."""
    data = (
        base64.b64decode(result.data, validate=True)
        if result.encoding == "base64"
        else result.data.encode()
    )
    assert len(data) == result.size_bytes
    assert hashlib.sha256(data).hexdigest() == result.sha256
    return data


def test_text_results_travel_as_text() -> None:
    result = inline_result(b"hello", "text/plain")
    assert (result.encoding, result.data, result.size_bytes) == ("utf-8", "hello", 5)
    assert result.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert (decoded(result), result.content_type) == (b"hello", "text/plain")


def test_binary_results_travel_as_base64() -> None:
    raw = bytes(range(256))
    result = inline_result(raw, "application/octet-stream")
    assert result.encoding == "base64"
    assert decoded(result) == raw
    encoded = protocol.encoder.encode(
        protocol.Completed(
            miner_id="miner_x",
            attempt=1,
            at=datetime(2026, 1, 1, tzinfo=UTC),
            result=result,
            metrics=protocol.Metrics(execution_seconds=1.0),
        )
    )
    assert b'"storage":"inline"' in encoded
    assert protocol.report_decoder.decode(encoded).result == result  # type: ignore[union-attr]


# ---- where a result goes -----------------------------------------------------------


def test_only_small_results_of_local_jobs_travel_inline() -> None:
    local = protocol.OutputConfig(destination="local", format="json")
    s3 = protocol.OutputConfig(destination="s3://bucket/results", format="json")
    limit = protocol.MAX_INLINE_RESULT_BYTES
    assert travels_inline(local, 0)
    assert travels_inline(local, limit)
    assert not travels_inline(local, limit + 1)
    assert not travels_inline(s3, 10)


# ---- attempts against a fake ledger API ---------------------------------------------

JOB = "job_" + "ab" * 16
MIB = 1024 * 1024
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def assignment(**changes: Any) -> protocol.Assignment:
    now = datetime.now(UTC)
    fields: dict[str, Any] = {
        "job_id": JOB,
        "attempt": 1,
        "model": "echo",
        "input": "hello",
        "output_config": protocol.OutputConfig(destination="local", format="text"),
        "requirements": protocol.Requirements(gpu_type="cpu", gpu_count=1, min_vram_gb=0),
        "priority": "normal",
        "timeout_seconds": 60,
        "assigned_at": now,
        "deadline": now + timedelta(seconds=60),
    }
    if "destination" in changes or "format" in changes:
        fields["output_config"] = protocol.OutputConfig(
            destination=changes.pop("destination", "local"),
            format=changes.pop("format", "text"),
        )
    fields.update(changes)
    return protocol.Assignment(**fields)


def file_assignment(data: bytes, **changes: Any) -> protocol.Assignment:
    values: dict[str, Any] = {
        "input": None,
        "input_file_id": "file_1",
        "input_size_bytes": len(data),
        "input_sha256": hashlib.sha256(data).hexdigest(),
    }
    return assignment(**(values | changes))


class Ledger:
    """The ledger's transfer routes, as a MockTransport handler that records requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.handler(request)

    def puts(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "PUT"]

    def gets(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "GET"]


def stored(request: httpx.Request) -> httpx.Response:
    """The 201 the ledger answers once it has stored a result."""
    body = request.content
    return httpx.Response(
        201,
        json={
            "location": f"s3://results/{JOB}/1",
            "size_bytes": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "content_type": request.headers["Content-Type"],
        },
    )


def refused(status: int, message: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"status": status, "message": message, "details": None}}
    )


class Stream(httpx.AsyncByteStream):
    """A response body: some chunks, then optionally a broken connection or a stall."""

    def __init__(self, *chunks: bytes, then: str | None = None) -> None:
        self.chunks = chunks
        self.then = then

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.then == "break":
            raise httpx.ReadError("connection reset by peer")
        if self.then == "stall":
            await asyncio.sleep(3600)


def serve_input(data: bytes, *, break_after: int | None = None) -> Handler:
    """GET of the input: the whole file (broken after `break_after` bytes, once), or a range."""
    broke = False

    async def handle(request: httpx.Request) -> httpx.Response:
        nonlocal broke
        if request.method == "PUT":
            return stored(request)
        etag = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        if "Range" in request.headers:
            start = int(request.headers["Range"].removeprefix("bytes=").removesuffix("-"))
            rest = data[start:]
            headers = etag | {
                "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}",
                "Content-Length": str(len(rest)),
            }
            return httpx.Response(206, headers=headers, stream=Stream(rest))
        if break_after is not None and not broke:
            broke = True
            pieces = [data[i : i + MIB] for i in range(0, break_after, MIB)]
            return httpx.Response(200, headers=etag, stream=Stream(*pieces, then="break"))
        return httpx.Response(200, headers=etag, content=data)

    return handle


class Upper:
    """Writes the upper-cased input text to a file in its work dir: a path output."""

    async def run(self, context: ExecutionContext) -> Output:
        path = context.work_dir / "upper.txt"
        path.write_text((context.input or "").upper())
        return Output(path=path, content_type="text/plain")


class NotUtf8:
    async def run(self, context: ExecutionContext) -> Output:
        return Output(b"\xff\xfe", "text/plain")


class Crash:
    async def run(self, context: ExecutionContext) -> Output:
        raise RuntimeError("boom")


class Scene:
    """One AttemptRunner wired to a fake ledger, with the reports it sent."""

    def __init__(
        self, handler: Handler, work_dir: Path, key: Ed25519PrivateKey | None = None
    ) -> None:
        self.ledger = Ledger(handler)
        self.reports: list[protocol.Report] = []
        self.work_dir = work_dir
        registry = ExecutorRegistry()
        for name, executor in [
            ("echo", Echo()),
            ("sha256", Sha256()),
            ("upper", Upper()),
            ("not_utf8", NotUtf8()),
            ("crash", Crash()),
        ]:
            registry.register(name, executor)
        self.api = httpx.AsyncClient(
            transport=httpx.MockTransport(self.ledger), base_url="http://ledger"
        )
        self.runner = AttemptRunner(
            miner_id="miner_x",
            registry=registry,
            api=self.api,
            report=self.report,
            work_dir=work_dir,
            transfer_retry_seconds=0.01,
            receipt_key=key,
        )

    async def report(self, job_id: str, report: protocol.Report) -> None:
        assert job_id == JOB
        self.reports.append(report)

    async def run(self, job: protocol.Assignment) -> list[protocol.Report]:
        await self.runner.run(Attempt(job, ()))
        await self.api.aclose()
        assert list(self.work_dir.iterdir()) == [], "the attempt's directory is removed"
        return self.reports

    def kinds(self) -> list[str]:
        return [type(r).__struct_config__.tag for r in self.reports]  # type: ignore[misc]


def completed(reports: list[protocol.Report]) -> protocol.Completed:
    assert isinstance(reports[-1], protocol.Completed), reports[-1]
    return reports[-1]


def failed(reports: list[protocol.Report]) -> protocol.ErrorInfo:
    assert isinstance(reports[-1], protocol.Failed), reports[-1]
    return reports[-1].error


async def nothing(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no HTTP request expected, got {request.method} {request.url}")


async def test_a_small_result_of_a_local_job_travels_inline(tmp_path: Path) -> None:
    scene = Scene(nothing, tmp_path)
    reports = await scene.run(assignment(input="héllo"))
    assert scene.kinds() == ["started", "completed"]
    result = completed(reports).result
    assert isinstance(result, protocol.InlineResult)
    assert decoded(result) == "héllo".encode()
    assert result.content_type == "text/plain; charset=utf-8"
    assert completed(reports).metrics.execution_seconds >= 0


async def test_a_result_for_another_destination_is_uploaded(tmp_path: Path) -> None:
    scene = Scene(serve_input(b""), tmp_path)
    reports = await scene.run(assignment(input="héllo", destination="s3://bucket/out"))
    (put,) = scene.ledger.puts()
    body = "héllo".encode()
    assert put.url.path == f"/v1/jobs/{JOB}/attempts/1/result"
    assert put.content == body
    assert put.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert put.headers["Content-Length"] == str(len(body))
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
    assert put.headers["Content-Digest"] == f"sha-256=:{digest}:"
    result = completed(reports).result
    assert result == protocol.StoredResult(
        location=f"s3://results/{JOB}/1",
        size_bytes=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
    )
    encoded = protocol.encoder.encode(completed(reports))
    assert protocol.report_decoder.decode(encoded) == completed(reports)


async def test_a_large_result_of_a_local_job_is_uploaded(tmp_path: Path) -> None:
    text = "x" * (protocol.MAX_INLINE_RESULT_BYTES + 1)
    scene = Scene(serve_input(b""), tmp_path)
    reports = await scene.run(assignment(input=text))
    (put,) = scene.ledger.puts()
    assert put.content == text.encode()
    assert isinstance(completed(reports).result, protocol.StoredResult)


async def test_a_file_output_is_streamed_from_disk(tmp_path: Path) -> None:
    scene = Scene(serve_input(b""), tmp_path)
    job = assignment(model="upper", input="abc", format="archive", destination="s3://b/out")
    reports = await scene.run(job)
    (put,) = scene.ledger.puts()
    assert "Transfer-Encoding" not in put.headers
    assert put.headers["Content-Type"] == "application/zip"
    assert int(put.headers["Content-Length"]) == len(put.content)
    with zipfile.ZipFile(io.BytesIO(put.content)) as archive:
        assert archive.read("result.txt") == b"ABC"
    assert isinstance(completed(reports).result, protocol.StoredResult)


async def test_an_input_file_is_fetched_checked_and_given_to_the_executor(
    tmp_path: Path,
) -> None:
    data = bytes(range(256)) * (3 * MIB // 256)
    scene = Scene(serve_input(data), tmp_path)
    reports = await scene.run(file_assignment(data, model="sha256"))
    (get,) = scene.ledger.gets()
    assert get.url.path == f"/v1/jobs/{JOB}/attempts/1/input"
    assert "Range" not in get.headers
    result = completed(reports).result
    assert isinstance(result, protocol.InlineResult)
    assert decoded(result) == hashlib.sha256(data).hexdigest().encode()


async def test_a_broken_fetch_resumes_where_it_stopped(tmp_path: Path) -> None:
    data = bytes(range(256)) * (3 * MIB // 256) + b"tail"
    scene = Scene(serve_input(data, break_after=2 * MIB), tmp_path)
    reports = await scene.run(file_assignment(data, model="echo", format="binary"))
    first, second = scene.ledger.gets()
    assert "Range" not in first.headers
    assert second.headers["Range"] == f"bytes={2 * MIB}-"
    # echo hands the fetched file back unchanged; it is too large to travel inline.
    (put,) = scene.ledger.puts()
    assert put.content == data
    assert completed(reports).result.sha256 == hashlib.sha256(data).hexdigest()


async def test_an_input_that_does_not_match_its_digest_is_corrupt(tmp_path: Path) -> None:
    data = b"the real input"
    scene = Scene(serve_input(b"something else"), tmp_path)
    reports = await scene.run(file_assignment(data, input_size_bytes=14))
    error = failed(reports)
    assert error.code == "input_corrupt"
    assert hashlib.sha256(data).hexdigest() in error.message
    assert scene.ledger.puts() == []


async def test_input_bytes_are_checked_even_without_an_etag(tmp_path: Path) -> None:
    async def no_etag(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"the fake input")

    scene = Scene(no_etag, tmp_path)
    error = failed(await scene.run(file_assignment(b"the real input")))
    assert error.code == "input_corrupt"
    assert "SHA-256" in error.message


async def test_an_input_of_the_wrong_size_is_corrupt(tmp_path: Path) -> None:
    data = b"the real input"
    scene = Scene(serve_input(data + b" and more"), tmp_path)
    error = failed(await scene.run(file_assignment(data, input_sha256=None)))
    assert error.code == "input_corrupt"


async def test_an_input_the_ledger_no_longer_gives_us_ends_without_a_report(
    tmp_path: Path,
) -> None:
    async def gone(request: httpx.Request) -> httpx.Response:
        return refused(404, "no such attempt")

    scene = Scene(gone, tmp_path)
    await scene.run(file_assignment(b"data"))
    assert scene.kinds() == ["started"]


async def test_an_input_unreachable_until_the_deadline_is_unavailable(tmp_path: Path) -> None:
    async def busy(request: httpx.Request) -> httpx.Response:
        return refused(503, "starting")

    scene = Scene(busy, tmp_path)
    deadline = datetime.now(UTC) + timedelta(seconds=0.3)
    error = failed(await scene.run(file_assignment(b"data", deadline=deadline)))
    assert error.code == "input_unavailable"
    assert "503" in error.message
    assert len(scene.ledger.gets()) > 1, "it was retried"


async def test_a_rejected_upload_fails_with_the_ledgers_reason(tmp_path: Path) -> None:
    async def rejecting(request: httpx.Request) -> httpx.Response:
        return refused(422, "a text result must be UTF-8 text; byte 3 is not")

    scene = Scene(rejecting, tmp_path)
    reports = await scene.run(assignment(destination="s3://bucket/out"))
    error = failed(reports)
    assert (error.code, error.message) == (
        "result_rejected",
        "a text result must be UTF-8 text; byte 3 is not",
    )
    assert reports[-1].metrics is not None  # type: ignore[union-attr]


async def test_an_upload_is_retried_while_the_ledger_is_unavailable(tmp_path: Path) -> None:
    answers = [refused(503, "busy"), refused(502, "bad gateway")]

    async def flaky(request: httpx.Request) -> httpx.Response:
        return answers.pop(0) if answers else stored(request)

    scene = Scene(flaky, tmp_path)
    reports = await scene.run(assignment(input="héllo", destination="s3://bucket/out"))
    puts = scene.ledger.puts()
    assert len(puts) == 3
    assert all(put.content == "héllo".encode() for put in puts)
    assert isinstance(completed(reports).result, protocol.StoredResult)


async def test_an_upload_the_ledger_no_longer_takes_ends_without_a_report(
    tmp_path: Path,
) -> None:
    async def gone(request: httpx.Request) -> httpx.Response:
        return refused(404, "no such attempt")

    scene = Scene(gone, tmp_path)
    await scene.run(assignment(destination="s3://bucket/out"))
    assert scene.kinds() == ["started"]


async def test_output_not_in_the_jobs_format_is_invalid_output(tmp_path: Path) -> None:
    scene = Scene(nothing, tmp_path)
    error = failed(await scene.run(assignment(model="not_utf8", format="text")))
    assert error.code == "invalid_output"


async def test_an_executor_crash_fails_the_attempt(tmp_path: Path) -> None:
    scene = Scene(nothing, tmp_path)
    error = failed(await scene.run(assignment(model="crash")))
    assert (error.code, error.message) == ("executor_crashed", "RuntimeError: boom")


async def test_a_cancel_interrupts_a_fetch_promptly(tmp_path: Path) -> None:
    async def stalling(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Stream(b"some", then="stall"))

    scene = Scene(stalling, tmp_path)
    attempt = Attempt(file_assignment(b"some bytes"), ())
    task = asyncio.create_task(scene.runner.run(attempt))
    while not scene.ledger.gets():
        await asyncio.sleep(0.01)
    attempt.stop_as = "canceled"
    task.cancel()
    await asyncio.wait_for(task, 2)
    assert scene.kinds() == ["started", "canceled"]
    assert list(tmp_path.iterdir()) == []
    await scene.api.aclose()


async def test_a_release_interrupts_an_upload_promptly(tmp_path: Path) -> None:
    async def stalling(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    scene = Scene(stalling, tmp_path)
    attempt = Attempt(assignment(destination="s3://bucket/out"), ())
    task = asyncio.create_task(scene.runner.run(attempt))
    while not scene.ledger.puts():
        await asyncio.sleep(0.01)
    attempt.stop_as = "released"
    task.cancel()
    await asyncio.wait_for(task, 2)
    assert scene.kinds() == ["started", "released"]
    assert list(tmp_path.iterdir()) == []
    await scene.api.aclose()


def test_leftovers_of_earlier_runs_are_cleared(tmp_path: Path) -> None:
    work_dir = tmp_path / "miner-work" / "miner_x"
    (work_dir / f"{JOB}-1-abcd" / "output").mkdir(parents=True)
    (work_dir / f"{JOB}-1-abcd" / "input").write_bytes(b"old")
    (work_dir / "stray").write_bytes(b"x")
    clear_work_dir(work_dir)
    assert work_dir.is_dir()
    assert list(work_dir.iterdir()) == []
    clear_work_dir(tmp_path / "new")
    assert (tmp_path / "new").is_dir()


# ---- receipts ------------------------------------------------------------------------


def verified_receipt(report: protocol.Completed, key: Ed25519PrivateKey) -> None:
    """The completion's receipt verifies with `key` and vouches for exactly this report."""
    assert report.receipt is not None
    claims = verify_receipt(report.receipt, raw_public_key(key))
    check_claims(
        claims,
        job_id=JOB,
        attempt=report.attempt,
        miner_id=report.miner_id,
        result_sha256=report.result.sha256,
        result_size_bytes=report.result.size_bytes,
    )
    assert claims.metrics == report.metrics
    assert claims.started_at <= claims.finished_at <= report.at
    assert claims.started_at.tzinfo is not None


async def test_a_completion_carries_a_receipt_that_verifies(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    scene = Scene(nothing, tmp_path, key)
    report = completed(await scene.run(assignment(input="héllo")))
    assert isinstance(report.result, protocol.InlineResult)
    verified_receipt(report, key)
    # What travels is what verifies: the receipt survives the wire unchanged.
    decoded = protocol.report_decoder.decode(protocol.encoder.encode(report))
    assert decoded == report


async def test_a_stored_results_completion_carries_a_receipt_that_verifies(
    tmp_path: Path,
) -> None:
    key = Ed25519PrivateKey.generate()
    scene = Scene(serve_input(b""), tmp_path, key)
    report = completed(await scene.run(assignment(input="héllo", destination="s3://b/out")))
    assert isinstance(report.result, protocol.StoredResult)
    verified_receipt(report, key)


async def test_without_a_key_completions_go_unsigned(tmp_path: Path) -> None:
    report = completed(await Scene(nothing, tmp_path).run(assignment()))
    assert report.receipt is None


def test_the_receipt_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "keys" / "miner_x.ed25519"
    key = load_or_create_receipt_key(path)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no partial file is left"
    again = load_or_create_receipt_key(path)
    assert raw_public_key(again) == raw_public_key(key)


def test_a_key_file_that_is_not_an_ed25519_key_stops_the_agent(tmp_path: Path) -> None:
    path = tmp_path / "miner_x.ed25519"
    path.write_bytes(b"not a key")
    with pytest.raises(AgentError, match="delete it"):
        load_or_create_receipt_key(path)


def test_the_key_lives_outside_the_directory_emptied_at_start(tmp_path: Path) -> None:
    work = tmp_path / "work"
    default = AgentConfig(api_url="http://x", nats_urls=["nats://x"], key="k", work_dir=work)
    path = receipt_key_path(default, "miner_x")
    assert path == work / "keys" / "miner_x.ed25519"
    load_or_create_receipt_key(path)
    clear_work_dir(work / "miner_x")
    assert path.exists()
    chosen = AgentConfig(
        api_url="http://x",
        nats_urls=["nats://x"],
        key="k",
        work_dir=work,
        receipt_key_dir=tmp_path / "secrets",
    )
    assert receipt_key_path(chosen, "miner_x") == tmp_path / "secrets" / "miner_x.ed25519"


class KeyRoutes:
    """GET and POST /v1/miners/miner_x/keys of a fake ledger, which remembers keys."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.keys: dict[str, dict[str, str]] = {}
        self.refuse = refuse
        self.posts: list[dict[str, Any]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/miners/miner_x/keys"
        if request.method == "GET":
            return httpx.Response(200, json={"keys": list(self.keys.values())})
        body = json.loads(request.content)
        self.posts.append(body)
        if self.refuse:
            return refused(409, "key was revoked and cannot be registered again")
        raw = base64.b64decode(body["public_key"])
        key = {"key_id": key_id_of(raw), "public_key": body["public_key"], "status": "active"}
        self.keys[key["key_id"]] = key
        return httpx.Response(201, json=key)


async def agent_key(tmp_path: Path, routes: KeyRoutes) -> tuple[Ed25519PrivateKey, Path]:
    config = AgentConfig(api_url="http://x", nats_urls=["nats://x"], key="k", work_dir=tmp_path)
    agent = MinerAgent(config, ExecutorRegistry(), None, [])
    agent.miner_id = "miner_x"
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(routes), base_url="http://ledger"
    ) as api:
        key = await agent.receipt_key(api)
    return key, receipt_key_path(config, "miner_x")


async def test_the_agent_registers_its_key_once(tmp_path: Path) -> None:
    routes = KeyRoutes()
    key, path = await agent_key(tmp_path, routes)
    assert routes.posts == [{"public_key": encode_public_key(raw_public_key(key))}]
    assert path.exists()

    # Restarted: the same key from its file, already active, so nothing is posted.
    again, _ = await agent_key(tmp_path, routes)
    assert raw_public_key(again) == raw_public_key(key)
    assert len(routes.posts) == 1


async def test_a_revoked_key_stops_the_agent_saying_what_to_delete(tmp_path: Path) -> None:
    routes = KeyRoutes(refuse=True)
    with pytest.raises(AgentError, match=r"revoked; delete .*miner_x\.ed25519"):
        await agent_key(tmp_path, routes)
