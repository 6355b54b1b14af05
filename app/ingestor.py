"""The ingestor: turns miner reports from JetStream into job events.

All ledger processes share one durable pull consumer on the reports stream, so each
report is handled by one of them. A report is acknowledged only after its event is
committed (or after deciding it changes nothing), so a crash redelivers it, and a
redelivery is harmless: the domain refuses a second terminal event, and a report
from a miner that does not hold the job's current attempt (the fencing token) is
recorded as `JobReportRejected` and never applied. So is a completion from the holder
whose signed receipt does not prove it, once the miner has registered a receipt key
(app/receipts.py): the attempt keeps running and a valid completion may still come.

What is never retried: a report that cannot be decoded, or names a job that does
not exist, is copied to `{prefix}.dead.reports` with the reason and terminated.
A database outage naks with a growing delay and never gives up.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum

import msgspec
from anyio import to_thread
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from app import protocol
from app.backoff import Backoff
from app.blobs import BlobInfo, Blobs, BlobUnavailable, InvalidLocation, Location
from app.bus import NATS_DOWN, Bus, ensure_streams
from app.formats import FormatMismatch, check_bytes
from app.logs import log_context
from app.protocol import Namespace
from app.receipts import InvalidReceipt, check_claims, decode_public_key, verify_receipt
from app.store import DATABASE_DOWN, JobLedger
from domain.errors import ConcurrentChange, DomainError, InvalidTransition, MinerNotFound, NotFound
from domain.jobs import Job, JobStatus, RequeueCause
from domain.miners import Miner
from domain.pricing import price

log = logging.getLogger("jobledger.ingestor")

# Reports applied, and committed, together.
FETCH_BATCH = 64
# ...as long as their messages add up to at most this many bytes: inline results may be
# 256 KiB each, and the event store's insert stalls for good once one call carries about
# 4.5 MB (see app/group_commit.MAX_BATCH_BYTES).
MAX_APPLY_BYTES = 1024 * 1024
# An unexpected error gets this many deliveries before the report is dead-lettered.
MAX_UNEXPECTED_DELIVERIES = 5
ACK_WAIT_SECONDS = 30.0
# The error code with which a miner reports an attempt that ran past its deadline.
TIMED_OUT_CODE = "timed_out"
# How far a miner's clock may run ahead when it says the deadline passed.
CLOCK_SKEW = timedelta(seconds=2)


class Outcome(StrEnum):
    """What a report did to its job."""

    APPLIED = "applied"
    # Nothing to do: a duplicate, a late report, or progress that does not move forward.
    IGNORED = "ignored"
    # From a miner that does not hold the attempt, or a completion whose receipt proves
    # nothing: recorded as JobReportRejected.
    REJECTED = "rejected"


def _kind(report: protocol.Report) -> str:
    return str(type(report).__struct_config__.tag)


def billed_seconds(job: Job, metrics: protocol.Metrics, now: datetime) -> Decimal:
    """Run time to charge: what the miner measured, never more than the ledger saw elapse."""
    reported = Decimal(str(metrics.execution_seconds))
    if job.assigned_at is None:
        return max(reported, Decimal(0))
    elapsed = now - job.assigned_at
    observed = Decimal(elapsed.days * 86400 + elapsed.seconds) + Decimal(elapsed.microseconds) / (
        1_000_000
    )
    return max(min(reported, observed), Decimal(0))


def _past_deadline(job: Job) -> bool:
    """True if the attempt's deadline has passed, allowing the miner's clock some skew."""
    if job.assigned_at is None:
        return False
    deadline = job.assigned_at + timedelta(seconds=job.timeout_seconds)
    return datetime.now(UTC) >= deadline - CLOCK_SKEW


# What the ledger found at the location of each stored result a batch names (None: nothing).
BlobFacts = Mapping[str, BlobInfo | None]


class Refusal(msgspec.Struct, frozen=True):
    """Why a completion is refused: the job fails with this code and message."""

    code: str
    message: str


def check_result(
    job: Job, result: protocol.InlineResult | protocol.StoredResult, blobs: BlobFacts
) -> Refusal | None:
    """Why a completion's result is unusable, or None when it is what the ledger holds."""
    if isinstance(result, protocol.StoredResult):
        return _check_stored(job, result, blobs)
    if job.output_destination != "local":
        return Refusal(
            "invalid_result",
            f"results for {job.output_destination} must be stored through the result "
            "upload, not sent inline",
        )
    problem = _check_inline(result, job.output_format)
    return Refusal("invalid_result", problem) if problem else None


