"""The miner agent: pulls assignments, runs executors, reports back, stays visibly alive.

Lifecycle (docs/protocol.md has the wire details):

1. Learn who it is: `GET /v1/miners/me` with its miner key (retried until the API answers).
2. Describe its hardware: GPUs from NVML, or the pseudo type it was told to offer;
   `PUT /v1/miners/{id}` when that differs from what the ledger has.
   Make sure its receipt key is registered and active (`GET`, else `POST
   /v1/miners/{id}/keys`): the Ed25519 key, kept in a PEM file, that signs every completion.
3. Pull assignments from its durable JetStream consumer, never more than it has free
   slots for; acknowledge each once it is held (listed in heartbeats), then run it.
4. Report started; fetch the input file over HTTP if the job has one; run the executor;
   report progress (at most once a second, only forward); package the output in the
   job's format and deliver it (inline for small local results, else uploaded); report
   completed (with a signed receipt) or failed. Reports go to JetStream with a
   Nats-Msg-Id, retried until stored.
5. Heartbeat every few seconds with what it holds; obey cancel orders from control.
6. On SIGTERM, drain: take nothing new, let running attempts finish for a while,
   then hand back (report `released`) what is still running, and exit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from app import protocol, receipts
from app.bus import NATS_DOWN, log_nats_error
from app.gpu import GpuProbe, GpuUsage, UsageSampler
from app.logs import bind_log_ids, log_context
from app.miner import transfer
from app.miner.executors import (
    ExecutionContext,
    Executor,
    ExecutorError,
    ExecutorRegistry,
    Output,
)
from app.miner.results import package
from app.protocol import Namespace
from app.tasks import cancel_all
from domain.gpus import normalize_gpu_type
from domain.miners import Capabilities

log = logging.getLogger("jobledger.miner")

ASSIGNMENT_ACK_WAIT_SECONDS = 30.0
CANCELED_EARLY_LIMIT = 10_000
# Touched in the work directory after each heartbeat published: a health check reads its age.
HEARTBEAT_FILE = "heartbeat-sent"
_API_RETRY_SECONDS = 2.0


class AgentError(Exception):
    """The agent cannot run as configured (bad key, no GPU and no --gpu-type, ...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """How one agent process runs; built by `jobledger miner` from flags and environment."""

    api_url: str
    nats_urls: list[str]
    key: str
    prefix: str = protocol.DEFAULT_PREFIX
    # Offer this GPU type instead of what NVML finds (required when it finds nothing).
    gpu_type: str | None = None
    gpu_count: int | None = None
    vram_gb: int | None = None
    max_concurrent: int | None = None
    heartbeat_seconds: float = 5.0
    progress_interval_seconds: float = 1.0
    # On SIGTERM, how long running attempts may take to finish before they are handed back.
    drain_seconds: float = 30.0
    # Where attempts keep their input, output and packaged result: large files go here.
    # Each miner uses work_dir/<miner_id>, emptied at start.
    work_dir: Path
    # Where the receipt signing key lives, as <dir>/<miner_id>.ed25519 (None: work_dir/keys).
    receipt_key_dir: Path | None = None


RECEIPT_KEY_SUFFIX = ".ed25519"


def receipt_key_path(config: AgentConfig, miner_id: str) -> Path:
    """The PEM file of a miner's receipt key; never inside the directory emptied at start."""
    directory = config.receipt_key_dir or config.work_dir / "keys"
    return directory / f"{miner_id}{RECEIPT_KEY_SUFFIX}"


def load_or_create_receipt_key(path: Path) -> Ed25519PrivateKey:
    """The receipt key in `path` (PKCS8 PEM); a new one, written with mode 0600, if none is."""
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        return _create_receipt_key(path)
    return _receipt_key_from(pem, path)


def _create_receipt_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Written whole under a private name, then linked into place: never half a key, and
    # an agent of the same miner starting at the same moment keeps the one that won.
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o600)  # whatever the umask
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
        os.link(partial, path)
    except FileExistsError:
        return _receipt_key_from(path.read_bytes(), path)
    finally:
        partial.unlink(missing_ok=True)
    log.info("created receipt key %s", path)
    return key


