"""Executors: what a miner runs for a job, chosen by the job's `model`.

Executors are found through the `jobledger.executors` entry point group, so another
package can add models without touching this one. Cancellation is asyncio task
cancellation: an executor must give way promptly at every await, so long CPU or GPU
work runs in threads, in steps, checking between them (`run_stoppable`).

Inputs and outputs may be files of any size: a file input arrives as `input_path`
(fetched by the agent before the executor starts), and an executor may write its
output to a file in `work_dir` and return its path instead of the bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Final, Protocol, TypeVar, runtime_checkable

import msgspec

from app.protocol import ErrorInfo

log = logging.getLogger("jobledger.miner.executors")

ENTRY_POINT_GROUP: Final = "jobledger.executors"
TEXT_PLAIN: Final = "text/plain; charset=utf-8"
APPLICATION_JSON: Final = "application/json"
APPLICATION_OCTET_STREAM: Final = "application/octet-stream"
# How much of a file blocking work reads (or writes) at a time between checks of its stop event.
CHUNK_BYTES: Final = 1024 * 1024
# The largest input file `input_text` reads into memory unless told otherwise.
INPUT_TEXT_LIMIT: Final = 1024 * 1024

_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Inputs larger than this are hashed in a thread so the event loop keeps running.
_HASH_IN_THREAD_BYTES: Final = 64 * 1024


class ExecutorError(Exception):
    """An attempt failed for a reason the executor understands: a stable code and a sentence."""

    def __init__(self, code: str, message: str) -> None:
        if not _ERROR_CODE.fullmatch(code):
            raise ValueError(f"executor error code {code!r} must be lowercase snake_case")
        super().__init__(message)
        self.code = code
        self.message = message

    def error_info(self) -> ErrorInfo:
        """The error as the failure report carries it."""
        return ErrorInfo(code=self.code, message=self.message)


@dataclass(frozen=True, slots=True)
class Output:
    """An attempt's result and its media type: bytes in memory, or a file the executor wrote.

    Give `data` for small results, or `path` (with `data` left empty) for a file of any
    size, usually in the context's `work_dir`; the agent reads it from disk in chunks.
    """

    data: bytes = b""
    content_type: str = APPLICATION_OCTET_STREAM
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.path is not None and self.data:
            raise ValueError("an Output carries its bytes in data or in the file at path, not both")


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionContext:
    """Everything an executor learns about the attempt it runs."""

    job_id: str
    attempt: int
    model: str
    # The input text; None when the input is a file (input_path) or when there is none.
    input: str | None
    input_file_id: str | None
    # The fetched input file, size and SHA-256 already checked; None for text inputs.
    input_path: Path | None = None
    # A private, empty directory for this attempt, removed when it ends: write outputs here.
    work_dir: Path
    timeout_seconds: int
    # NVML indices of the GPUs given to this attempt; empty when it has none.
    gpu_indices: tuple[int, ...]
    # Called with a percent 0..100, from any thread, as often as the executor likes;
    # the agent rate-limits it and drops values that go backwards.
    progress: Callable[[int], None]


@runtime_checkable
class Executor(Protocol):
    """Runs one attempt of a job to its output; cancelled by cancelling the task."""

    async def run(self, context: ExecutionContext) -> Output:
        """The attempt's output, or ExecutorError saying why there is none."""
        ...


_T = TypeVar("_T")


class Stopped(Exception):
    """Blocking work in a thread saw its stop event set and gave up early."""


async def run_stoppable(work: Callable[[threading.Event], _T]) -> _T:
    """Run blocking `work(stop)` in a thread; if cancelled, set `stop` and wait for the thread.

    `work` should check `stop` between steps (raising Stopped). Waiting for it means
    nothing it writes outlives the caller's clean-up, such as removing the work dir.
    """
    stop = threading.Event()
    future = asyncio.ensure_future(asyncio.to_thread(work, stop))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait({future})
        error = None if future.cancelled() else future.exception()
        if error is not None and not isinstance(error, Stopped):
            log.warning("work in a thread failed while being stopped", exc_info=error)
        raise


def has_input(context: ExecutionContext) -> bool:
    """True if the attempt has an input: text, or a fetched file."""
    return context.input is not None or context.input_path is not None