def _check_stored(job: Job, result: protocol.StoredResult, blobs: BlobFacts) -> Refusal | None:
    stored = job.stored_result
    if stored is None or stored.attempt != job.attempt or stored.location != result.location:
        return Refusal(
            "result_missing",
            f"the completion names {result.location}, but the ledger received no result "
            f"there for attempt {job.attempt}",
        )
    if (result.sha256, result.size_bytes) != (stored.sha256, stored.size_bytes):
        return Refusal(
            "result_checksum_mismatch",
            f"the completion says {result.size_bytes} bytes with sha256 {result.sha256}; "
            f"the ledger stored {stored.size_bytes} bytes with sha256 {stored.sha256}",
        )
    info = blobs.get(result.location)
    if info is None:
        return Refusal("result_missing", f"the stored result at {result.location} is gone")
    if info.size_bytes != stored.size_bytes or info.sha256 not in (None, stored.sha256):
        return Refusal(
            "result_checksum_mismatch",
            f"the object at {result.location} changed after it was stored "
            f"({info.size_bytes} bytes now, {stored.size_bytes} then)",
        )
    return None


def _check_inline(result: protocol.InlineResult, output_format: str) -> str | None:
    """Why an inline result is unusable, or None when its size, digest and format are right."""
    if result.size_bytes > protocol.MAX_INLINE_RESULT_BYTES:
        return (
            f"inline results may be at most {protocol.MAX_INLINE_RESULT_BYTES} bytes, "
            f"this one is {result.size_bytes}"
        )
    try:
        data = (
            base64.b64decode(result.data, validate=True)
            if result.encoding == "base64"
            else result.data.encode("utf-8")
        )
    except (binascii.Error, ValueError) as error:
        return f"result data is not valid {result.encoding}: {error}"
    if len(data) != result.size_bytes:
        return f"result is {len(data)} bytes, the report says {result.size_bytes}"
    if hashlib.sha256(data).hexdigest() != result.sha256:
        return "result sha256 does not match its data"
    try:
        check_bytes(data, output_format)
    except FormatMismatch as error:
        return str(error)
    return None


# The miners whose completions a batch checks, loaded once per batch (None: no such miner).
MinerCache = dict[str, Miner | None]


def report_command(
    ledger: JobLedger,
    report: protocol.Report,
    *,
    max_attempts: int,
    blobs: BlobFacts,
    miners: MinerCache | None = None,
) -> Callable[[Job], Outcome]:
    """The command that turns one report into at most one event on its job."""
    cache: MinerCache = {} if miners is None else miners

    def command(job: Job) -> Outcome:
        return _decide(ledger, job, report, max_attempts, blobs, cache)

    return command


def _miner(ledger: JobLedger, miner_id: str, cache: MinerCache) -> Miner | None:
    """The miner as it is now (its receipt keys), loaded once per batch."""
    if miner_id not in cache:
        try:
            cache[miner_id] = ledger.miner(miner_id)
        except MinerNotFound:
            cache[miner_id] = None
    return cache[miner_id]


def proven_receipt(
    job: Job, report: protocol.Completed, miner: Miner | None
) -> protocol.Receipt | None:
    """The receipt to record with a completion; None from a miner that never registered a key.

    InvalidReceipt when the completion needs a receipt and this one does not prove it:
    missing, by a key of another miner or a revoked one, a bad signature, or claims
    about another job, attempt, miner, result or metrics.
    """
    receipt = report.receipt
    if miner is None or not miner.has_keys:
        if receipt is not None:
            raise InvalidReceipt(
                f"it names key {receipt.key_id}, but miner {report.miner_id} registered no key"
            )
        return None  # an older agent: unsigned completions stay accepted
    if receipt is None:
        raise InvalidReceipt(
            f"miner {report.miner_id} registered receipt keys, so its completions must be signed"
        )
    if receipt.key_id in miner.revoked_keys:
        raise InvalidReceipt(f"key {receipt.key_id} of miner {report.miner_id} was revoked")
    public_key = miner.keys.get(receipt.key_id)
    if public_key is None:
        raise InvalidReceipt(f"key {receipt.key_id} is not a key of miner {report.miner_id}")
    claims = verify_receipt(receipt, decode_public_key(public_key))
    check_claims(
        claims,
        job_id=job.job_id,
        attempt=report.attempt,
        miner_id=report.miner_id,
        result_sha256=report.result.sha256,
        result_size_bytes=report.result.size_bytes,
    )
    if claims.metrics != report.metrics:
        raise InvalidReceipt("the receipt's metrics are not the report's")
    return receipt