def _receipt_key_from(pem: bytes, path: Path) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        raise AgentError(
            f"{path} is not an unencrypted PEM private key ({error}); "
            "delete it to make a new receipt key"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AgentError(f"{path} holds a {type(key).__name__}, not an Ed25519 key; delete it")
    if path.stat().st_mode & 0o077:
        log.warning("receipt key %s is readable by other users; chmod 600 it", path)
    return key


def offered_capabilities(
    config: AgentConfig, gpus: list[protocol.GpuInfo], registered: dict[str, Any]
) -> Capabilities:
    """What this machine offers: its GPUs or its pseudo type, the rest as registered."""
    if config.gpu_type is not None:
        gpu_type = normalize_gpu_type(config.gpu_type)
        gpu_count = config.gpu_count or max(len(gpus), 1)
        vram_gb = config.vram_gb if config.vram_gb is not None else 0
    elif gpus:
        gpu_type = normalize_gpu_type(gpus[0].name)
        gpu_count = config.gpu_count or len(gpus)
        vram_gb = (
            config.vram_gb
            if config.vram_gb is not None
            else min(g.memory_total_mb for g in gpus) // 1024
        )
    else:
        raise AgentError(
            "no GPU found through NVML; to run anyway, say which GPU type to offer "
            "(--gpu-type cpu, or any type name for testing)"
        )
    return Capabilities(
        gpu_type=gpu_type,
        gpu_count=gpu_count,
        vram_gb=vram_gb,
        location=str(registered.get("location") or "unknown"),
        price_per_hour=Decimal(str(registered.get("price_per_hour", "0"))),
        max_concurrent=config.max_concurrent or int(registered.get("max_concurrent") or 1),
    )


@dataclass(slots=True)
class Attempt:
    """One attempt the agent holds, from the moment it is pulled until its last report."""

    assignment: protocol.Assignment
    gpu_indices: tuple[int, ...]
    task: asyncio.Task[None] | None = None
    progress: int = 0
    # Why the task is being stopped, decided before it is cancelled.
    stop_as: str | None = None
    # When the executor began (monotonic clock): execution time counts from here.
    began: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[str, int]:
        return (self.assignment.job_id, self.assignment.attempt)


# Sends one report of a job and returns once it is stored (JetStream, in the agent).
ReportSender = Callable[[str, protocol.Report], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptRunner:
    """Takes one held attempt to its last report: input, executor, result format, delivery."""

    miner_id: str
    registry: ExecutorRegistry
    # The agent's HTTP client for the ledger API (base URL and miner key set).
    api: httpx.AsyncClient
    report: ReportSender
    # This miner's directory for attempts; each gets a private directory inside it.
    work_dir: Path
    probe: GpuProbe | None = None
    progress_interval_seconds: float = 1.0
    transfer_retry_seconds: float = transfer.FIRST_RETRY_SECONDS
    # Signs each completion's receipt; None sends completions unsigned (a miner without keys).
    receipt_key: Ed25519PrivateKey | None = None

    async def run(self, attempt: Attempt) -> None:
        """Run the attempt and report its end; stopped, it reports canceled or released.

        If the ledger says the attempt is no longer this miner's (404 on a transfer),
        it stops without a last report. Its directory is removed however it ends.
        """
        assignment = attempt.assignment
        job_id, number = attempt.key
        directory = self.work_dir / _attempt_dir_name(job_id, number)
        pump: asyncio.Task[None] | None = None
        sampler = UsageSampler(self.probe, attempt.gpu_indices)
        try:
            executor = self.registry.get(assignment.model)
            if executor is None:
                known = ", ".join(self.registry.names())
                error = ExecutorError(
                    "unknown_model",
                    f"no executor for model {assignment.model!r} on this miner; it runs: {known}",
                )
                await self.report(job_id, self._failed(number, error, None))
                return
            started = protocol.Started(miner_id=self.miner_id, attempt=number, at=datetime.now(UTC))
            await self.report(job_id, started)
            pump = asyncio.create_task(self._pump_progress(attempt))
            await asyncio.to_thread(_make_attempt_dir, directory)
            final = await self._conclude(attempt, executor, directory, sampler)
            pump.cancel()
            if final is not None:
                await self.report(job_id, final)
        except asyncio.CancelledError:
            await self._report_stopped(attempt)
        finally:
            if pump is not None:
                pump.cancel()
            await asyncio.to_thread(sampler.stop)
            await asyncio.to_thread(_remove_tree, directory)

    async def _conclude(
        self, attempt: Attempt, executor: Executor, directory: Path, sampler: UsageSampler
    ) -> protocol.Report | None:
        """The attempt's last report, or None if the ledger says it is no longer ours."""
        assignment = attempt.assignment
        job_id, number = attempt.key
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (assignment.deadline - datetime.now(UTC)).total_seconds()
        try:
            input_path = await self._fetch_input(assignment, directory, deadline)
        except transfer.AttemptGone as gone:
            log.info("%s attempt %d is no longer ours: %s", job_id, number, gone)
            return None
        except ExecutorError as error:
            return self._failed(number, error, None)
        context = ExecutionContext(
            job_id=job_id,
            attempt=number,
            model=assignment.model,
            input=assignment.input,
            input_file_id=assignment.input_file_id,
            input_path=input_path,
            work_dir=directory / _OUTPUT_DIR,
            timeout_seconds=assignment.timeout_seconds,
            gpu_indices=attempt.gpu_indices,
            progress=_progress_setter(attempt),
        )
        await asyncio.to_thread(sampler.start)
        started_at = datetime.now(UTC)
        attempt.began = time.monotonic()
        outcome = await _outcome(executor.run(context), deadline - loop.time())
        elapsed = time.monotonic() - attempt.began
        finished_at = datetime.now(UTC)
        usage = await asyncio.to_thread(sampler.stop)
        metrics = _metrics(assignment, elapsed, usage)
        if isinstance(outcome, ExecutorError):
            return self._failed(number, outcome, metrics)
        try:
            result = await self._deliver(assignment, outcome, directory, deadline)
        except transfer.AttemptGone as gone:
            log.info("%s attempt %d is no longer ours: %s", job_id, number, gone)
            return None
        except ExecutorError as error:
            return self._failed(number, error, metrics)
        receipt = None
        if self.receipt_key is not None:
            claims = receipts.ReceiptClaims(
                job_id=job_id,
                attempt=number,
                miner_id=self.miner_id,
                result_sha256=result.sha256,
                result_size_bytes=result.size_bytes,
                metrics=metrics,
                started_at=started_at,
                finished_at=finished_at,
            )
            receipt = receipts.sign_claims(self.receipt_key, claims)
        return protocol.Completed(
            miner_id=self.miner_id,
            attempt=number,
            at=datetime.now(UTC),
            result=result,
            metrics=metrics,
            receipt=receipt,
        )

    async def _fetch_input(
        self, assignment: protocol.Assignment, directory: Path, deadline: float
    ) -> Path | None:
        """The input file, fetched and checked; None when the input is text (or absent)."""
        if assignment.input is not None or assignment.input_file_id is None:
            return None
        destination = directory / _INPUT_FILE
        try:
            await transfer.fetch_input(
                self.api,
                assignment,
                destination,
                deadline=deadline,
                first_retry_seconds=self.transfer_retry_seconds,
            )
        except (transfer.AttemptGone, ExecutorError):
            raise
        except Exception as error:  # a full disk or a bug fails the attempt, not the agent
            log.exception("fetching the input of %s failed", assignment.job_id)
            raise ExecutorError(
                "input_unavailable",
                f"the input could not be fetched: {type(error).__name__}: {error}",
            ) from error
        return destination

    async def _deliver(
        self, assignment: protocol.Assignment, output: Output, directory: Path, deadline: float
    ) -> protocol.InlineResult | protocol.StoredResult:
        """The output in the job's format, inline in the report or stored through the ledger."""
        try:
            return await self._package_and_deliver(assignment, output, directory, deadline)
        except (transfer.AttemptGone, ExecutorError):
            raise
        except Exception as error:  # a full disk or a bug fails the attempt, not the agent
            log.exception("delivering the result of %s failed", assignment.job_id)
            raise ExecutorError(
                "delivery_failed",
                f"the result could not be delivered: {type(error).__name__}: {error}",
            ) from error

    async def _package_and_deliver(
        self, assignment: protocol.Assignment, output: Output, directory: Path, deadline: float
    ) -> protocol.InlineResult | protocol.StoredResult:
        try:
            async with asyncio.timeout_at(deadline):
                packaged = await package(output, assignment.output_config.format, directory)
        except TimeoutError:
            raise ExecutorError(
                "timed_out", "the attempt passed its deadline while its result was packaged"
            ) from None
        if travels_inline(assignment.output_config, packaged.size_bytes):
            path = packaged.path
            data = packaged.data if path is None else await asyncio.to_thread(path.read_bytes)
            return inline_result(data, packaged.content_type)
        answer = await transfer.upload_result(
            self.api,
            assignment.job_id,
            assignment.attempt,
            packaged,
            deadline=deadline,
            first_retry_seconds=self.transfer_retry_seconds,
        )
        return protocol.StoredResult(
            location=answer.location, size_bytes=answer.size_bytes, sha256=answer.sha256
        )

    async def _report_stopped(self, attempt: Attempt) -> None:
        number = attempt.assignment.attempt
        if attempt.stop_as == "released":
            report: protocol.Report = protocol.Released(
                miner_id=self.miner_id,
                attempt=number,
                at=datetime.now(UTC),
                reason="the miner is shutting down",
            )
        else:
            report = protocol.Canceled(miner_id=self.miner_id, attempt=number, at=datetime.now(UTC))
        await self.report(attempt.assignment.job_id, report)

    async def _pump_progress(self, attempt: Attempt) -> None:
        """Publish progress at most once per interval, and only when it moved forward."""
        sent = 0
        while True:
            await asyncio.sleep(self.progress_interval_seconds)
            current = attempt.progress
            if current > sent:
                sent = current
                report = protocol.Progress(
                    miner_id=self.miner_id,
                    attempt=attempt.assignment.attempt,
                    at=datetime.now(UTC),
                    progress=current,
                )
                await self.report(attempt.assignment.job_id, report)

    def _failed(
        self, attempt: int, error: ExecutorError, metrics: protocol.Metrics | None
    ) -> protocol.Failed:
        return protocol.Failed(
            miner_id=self.miner_id,
            attempt=attempt,
            at=datetime.now(UTC),
            error=error.error_info(),
            metrics=metrics,
        )


_INPUT_FILE = "input"
_OUTPUT_DIR = "output"


def _attempt_dir_name(job_id: str, attempt: int) -> str:
    """`<job_id>-<attempt>-<random>`: unique even if an attempt comes back after a restart."""
    safe = job_id if protocol.valid_token(job_id) else "job"
    return f"{safe}-{attempt}-{secrets.token_hex(4)}"


def _make_attempt_dir(directory: Path) -> None:
    """Create an attempt's private directory and the empty output directory inside it."""
    (directory / _OUTPUT_DIR).mkdir(parents=True)


def _remove_tree(path: Path) -> None:
    """Remove a file or a directory tree; a failure is logged (start clears leftovers)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("could not remove %s: %s", path, error)


def clear_work_dir(work_dir: Path) -> None:
    """Create the work dir, or empty it of what earlier runs of this miner left behind."""
    work_dir.mkdir(parents=True, exist_ok=True)
    for leftover in work_dir.iterdir():
        _remove_tree(leftover)


async def _outcome(work: Awaitable[Output], remaining: float) -> Output | ExecutorError:
    """The executor's output or its error; crashes and overruns become errors too."""
    try:
        output: Output = await asyncio.wait_for(work, max(remaining, 0.0))
    except ExecutorError as error:
        return error
    except TimeoutError:
        return ExecutorError("timed_out", "the attempt passed its deadline")
    except Exception as error:  # an executor plugin's bug must not kill the agent
        log.exception("executor crashed")
        return ExecutorError("executor_crashed", f"{type(error).__name__}: {error}")
    if not isinstance(output, Output):
        return ExecutorError(
            "executor_crashed", f"the executor returned {type(output).__name__}, not an Output"
        )
    return output


def _metrics(assignment: protocol.Assignment, elapsed: float, usage: GpuUsage) -> protocol.Metrics:
    """What the executor used: its wall time (transfers are not counted) and GPU samples."""
    return protocol.Metrics(
        execution_seconds=round(elapsed, 6),
        gpu_seconds=round(elapsed * assignment.requirements.gpu_count, 6),
        peak_gpu_memory_mb=usage.peak_memory_mb,
        peak_gpu_utilization_percent=usage.peak_utilization_percent,
        mean_gpu_utilization_percent=usage.mean_utilization_percent,
    )


def _progress_setter(attempt: Attempt) -> Callable[[int], None]:
    def set_progress(percent: int) -> None:
        # Any thread may call this; a plain int assignment is atomic, forward only.
        attempt.progress = max(attempt.progress, min(max(int(percent), 0), 100))

    return set_progress


def travels_inline(output_config: protocol.OutputConfig, size_bytes: int) -> bool:
    """True if a result may ride inside the report: destination "local" and at most 256 KiB."""
    return output_config.destination == "local" and size_bytes <= protocol.MAX_INLINE_RESULT_BYTES


class MinerAgent:
    """One miner: its identity, its NATS connection and the attempts it holds."""

    def __init__(
        self,
        config: AgentConfig,
        registry: ExecutorRegistry,
        probe: GpuProbe | None,
        gpus: list[protocol.GpuInfo],
    ) -> None:
        self._config = config
        self._registry = registry
        self._probe = probe
        self._gpus = gpus
        self._ns = Namespace(config.prefix)
        self._session = secrets.token_hex(8)
        self._held: dict[tuple[str, int], Attempt] = {}
        # Cancel orders for attempts not (yet) held: their assignment is skipped on arrival.
        # Bounded: the oldest are forgotten first (by then the ledger has moved on).
        self._canceled_early: dict[tuple[str, int], None] = {}
        self._slot_freed = asyncio.Event()
        self._free_gpus = [gpu.index for gpu in gpus]
        self._draining = False
        self.miner_id = ""
        self.max_concurrent = 1
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._runner: AttemptRunner | None = None

    # ---- start ----------------------------------------------------------------

    async def register(self, api: httpx.AsyncClient) -> Capabilities:
        """Learn our miner id from the API and bring our capabilities up to date there."""
        me = await _until_answered(lambda: api.get("/v1/miners/me"))
        if me.status_code in (401, 403):
            raise AgentError(f"the API refused the miner key: {transfer.error_message(me)}")
        if me.status_code != 200:
            raise AgentError(f"GET /v1/miners/me answered {me.status_code}: {me.text}")
        registered = me.json()
        self.miner_id = str(registered["miner_id"])
        if registered.get("status") == "deregistered":
            raise AgentError(f"miner {self.miner_id} is deregistered; register a new one")
        wanted = offered_capabilities(self._config, self._gpus, registered)
        current = {k: registered.get(k) for k in Capabilities.__struct_fields__}
        if msgspec.to_builtins(wanted) != msgspec.to_builtins(
            msgspec.convert(current, Capabilities, strict=False)
        ):
            answer = await api.put(
                f"/v1/miners/{self.miner_id}",
                content=msgspec.json.encode(wanted),
                headers={"Content-Type": "application/json"},
            )
            if answer.status_code != 200:
                raise AgentError(f"could not update capabilities: {transfer.error_message(answer)}")
            log.info("capabilities updated: %s", msgspec.to_builtins(wanted))
        self.max_concurrent = wanted.max_concurrent
        return wanted

    async def receipt_key(self, api: httpx.AsyncClient) -> Ed25519PrivateKey:
        """Our receipt key, from its file (made if missing), registered and active in the ledger."""
        path = receipt_key_path(self._config, self.miner_id)
        key = await asyncio.to_thread(load_or_create_receipt_key, path)
        raw = receipts.raw_public_key(key)
        key_id = receipts.key_id_of(raw)
        route = f"/v1/miners/{self.miner_id}/keys"
        listed = await _until_answered(lambda: api.get(route))
        if listed.status_code != 200:
            raise AgentError(f"GET {route} answered {listed.status_code}: {listed.text}")
        statuses = {str(k["key_id"]): str(k["status"]) for k in listed.json()["keys"]}
        if statuses.get(key_id) == "active":
            log.info("receipt key %s is registered (%s)", key_id, path)
            return key
        answer = await _until_answered(
            lambda: api.post(route, json={"public_key": receipts.encode_public_key(raw)})
        )
        if answer.status_code == 409:
            log.error(
                "the ledger refuses receipt key %s: %s", key_id, transfer.error_message(answer)
            )
            raise AgentError(
                f"receipt key {key_id} of miner {self.miner_id} was revoked; delete {path} "
                "to make a new one, then start the miner again"
            )
        if answer.status_code not in (200, 201):
            raise AgentError(
                f"could not register receipt key {key_id}: {transfer.error_message(answer)}"
            )
        log.info("receipt key %s registered (%s)", key_id, path)
        return key

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set, then drain and return."""
        # One HTTP client for the agent's lifetime: registration, inputs and results.
        async with transfer.api_client(self._config.api_url, self._config.key) as api:
            await self.register(api)
            # Every line the agent logs from here on (its tasks inherit it) names the miner.
            bind_log_ids(miner_id=self.miner_id)
            receipt_key = await self.receipt_key(api)
            work_dir = self._config.work_dir / self.miner_id
            await asyncio.to_thread(clear_work_dir, work_dir)
            self._runner = AttemptRunner(
                miner_id=self.miner_id,
                registry=self._registry,
                api=api,
                report=self._report,
                work_dir=work_dir,
                probe=self._probe,
                progress_interval_seconds=self._config.progress_interval_seconds,
                receipt_key=receipt_key,
            )
            await self._work(stop)

    async def _work(self, stop: asyncio.Event) -> None:
        """Connect to NATS, take and run assignments until `stop`, then drain."""
        self._nc = await nats.connect(
            self._config.nats_urls,
            name=f"jobledger-miner-{self.miner_id}",
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=5,
            error_cb=log_nats_error,
        )
        self._js = self._nc.jetstream()
        log.info(
            "miner %s ready: %d slot(s), executors %s",
            self.miner_id,
            self.max_concurrent,
            ", ".join(self._registry.names()),
        )
        workers = [
            asyncio.create_task(self._heartbeats(), name="heartbeats"),
            asyncio.create_task(self._control_loop(), name="control"),
        ]
        pulling = asyncio.create_task(self._assignment_loop(), name="assignments")
        try:
            await stop.wait()
        finally:
            self._draining = True
            await self._send_heartbeat()  # tell the scheduler at once: no new work
            await cancel_all([pulling])
            await self._drain()
            await cancel_all(workers)
            await self._send_heartbeat()
            # Reports were all acknowledged by JetStream; flush the last heartbeat and go.
            with contextlib.suppress(*NATS_DOWN):
                await self._nc.flush(timeout=2)
            await self._nc.close()

    # ---- assignments ----------------------------------------------------------

    async def _subscribe(self, subject: str, durable: str, stream: str) -> Any:
        assert self._js is not None
        while True:
            try:
                return await self._js.pull_subscribe(
                    subject,
                    durable=durable,
                    stream=stream,
                    config=ConsumerConfig(
                        ack_policy=AckPolicy.EXPLICIT,
                        ack_wait=ASSIGNMENT_ACK_WAIT_SECONDS,
                        max_deliver=-1,
                    ),
                )
            except NATS_DOWN as error:
                log.warning("cannot subscribe to %s (%s); retrying", subject, error)
                await asyncio.sleep(1.0)

    async def _assignment_loop(self) -> None:
        subscription = await self._subscribe(
            self._ns.assignments_subject(self.miner_id),
            self._ns.assignments_consumer(self.miner_id),
            self._ns.stream_name("ASSIGNMENTS"),
        )
        while not self._draining:
            free = self.max_concurrent - len(self._held)
            if free <= 0:
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), 1.0)
                continue
            try:
                messages = await subscription.fetch(free, timeout=1.0)
            except TimeoutError:
                continue
            except NATS_DOWN as error:
                log.warning("cannot pull assignments (%s); retrying", error)
                await asyncio.sleep(1.0)
                continue
            for message in messages:
                await self._accept(message)

    async def _accept(self, message: Msg) -> None:
        try:
            assignment = protocol.assignment_decoder.decode(message.data)
        except msgspec.DecodeError as error:
            log.error("dropping an unreadable assignment: %s", error)
            await message.term()
            return
        key = (assignment.job_id, assignment.attempt)
        if key in self._held:
            await message.ack()  # a redelivery of what we already run
            return
        if key in self._canceled_early:
            del self._canceled_early[key]
            await self._report(assignment.job_id, self._canceled(assignment.attempt))
            await message.ack()
            return
        attempt = Attempt(assignment, self._take_gpus(assignment.requirements.gpu_count))
        self._held[key] = attempt
        # The task exists before any await, so a cancel order can always reach it.
        attempt.task = asyncio.create_task(self._execute(attempt), name=f"job-{key[0]}-{key[1]}")
        await message.ack()

    def _take_gpus(self, count: int) -> tuple[int, ...]:
        taken = tuple(self._free_gpus[:count])
        del self._free_gpus[:count]
        return taken

    # ---- running an attempt ---------------------------------------------------

    async def _execute(self, attempt: Attempt) -> None:
        assert self._runner is not None
        bind_log_ids(job_id=attempt.assignment.job_id)  # this task's lines are about its job
        try:
            await self._runner.run(attempt)
        finally:
            self._release(attempt)

    def _release(self, attempt: Attempt) -> None:
        self._held.pop(attempt.key, None)
        self._free_gpus.extend(attempt.gpu_indices)
        self._slot_freed.set()

    # ---- control --------------------------------------------------------------

    async def _control_loop(self) -> None:
        subscription = await self._subscribe(
            self._ns.control_subject(self.miner_id),
            self._ns.control_consumer(self.miner_id),
            self._ns.stream_name("CONTROL"),
        )
        while True:
            try:
                messages = await subscription.fetch(16, timeout=1.0)
            except TimeoutError:
                continue
            except NATS_DOWN as error:
                log.warning("cannot pull control orders (%s); retrying", error)
                await asyncio.sleep(1.0)
                continue
            for message in messages:
                await self._obey(message)

    async def _obey(self, message: Msg) -> None:
        try:
            order = protocol.control_decoder.decode(message.data)
        except msgspec.DecodeError as error:
            log.error("dropping an unreadable control order: %s", error)
            await message.term()
            return
        key = (order.job_id, order.attempt)
        held = self._held.get(key)
        with log_context(job_id=order.job_id):
            log.info(
                "cancel order for %s attempt %d: %s", order.job_id, order.attempt, order.reason
            )
        if held is not None and held.task is not None:
            held.stop_as = "canceled"
            held.task.cancel()  # the task reports `canceled` as it unwinds
        elif held is None:
            # Not running here (finished, or not pulled yet): confirm, and skip it if it comes.
            self._canceled_early[key] = None
            while len(self._canceled_early) > CANCELED_EARLY_LIMIT:
                del self._canceled_early[next(iter(self._canceled_early))]
            await self._report(order.job_id, self._canceled(order.attempt))
        await message.ack()

    # ---- heartbeats and drain -------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            await self._send_heartbeat()
            await asyncio.sleep(self._config.heartbeat_seconds)

    async def _send_heartbeat(self) -> None:
        assert self._nc is not None
        beat = protocol.Heartbeat(
            miner_id=self.miner_id,
            inflight=len(self._held),
            gpus=self._gpus,
            at=datetime.now(UTC),
            jobs=[protocol.HeldAttempt(job_id, attempt) for job_id, attempt in self._held],
            session=self._session,
            max_concurrent=self.max_concurrent,
            draining=self._draining,
        )
        try:
            await self._nc.publish(
                self._ns.heartbeat_subject(self.miner_id), protocol.encoder.encode(beat)
            )
        except NATS_DOWN as error:  # the next beat comes in a few seconds
            log.warning("heartbeat not sent: %s", error)
            return
        # For container health checks: its age says when the ledger last heard from us.
        (self._config.work_dir / HEARTBEAT_FILE).touch()

    async def _drain(self) -> None:
        """Let running attempts finish for `drain_seconds`, then hand back the rest."""
        running = [a.task for a in self._held.values() if a.task is not None]
        if running:
            log.info(
                "draining: waiting up to %.0f s for %d job(s)",
                self._config.drain_seconds,
                len(running),
            )
            await asyncio.wait(running, timeout=self._config.drain_seconds)
        for attempt in list(self._held.values()):
            if attempt.task is not None and not attempt.task.done():
                attempt.stop_as = "released"
                attempt.task.cancel()
        leftovers = [a.task for a in self._held.values() if a.task is not None]
        await asyncio.gather(*leftovers, return_exceptions=True)

    # ---- reports --------------------------------------------------------------

    def _canceled(self, attempt: int) -> protocol.Canceled:
        return protocol.Canceled(miner_id=self.miner_id, attempt=attempt, at=datetime.now(UTC))

    async def _report(self, job_id: str, report: protocol.Report) -> None:
        """Publish a report to JetStream, retrying until it is stored (deduplicated by id)."""
        assert self._js is not None
        headers = {protocol.MSG_ID_HEADER: protocol.report_msg_id(job_id, report)}
        payload = protocol.encoder.encode(report)
        backoff = 0.2
        while True:
            try:
                await self._js.publish(
                    self._ns.reports_subject(job_id), payload, headers=headers, timeout=5
                )
            except NATS_DOWN as error:
                log.warning("report for %s not stored yet (%s); retrying", job_id, error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                return


def inline_result(data: bytes, content_type: str) -> protocol.InlineResult:
    """Result bytes as an inline result: text when they are UTF-8, else base64."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return protocol.InlineResult(
            data=base64.b64encode(data).decode("ascii"),
            encoding="base64",
            content_type=content_type,
            size_bytes=len(data),
            sha256=digest,
        )
    return protocol.InlineResult(
        data=text,
        encoding="utf-8",
        content_type=content_type,
        size_bytes=len(data),
        sha256=digest,
    )


async def _until_answered(call: Callable[[], Any]) -> httpx.Response:
    """Call the API until it answers at all (it may still be starting)."""
    while True:
        try:
            response: httpx.Response = await call()
        except httpx.TransportError as error:
            log.info("API not reachable yet (%s); retrying", error)
            await asyncio.sleep(_API_RETRY_SECONDS)
            continue
        if response.status_code in (502, 503, 504):
            log.info("API not ready yet (%d); retrying", response.status_code)
            await asyncio.sleep(_API_RETRY_SECONDS)
            continue
        return response