def _missing_input(context: ExecutionContext) -> ExecutorError:
    """The error for an executor that needs an input the job does not have."""
    message = f"model {context.model!r} needs an input; the job has none"
    if context.input_file_id:
        message += f" (its input is the uploaded file {context.input_file_id}, not fetched)"
    return ExecutorError("missing_input", message)


def _read_text_file(path: Path, limit: int) -> str:
    """A file's content as UTF-8 text, or ExecutorError("invalid_input") saying why not."""
    with path.open("rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        size = path.stat().st_size
        raise ExecutorError(
            "invalid_input",
            f"this model reads its input as text of at most {limit} bytes; "
            f"the input file has {size} bytes",
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ExecutorError(
            "invalid_input",
            f"this model reads its input as UTF-8 text; byte {error.start} of the input "
            "file is not UTF-8",
        ) from None


async def input_text(context: ExecutionContext, limit: int = INPUT_TEXT_LIMIT) -> str:
    """The input as text: the inline text, or the input file (at most `limit` bytes) as UTF-8.

    Raises ExecutorError "missing_input" without an input, "invalid_input" for a file
    that is too large or not UTF-8.
    """
    if context.input is not None:
        return context.input
    if context.input_path is None:
        raise _missing_input(context)
    return await asyncio.to_thread(_read_text_file, context.input_path, limit)


def _file_sha256(path: Path, stop: threading.Event) -> str:
    """The hex SHA-256 of a file, read in chunks; raises Stopped once `stop` is set."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            if stop.is_set():
                raise Stopped
            digest.update(chunk)
    return digest.hexdigest()


class Echo:
    """Returns its input unchanged: the smallest job there is, for trying the pipeline."""

    async def run(self, context: ExecutionContext) -> Output:
        """Input text as UTF-8 text; an input file as itself (its path, never read into memory)."""
        if context.input is not None:
            return Output(data=context.input.encode(), content_type=TEXT_PLAIN)
        if context.input_path is not None:
            return Output(path=context.input_path, content_type=APPLICATION_OCTET_STREAM)
        raise _missing_input(context)


class Sleep:
    """Sleeps for the number of seconds given as input, reporting progress as it goes."""

    async def run(self, context: ExecutionContext) -> Output:
        """`{"slept_seconds": X}` after sleeping X seconds, unless cancelled first."""
        text = await input_text(context)
        try:
            seconds = float(text.strip())
        except ValueError:
            raise ExecutorError(
                "invalid_input", f"sleep needs a number of seconds as input, not {text[:80]!r}"
            ) from None
        # Longer than the job's timeout is allowed: that is how one watches a timeout work.
        if not math.isfinite(seconds) or seconds < 0:
            raise ExecutorError(
                "invalid_input",
                f"sleep takes a finite number of seconds >= 0, not {text.strip()[:80]}",
            )
        # About 1% of the time per step, so progress moves in whole percents, within 0.1..1 s.
        step = min(1.0, max(0.1, seconds / 100))
        loop = asyncio.get_running_loop()
        started = loop.time()
        context.progress(0)
        while (elapsed := loop.time() - started) < seconds:
            await asyncio.sleep(min(step, seconds - elapsed))
            done = (loop.time() - started) / seconds
            context.progress(min(100, int(100 * done)))
        context.progress(100)
        return Output(
            data=msgspec.json.encode({"slept_seconds": seconds}), content_type=APPLICATION_JSON
        )


class Sha256:
    """Returns the hex SHA-256 of the input: the text's UTF-8 bytes, or the file's bytes."""

    async def run(self, context: ExecutionContext) -> Output:
        """The digest as text."""
        if context.input is None:
            if context.input_path is None:
                raise _missing_input(context)
            path = context.input_path
            digest = await run_stoppable(lambda stop: _file_sha256(path, stop))
            return Output(data=digest.encode(), content_type=TEXT_PLAIN)
        data = context.input.encode()
        if len(data) > _HASH_IN_THREAD_BYTES:
            digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        else:
            digest = hashlib.sha256(data).hexdigest()
        return Output(data=digest.encode(), content_type=TEXT_PLAIN)


class Fail:
    """Always fails, with the input as its message: for testing how failures travel."""

    async def run(self, context: ExecutionContext) -> Output:
        """Never returns; raises ExecutorError("requested_failure")."""
        message = await input_text(context) if has_input(context) else ""
        raise ExecutorError("requested_failure", message or "failed as asked")


class MatmulParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The matmul benchmark's input: square matrix size and how many products to time."""

    size: Annotated[int, msgspec.Meta(ge=1, le=32768)] = 4096
    iterations: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10


_matmul_params_decoder = msgspec.json.Decoder(MatmulParams)


class MatmulResult(msgspec.Struct, frozen=True):
    """What the matmul benchmark measured."""

    size: int
    iterations: int
    seconds: float
    tflops: float
    device: str
    backend: str


# A benchmark run in a thread: (size, iterations, device index, progress, stop) -> result.
_Benchmark = Callable[[int, int, int, Callable[[int], None], threading.Event], MatmulResult]


def _tflops(size: int, iterations: int, seconds: float) -> float:
    """Throughput of `iterations` products of two size x size matrices (2n^3 flops each)."""
    return 2 * size**3 * iterations / seconds / 1e12 if seconds > 0 else 0.0


def _out_of_memory(size: int, index: int) -> ExecutorError:
    """The error for matrices too big for the GPU."""
    return ExecutorError(
        "gpu_out_of_memory", f"three {size}x{size} float32 matrices do not fit on cuda:{index}"
    )


def _torch_benchmark(torch: Any) -> _Benchmark:
    """The benchmark on torch's CUDA device."""

    def timed(
        size: int,
        iterations: int,
        device: Any,
        progress: Callable[[int], None],
        stop: threading.Event,
    ) -> float:
        """Seconds for `iterations` synchronised products; the matrices are freed on return."""
        left = torch.randn(size, size, device=device, dtype=torch.float32)
        right = torch.randn(size, size, device=device, dtype=torch.float32)
        # One untimed product warms cuBLAS up.
        torch.matmul(left, right)
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        for done in range(1, iterations + 1):
            if stop.is_set():
                raise Stopped
            torch.matmul(left, right)
            torch.cuda.synchronize(device)
            progress(100 * done // iterations)
        return time.perf_counter() - started

    def run(
        size: int,
        iterations: int,
        index: int,
        progress: Callable[[int], None],
        stop: threading.Event,
    ) -> MatmulResult:
        device = torch.device("cuda", index)
        try:
            seconds = timed(size, iterations, device, progress, stop)
        except torch.cuda.OutOfMemoryError as error:
            raise _out_of_memory(size, index) from error
        finally:
            # Hand the cached blocks back so the next job (and nvidia-smi) sees free memory.
            torch.cuda.empty_cache()
        return MatmulResult(
            size=size,
            iterations=iterations,
            seconds=seconds,
            tflops=_tflops(size, iterations, seconds),
            device=f"cuda:{index} {torch.cuda.get_device_name(index)}",
            backend="torch",
        )

    return run


def _cupy_benchmark(cupy: Any) -> _Benchmark:
    """The benchmark on cupy's CUDA device."""

    def timed(
        size: int,
        iterations: int,
        device: Any,
        progress: Callable[[int], None],
        stop: threading.Event,
    ) -> float:
        """Seconds for `iterations` synchronised products; the matrices are freed on return."""
        left = cupy.random.standard_normal((size, size), dtype=cupy.float32)
        right = cupy.random.standard_normal((size, size), dtype=cupy.float32)
        # One untimed product warms cuBLAS up.
        cupy.matmul(left, right)
        device.synchronize()
        started = time.perf_counter()
        for done in range(1, iterations + 1):
            if stop.is_set():
                raise Stopped
            cupy.matmul(left, right)
            device.synchronize()
            progress(100 * done // iterations)
        return time.perf_counter() - started

    def run(
        size: int,
        iterations: int,
        index: int,
        progress: Callable[[int], None],
        stop: threading.Event,
    ) -> MatmulResult:
        with cupy.cuda.Device(index) as device:
            try:
                seconds = timed(size, iterations, device, progress, stop)
            except cupy.cuda.memory.OutOfMemoryError as error:
                raise _out_of_memory(size, index) from error
            finally:
                cupy.get_default_memory_pool().free_all_blocks()
        name = _decoded(cupy.cuda.runtime.getDeviceProperties(index)["name"])
        return MatmulResult(
            size=size,
            iterations=iterations,
            seconds=seconds,
            tflops=_tflops(size, iterations, seconds),
            device=f"cuda:{index} {name}",
            backend="cupy",
        )

    return run


def _decoded(value: str | bytes) -> str:
    """Text from a library that may hand back bytes."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _import_optional(name: str) -> ModuleType | str:
    """The module, or why it cannot be imported (it is not a dependency of jobledger)."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        return f"{name} is not installed ({error})"


def _find_benchmark(index: int) -> _Benchmark:
    """torch's benchmark if torch sees a CUDA GPU, else cupy's, else ExecutorError."""
    reasons = []
    torch = _import_optional("torch")
    if isinstance(torch, str):
        reasons.append(torch)
    elif not torch.cuda.is_available():
        reasons.append("torch is installed but sees no CUDA GPU")
    elif index >= torch.cuda.device_count():
        reasons.append(f"torch sees {torch.cuda.device_count()} CUDA GPUs, not GPU {index}")
    else:
        return _torch_benchmark(torch)
    cupy = _import_optional("cupy")
    if isinstance(cupy, str):
        reasons.append(cupy)
    else:
        try:
            count = int(cupy.cuda.runtime.getDeviceCount())
        except cupy.cuda.runtime.CUDARuntimeError as error:
            reasons.append(f"cupy is installed but CUDA is not usable ({error})")
        else:
            if index < count:
                return _cupy_benchmark(cupy)
            reasons.append(f"cupy sees {count} CUDA GPUs, not GPU {index}")
    raise ExecutorError(
        "gpu_unavailable",
        "matmul needs torch or cupy with a CUDA GPU; neither is usable here: " + "; ".join(reasons),
    )


class Matmul:
    """A real GPU benchmark: times float32 matrix products with torch, else cupy."""

    async def run(self, context: ExecutionContext) -> Output:
        """The measured seconds and TFLOPS as JSON."""
        text = (await input_text(context)).strip() if has_input(context) else ""
        try:
            params = _matmul_params_decoder.decode(text) if text else MatmulParams()
        except msgspec.DecodeError as error:
            raise ExecutorError(
                "invalid_input",
                'matmul takes optional JSON like {"size": 4096, "iterations": 10} '
                f"(size 1..32768, iterations 1..1000): {error}",
            ) from None
        # CUDA may number devices differently from NVML unless CUDA_DEVICE_ORDER=PCI_BUS_ID.
        index = context.gpu_indices[0] if context.gpu_indices else 0
        # Importing torch takes seconds; keep it off the event loop.
        benchmark = await asyncio.to_thread(_find_benchmark, index)
        stop = threading.Event()
        try:
            result = await asyncio.to_thread(
                benchmark, params.size, params.iterations, index, context.progress, stop
            )
        except asyncio.CancelledError:
            # The thread cannot be interrupted; it stops before its next product.
            stop.set()
            raise
        return Output(data=msgspec.json.encode(result), content_type=APPLICATION_JSON)


class ExecutorRegistry:
    """The executors a miner can run, by model name."""

    def __init__(self) -> None:
        self._executors: dict[str, Executor] = {}

    @classmethod
    def from_entry_points(cls, group: str = ENTRY_POINT_GROUP) -> ExecutorRegistry:
        """Every executor the installed packages declare; one that fails to load is skipped."""
        registry = cls()
        for entry_point in entry_points(group=group):
            try:
                executor = entry_point.load()()
            except Exception:
                # A broken plug-in must not stop the miner from running the others.
                log.exception(
                    "executor %r (%s) could not be loaded; skipping it",
                    entry_point.name,
                    entry_point.value,
                )
                continue
            if not isinstance(executor, Executor):
                log.error(
                    "executor %r (%s) has no run() method; skipping it",
                    entry_point.name,
                    entry_point.value,
                )
                continue
            if entry_point.name in registry._executors:
                log.warning(
                    "executor %r is declared twice; %s replaces the earlier one",
                    entry_point.name,
                    entry_point.value,
                )
            registry.register(entry_point.name, executor)
        return registry

    def register(self, name: str, executor: Executor) -> None:
        """Run `executor` for jobs whose model is `name`, replacing any executor of that name."""
        self._executors[name] = executor

    def get(self, model: str) -> Executor | None:
        """The executor for `model`, or None if this miner has none."""
        return self._executors.get(model)

    def names(self) -> list[str]:
        """Every model this miner can run, sorted."""
        return sorted(self._executors)