def apply_reports(
    ledger: JobLedger,
    reports: Sequence[tuple[str, protocol.Report]],
    *,
    max_attempts: int,
    blobs: BlobFacts | None = None,
) -> list[Outcome | DomainError]:
    """Apply reports in order, committing all their events together (one transaction).

    `blobs` holds what is at each stored result's location, looked up beforehand.
    """
    facts = blobs or {}
    miners: MinerCache = {}
    commands = [
        (
            job_id,
            report_command(ledger, report, max_attempts=max_attempts, blobs=facts, miners=miners),
        )
        for job_id, report in reports
    ]
    results, _ = ledger.change_jobs(commands)
    return results


def apply_report(
    ledger: JobLedger,
    job_id: str,
    report: protocol.Report,
    *,
    max_attempts: int,
    blobs: BlobFacts | None = None,
) -> Outcome:
    """Apply one report; the domain error it meets, if any, is raised."""
    [result] = apply_reports(ledger, [(job_id, report)], max_attempts=max_attempts, blobs=blobs)
    if isinstance(result, DomainError):
        raise result
    return result


def stored_locations(reports: Sequence[protocol.Report]) -> list[str]:
    """The locations of the stored results some completions name."""
    return [
        report.result.location
        for report in reports
        if isinstance(report, protocol.Completed)
        and isinstance(report.result, protocol.StoredResult)
    ]


async def look_up(blobs: Blobs, locations: Sequence[str], allowed: frozenset[str]) -> BlobFacts:
    """What is at each location now; one the ledger would never build counts as nothing.

    BlobUnavailable propagates: the reports are retried once the store is back.
    """
    facts: dict[str, BlobInfo | None] = {}
    for text in set(locations):
        try:
            location = Location.parse(text, allowed)
        except InvalidLocation:
            facts[text] = None
            continue
        facts[text] = await blobs.stat(location)
    return facts


def _decide(
    ledger: JobLedger,
    job: Job,
    report: protocol.Report,
    max_attempts: int,
    blobs: BlobFacts,
    miners: MinerCache,
) -> Outcome:
    if not job.holds(report.miner_id, report.attempt):
        if report.miner_id == job.miner_id and report.attempt == job.attempt:
            return Outcome.IGNORED  # the holder, late: the attempt already ended
        if isinstance(report, protocol.Canceled | protocol.Released):
            return Outcome.IGNORED  # an answer to a cancel order: it claims no work
        job.reject_report(
            miner_id=report.miner_id,
            attempt=report.attempt,
            kind=_kind(report),
            reason=f"job is on attempt {job.attempt} held by {job.miner_id or 'no miner'}",
        )
        return Outcome.REJECTED
    recorded = len(job.pending_events)  # earlier reports of a batch may have recorded some
    receipt: protocol.Receipt | None = None
    if isinstance(report, protocol.Completed):
        # Checked before the result: a completion nobody can vouch for changes nothing,
        # not even by failing the job.
        try:
            receipt = proven_receipt(job, report, _miner(ledger, report.miner_id, miners))
        except InvalidReceipt as why:
            job.reject_report(
                miner_id=report.miner_id,
                attempt=report.attempt,
                kind=_kind(report),
                reason=f"receipt: {why}",
            )
            if len(job.pending_events) > recorded:
                log.warning("completion of %s refused: receipt: %s", job.job_id, why)
            return Outcome.REJECTED
    try:
        _apply(ledger, job, report, max_attempts, blobs, receipt)
    except InvalidTransition:
        return Outcome.IGNORED  # e.g. a repeated "started", or progress while canceling
    return Outcome.APPLIED if len(job.pending_events) > recorded else Outcome.IGNORED


