"""The built-in executors and the registry that finds them through entry points."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
import tracemalloc
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

from app.miner import executors
from app.miner.executors import (
    Echo,
    ExecutionContext,
    Executor,
    ExecutorError,
    ExecutorRegistry,
    Fail,
    Matmul,
    Output,
    Sha256,
    Sleep,
    Stopped,
    input_text,
    run_stoppable,
)


def context(
    input: str | None = None,
    *,
    model: str = "test",
    timeout_seconds: int = 60,
    progress: list[int] | None = None,
    input_file_id: str | None = None,
    input_path: Path | None = None,
    work_dir: Path = Path("unused-work-dir"),
) -> ExecutionContext:
    reported = progress if progress is not None else []
    return ExecutionContext(
        job_id="job-1",
        attempt=1,
        model=model,
        input=input,
        input_file_id=input_file_id,
        input_path=input_path,
        work_dir=work_dir,
        timeout_seconds=timeout_seconds,
        gpu_indices=(0,),
        progress=reported.append,
    )


# ---- registry ----------------------------------------------------------------


def test_the_registry_finds_every_built_in_through_entry_points() -> None:
    registry = ExecutorRegistry.from_entry_points()
    assert {"echo", "sleep", "sha256", "fail", "matmul"} <= set(registry.names())
    assert registry.names() == sorted(registry.names())
    assert isinstance(registry.get("echo"), Echo)
    assert isinstance(registry.get("matmul"), Matmul)
    assert registry.get("no-such-model") is None


def test_a_broken_entry_point_is_logged_and_skipped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    group = executors.ENTRY_POINT_GROUP
    declared = [
        EntryPoint(name="echo", value="app.miner.executors:Echo", group=group),
        EntryPoint(name="broken", value="app.miner.no_such_module:Thing", group=group),
        EntryPoint(name="not_an_executor", value="collections:OrderedDict", group=group),
    ]

    def entry_points(*, group: str) -> list[EntryPoint]:
        return [e for e in declared if e.group == group]

    monkeypatch.setattr(executors, "entry_points", entry_points)
    with caplog.at_level(logging.WARNING, logger="jobledger.miner.executors"):
        registry = ExecutorRegistry.from_entry_points()
    assert registry.names() == ["echo"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("'broken'" in m for m in messages)
    assert any("'not_an_executor'" in m for m in messages)
    broken = next(r for r in caplog.records if "'broken'" in r.getMessage())
    assert broken.exc_info is not None


async def test_register_adds_an_executor() -> None:
    class Upper:
        async def run(self, context: ExecutionContext) -> Output:
            return Output(data=(context.input or "").upper().encode())

    registry = ExecutorRegistry()
    registry.register("upper", Upper())
    executor = registry.get("upper")
    assert executor is not None
    assert isinstance(executor, Executor)
    assert (await executor.run(context("abc"))).data == b"ABC"
    assert registry.names() == ["upper"]


# ---- errors ------------------------------------------------------------------


def test_executor_error_codes_are_machine_readable() -> None:
    error = ExecutorError("bad_thing", "Something bad happened.")
    assert error.code == "bad_thing"
    assert error.message == str(error) == "Something bad happened."
    assert error.error_info().code == "bad_thing"
    with pytest.raises(ValueError):
        ExecutorError("Bad Thing", "codes are snake_case")


# ---- echo, sha256, fail --------------------------------------------------------


async def test_echo_returns_its_input() -> None:
    output = await Echo().run(context("héllo wörld"))
    assert output.data == "héllo wörld".encode()
    assert output.content_type == "text/plain; charset=utf-8"


async def test_echo_without_input_is_missing_input() -> None:
    with pytest.raises(ExecutorError) as raised:
        await Echo().run(context(None, input_file_id="file-1"))
    assert raised.value.code == "missing_input"
    assert "file-1" in raised.value.message


@pytest.mark.parametrize("text", ["", "héllo", "x" * 1_000_000])
async def test_sha256_matches_hashlib(text: str) -> None:
    output = await Sha256().run(context(text))
    assert output.data.decode() == hashlib.sha256(text.encode()).hexdigest()
    assert output.content_type.startswith("text/plain")


async def test_fail_fails_with_the_input_as_message() -> None:
    with pytest.raises(ExecutorError) as raised:
        await Fail().run(context("the disk is on fire"))
    assert raised.value.code == "requested_failure"
    assert raised.value.message == "the disk is on fire"
    with pytest.raises(ExecutorError, match="failed as asked"):
        await Fail().run(context(None))


# ---- file inputs ---------------------------------------------------------------


@pytest.fixture
def ten_mib_file(tmp_path: Path) -> Path:
    path = tmp_path / "input"
    block = bytes(range(256)) * 4096  # 1 MiB, not UTF-8
    with path.open("wb") as file:
        for index in range(10):
            file.write(bytes([index]) + block[1:])
    return path


def file_context(path: Path, **changes: Any) -> ExecutionContext:
    return context(None, input_file_id="file_1", input_path=path, work_dir=path.parent, **changes)


async def test_echo_returns_an_input_file_as_itself(ten_mib_file: Path) -> None:
    tracemalloc.start()
    try:
        output = await Echo().run(file_context(ten_mib_file))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (output.path, output.data) == (ten_mib_file, b"")
    assert output.content_type == "application/octet-stream"
    assert peak < 1024 * 1024


async def test_sha256_hashes_an_input_file_from_disk(ten_mib_file: Path) -> None:
    tracemalloc.start()
    try:
        output = await Sha256().run(file_context(ten_mib_file))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert output.data.decode() == hashlib.sha256(ten_mib_file.read_bytes()).hexdigest()
    assert output.content_type.startswith("text/plain")
    assert peak < 4 * 1024 * 1024, "the file is hashed in chunks, not loaded"


async def test_sha256_without_any_input_is_missing_input() -> None:
    with pytest.raises(ExecutorError) as raised:
        await Sha256().run(context(None))
    assert raised.value.code == "missing_input"


async def test_input_text_prefers_the_inline_text(tmp_path: Path) -> None:
    path = tmp_path / "input"
    path.write_text("from the file")
    assert await input_text(context("inline", input_path=path)) == "inline"
    assert await input_text(context(None, input_path=path)) == "from the file"


async def test_input_text_reads_a_file_up_to_its_limit(tmp_path: Path) -> None:
    path = tmp_path / "input"
    path.write_text("é" * 50)  # 100 bytes
    assert await input_text(context(None, input_path=path), limit=100) == "é" * 50
    with pytest.raises(ExecutorError) as raised:
        await input_text(context(None, input_path=path), limit=99)
    assert raised.value.code == "invalid_input"
    assert "at most 99 bytes" in raised.value.message
    assert "100 bytes" in raised.value.message


async def test_input_text_refuses_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "input"
    path.write_bytes(b"caf\xe9")
    with pytest.raises(ExecutorError) as raised:
        await input_text(context(None, input_path=path))
    assert raised.value.code == "invalid_input"
    assert "UTF-8" in raised.value.message


async def test_input_text_default_limit_is_one_mib(ten_mib_file: Path) -> None:
    with pytest.raises(ExecutorError) as raised:
        await input_text(file_context(ten_mib_file))
    assert raised.value.code == "invalid_input"
    assert f"at most {1024 * 1024} bytes" in raised.value.message


async def test_input_text_without_input_is_missing_input() -> None:
    with pytest.raises(ExecutorError) as raised:
        await input_text(context(None, input_file_id="file_9"))
    assert raised.value.code == "missing_input"
    assert "file_9" in raised.value.message


async def test_text_executors_read_their_input_file(tmp_path: Path) -> None:
    path = tmp_path / "input"
    path.write_text("0.05\n")
    output = await Sleep().run(context(None, input_path=path))
    assert json.loads(output.data) == {"slept_seconds": 0.05}
    path.write_text("the file says no")
    with pytest.raises(ExecutorError, match="the file says no"):
        await Fail().run(context(None, input_path=path))
    path.write_text('{"size": 0}')
    with pytest.raises(ExecutorError) as raised:
        await Matmul().run(context(None, input_path=path))
    assert raised.value.code == "invalid_input"


def test_an_output_is_bytes_or_a_file_not_both(tmp_path: Path) -> None:
    assert Output(b"x").path is None
    assert Output(path=tmp_path).data == b""
    with pytest.raises(ValueError, match="not both"):
        Output(b"x", path=tmp_path)


async def test_cancelled_thread_work_is_stopped_before_the_caller_unwinds() -> None:
    steps: list[int] = []
    finished = threading.Event()

    def work(stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                steps.append(len(steps))
                time.sleep(0.01)
            raise Stopped
        finally:
            finished.set()

    task = asyncio.create_task(run_stoppable(work))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set(), "the thread ended before the cancelled call returned"
    assert steps


async def test_thread_work_returns_its_result() -> None:
    assert await run_stoppable(lambda stop: 6 * 7) == 42


# ---- sleep ---------------------------------------------------------------------


async def test_sleep_reports_increasing_progress_and_returns() -> None:
    progress: list[int] = []
    output = await Sleep().run(context("0.3", progress=progress))
    assert json.loads(output.data) == {"slept_seconds": 0.3}
    assert output.content_type == "application/json"
    assert len(progress) >= 3
    assert progress == sorted(progress)
    assert all(0 <= p <= 100 for p in progress)
    assert progress[-1] == 100
    assert len(set(progress)) >= 3, "progress should move in steps, not jump to the end"


async def test_sleep_zero_returns_at_once() -> None:
    output = await Sleep().run(context("0"))
    assert json.loads(output.data) == {"slept_seconds": 0.0}


async def test_sleep_stops_promptly_when_cancelled() -> None:
    progress: list[int] = []
    task = asyncio.create_task(Sleep().run(context("30", progress=progress)))
    await asyncio.sleep(0.2)
    assert not task.done()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done
    assert task.cancelled()
    assert max(progress) < 100


@pytest.mark.parametrize("text", ["-1", "soon", "nan", "inf", ""])
async def test_sleep_rejects_invalid_durations(text: str) -> None:
    with pytest.raises(ExecutorError) as raised:
        await Sleep().run(context(text, timeout_seconds=60))
    assert raised.value.code == "invalid_input"


async def test_sleep_without_input_is_missing_input() -> None:
    with pytest.raises(ExecutorError) as raised:
        await Sleep().run(context(None))
    assert raised.value.code == "missing_input"


# ---- matmul --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"size": 0}',
        '{"size": 32769}',
        '{"iterations": 0}',
        '{"iterations": 1001}',
        '{"size": "big"}',
        '{"sise": 10}',
        "not json",
        "[1, 2]",
    ],
)
async def test_matmul_rejects_invalid_input(text: str) -> None:
    with pytest.raises(ExecutorError) as raised:
        await Matmul().run(context(text))
    assert raised.value.code == "invalid_input"


async def test_matmul_runs_on_a_gpu_or_says_why_it_cannot() -> None:
    progress: list[int] = []
    try:
        output = await Matmul().run(context('{"size": 64, "iterations": 2}', progress=progress))
    except ExecutorError as error:
        assert error.code == "gpu_unavailable"
        assert "torch" in error.message
        assert "cupy" in error.message
        return
    result: dict[str, Any] = json.loads(output.data)
    assert result["size"] == 64
    assert result["iterations"] == 2
    assert result["seconds"] > 0
    assert result["tflops"] > 0
    assert result["device"].startswith("cuda:")
    assert progress[-1] == 100