def _apply(
    ledger: JobLedger,
    job: Job,
    report: protocol.Report,
    max_attempts: int,
    blobs: BlobFacts,
    receipt: protocol.Receipt | None,
) -> None:
    attempt = report.attempt
    match report:
        case protocol.Started():
            job.start(attempt=attempt, miner_id=report.miner_id)
        case protocol.Progress(progress=progress):
            if job.status is JobStatus.RUNNING and progress > job.progress:
                job.report_progress(attempt=attempt, progress=progress)
        case protocol.Completed(result=result, metrics=metrics):
            if (refusal := check_result(job, result, blobs)) is not None:
                job.fail(attempt=attempt, error=refusal.message, error_code=refusal.code)
                return
            seconds = billed_seconds(job, metrics, datetime.now(UTC))
            job.complete(
                attempt=attempt,
                # The format is recorded with the result: the bytes' meaning, for auditors.
                result=protocol.to_builtins(result) | {"format": job.output_format},
                metrics=protocol.to_builtins(metrics),
                gpu_seconds=seconds * job.gpu_count,
                cost=price(
                    ledger.rates,
                    gpu_type=job.gpu_type,
                    gpu_count=job.gpu_count,
                    seconds=seconds,
                    priority=job.priority,
                ),
                receipt=protocol.to_builtins(receipt) if receipt is not None else None,
            )
        case protocol.Failed(error=error) if error.code == TIMED_OUT_CODE and _past_deadline(job):
            job.time_out()  # the miner noticed the deadline before the scheduler did
        case protocol.Failed() if job.status is JobStatus.CANCELING:
            job.confirm_canceled(attempt=attempt)  # it stopped, as it was asked to
        case protocol.Failed(error=error):
            job.fail(attempt=attempt, error=error.message, error_code=error.code)
        case protocol.Canceled() | protocol.Released():
            if job.status is JobStatus.CANCELING:
                job.confirm_canceled(attempt=attempt)
            else:  # handed back unasked (draining): another miner gets it
                job.give_back(RequeueCause.MINER_RELEASED, max_attempts=max_attempts)


def _by_size(
    decoded: list[tuple[Msg, str, protocol.Report]], most: int
) -> Iterator[list[tuple[Msg, str, protocol.Report]]]:
    """Consecutive runs of reports whose messages add up to at most `most` bytes (or one)."""
    chunk: list[tuple[Msg, str, protocol.Report]] = []
    size = 0
    for item in decoded:
        length = len(item[0].data)
        if chunk and size + length > most:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += length
    if chunk:
        yield chunk


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """What `{prefix}.dead.reports` carries: the original message and why it was dropped."""

    subject: str
    reason: str
    payload: str
    deliveries: int


class Ingestor:
    """Consumes reports and applies them, acking each after its effect is durable."""

    def __init__(
        self, ledger: JobLedger, bus: Bus, namespace: Namespace, blobs: Blobs, *, max_attempts: int
    ) -> None:
        self._ledger = ledger
        self._bus = bus
        self._namespace = namespace
        self._blobs = blobs
        self._max_attempts = max_attempts

    async def run(self) -> None:
        """Consume forever, resubscribing after NATS losses."""
        js = await self._bus.jetstream()
        backoff = Backoff()
        while True:
            try:
                await ensure_streams(js, self._namespace, self._bus.stream_replicas)
                await self._consume(js)
            except NATS_DOWN as error:
                log.warning("ingestor paused (%s: %s); retrying", type(error).__name__, error)
                await asyncio.sleep(backoff.next_delay())

    async def _consume(self, js: JetStreamContext) -> None:
        ns = self._namespace
        subscription = await js.pull_subscribe(
            ns.all_reports(),
            durable=ns.ingestor_consumer(),
            stream=ns.stream_name("REPORTS"),
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ACK_WAIT_SECONDS,
                max_deliver=-1,  # a database outage must never drop a report
                max_ack_pending=4096,
            ),
        )
        while True:
            try:
                messages = await subscription.fetch(FETCH_BATCH, timeout=1.0)
            except TimeoutError:
                continue
            await self.handle(messages)

    async def handle(self, messages: list[Msg]) -> None:
        """Apply a fetched batch in stream order, in one transaction, then settle each message.

        One commit for the whole batch is what lets reports keep up with many miners;
        each message is still acknowledged only after that commit. Large reports (inline
        results) split the batch into several transactions of at most MAX_APPLY_BYTES.
        """
        decoded: list[tuple[Msg, str, protocol.Report]] = []
        for message in messages:
            if (item := await self._decoded(message)) is not None:
                decoded.append((message, *item))
        for chunk in _by_size(decoded, MAX_APPLY_BYTES):
            await self._apply(chunk)

    async def _apply(self, decoded: list[tuple[Msg, str, protocol.Report]]) -> None:
        """Apply decoded reports in one transaction, then settle each message."""
        reports = [(job_id, report) for _, job_id, report in decoded]
        try:
            # Stored results are looked up first, outside the transaction (it is async I/O).
            blobs = await look_up(
                self._blobs,
                stored_locations([report for _, report in reports]),
                self._blobs.allowed_buckets,
            )
            results = await to_thread.run_sync(
                lambda: apply_reports(
                    self._ledger, reports, max_attempts=self._max_attempts, blobs=blobs
                )
            )
        except Exception as error:  # the batch as a whole (the database is down, say)
            for message, job_id, report in decoded:
                with log_context(job_id=job_id, miner_id=report.miner_id):
                    await self._settle_failure(message, job_id, error)
            return
        for (message, job_id, report), result in zip(decoded, results, strict=True):
            with log_context(job_id=job_id, miner_id=report.miner_id):
                if isinstance(result, DomainError):
                    await self._settle_failure(message, job_id, result)
                else:
                    log.debug("%s report for %s: %s", _kind(report), job_id, result)
                    await message.ack()

    async def _decoded(self, message: Msg) -> tuple[str, protocol.Report] | None:
        """The job id and report of a message, or None after dead-lettering an unusable one."""
        job_id = self._namespace.job_of(message.subject)
        if job_id is None:
            await self._dead(message, f"not a reports subject: {message.subject}")
            return None
        try:
            return job_id, protocol.report_decoder.decode(message.data)
        except msgspec.DecodeError as error:  # ValidationError is a DecodeError
            with log_context(job_id=job_id):
                await self._dead(message, f"invalid report: {error}")
            return None

    async def _settle_failure(self, message: Msg, job_id: str, error: Exception) -> None:
        """Retry what may succeed later; dead-letter what never will."""
        deliveries = message.metadata.num_delivered or 1
        match error:
            case NotFound():
                await self._dead(message, error.message)
            case ConcurrentChange():
                log.info("%s; redelivery shortly", error.message)
                await message.nak(delay=min(0.1 * 2**deliveries, 5.0))
            case _ if isinstance(error, (*DATABASE_DOWN, BlobUnavailable)):
                delay = min(0.5 * 2**deliveries, 30.0)
                log.warning("cannot record report (%s); redelivery in %.0f s", error, delay)
                await message.nak(delay=delay)
            case DomainError():
                # The domain refused the report's content (say, progress above 100): keep it.
                await self._dead(message, error.message)
            case _:
                log.error("unexpected error applying a report for %s", job_id, exc_info=error)
                if deliveries >= MAX_UNEXPECTED_DELIVERIES:
                    await self._dead(message, f"{type(error).__name__}: {error}")
                else:
                    await message.nak(delay=min(0.5 * 2**deliveries, 30.0))

    async def _dead(self, message: Msg, reason: str) -> None:
        """Keep an unprocessable report for people to inspect, then stop its redelivery."""
        log.error("dead-lettering a report on %s: %s", message.subject, reason)
        letter = DeadLetter(
            subject=message.subject,
            reason=reason,
            payload=message.data.decode("utf-8", "replace"),
            deliveries=message.metadata.num_delivered or 1,
        )
        js = await self._bus.jetstream()
        # One dead letter per original message, however often this is retried.
        original = f"reports:{message.metadata.sequence.stream}"
        await js.publish(
            self._namespace.dead_letter_subject("reports"),
            msgspec.json.encode(letter),
            headers={protocol.MSG_ID_HEADER: original},
        )
        await message.term()
