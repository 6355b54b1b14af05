"""The wire contract between the ledger and miner agents over NATS: subjects, streams, messages.

docs/protocol.md explains every rule here in prose; this module is its executable form.

Everything lives under one subject namespace, `jobledger` unless configured otherwise
(`JOBLEDGER_NATS_PREFIX`), so several ledgers, or test runs, can share a NATS server:

    {prefix}.miners.{miner_id}.assignments   ledger -> miner   JetStream, work queue
    {prefix}.miners.{miner_id}.control       ledger -> miner   JetStream, work queue
    {prefix}.miners.{miner_id}.heartbeat     miner -> ledger   core NATS
    {prefix}.jobs.{job_id}.reports           miner -> ledger   JetStream, work queue
    {prefix}.events.{job, file or miner id}  ledger -> anyone  JetStream, limits
    {prefix}.dead.{what}                     ledger -> people  JetStream, limits

Messages the ledger sends are decoded leniently by miners (a newer ledger may add
fields); messages miners send are decoded strictly by the ledger, so a misspelt field
is an error instead of silently lost data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec

DEFAULT_PREFIX: Final = "jobledger"
# The header JetStream deduplicates on; every JetStream message of the protocol carries it.
MSG_ID_HEADER: Final = "Nats-Msg-Id"
# Headers on everything the relay publishes, so a consumer can order and trace messages.
EVENT_TYPE_HEADER: Final = "Jobledger-Event-Type"
POSITION_HEADER: Final = "Jobledger-Position"
# Inline results travel inside the completion report; NATS payloads default to at most 1 MiB.
# Only results for `destination: "local"` may travel inline; the rest are stored first.
MAX_INLINE_RESULT_BYTES: Final = 256 * 1024
# The HTTP routes through which a miner fetches a held attempt's input and stores its result.
INPUT_PATH: Final = "/v1/jobs/{job_id}/attempts/{attempt}/input"
RESULT_PATH: Final = "/v1/jobs/{job_id}/attempts/{attempt}/result"
# The largest message any stream accepts (NATS's default max_payload).
MAX_MESSAGE_BYTES: Final = 1024 * 1024
# Seconds the streams remember message ids; a republish within it is dropped by NATS.
DUPLICATE_WINDOW_SECONDS: Final = 2 * 3600

_PREFIX = re.compile(r"[a-z][a-z0-9_-]{0,63}(\.[a-z][a-z0-9_-]{0,63})*")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")


def valid_token(value: str) -> bool:
    """True if `value` can stand alone as one token of a subject (no dots, no wildcards)."""
    return _TOKEN.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A JetStream stream the ledger creates or updates at start; see docs/operations.md."""

    name: str
    subjects: tuple[str, ...]
    work_queue: bool
    max_age_seconds: int
    max_messages: int
    # discard "new" makes publishers wait (nothing is lost); "old" ages out history.
    discard: Literal["new", "old"]


@dataclass(frozen=True, slots=True)
class Namespace:
    """Subjects, stream and consumer names under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise ValueError(
                f"NATS prefix {self.prefix!r} must be lowercase tokens of letters, digits, "
                "'_' or '-' separated by dots"
            )

    def assignments_subject(self, miner_id: str) -> str:
        """Where the ledger sends a miner the jobs it should run."""
        return f"{self.prefix}.miners.{miner_id}.assignments"

    def control_subject(self, miner_id: str) -> str:
        """Where the ledger tells a miner to stop an attempt."""
        return f"{self.prefix}.miners.{miner_id}.control"

    def heartbeat_subject(self, miner_id: str) -> str:
        """Where a miner says it is alive."""
        return f"{self.prefix}.miners.{miner_id}.heartbeat"

    def all_heartbeats(self) -> str:
        """The wildcard the ledger listens to for every miner's heartbeat."""
        return f"{self.prefix}.miners.*.heartbeat"

    def reports_subject(self, job_id: str) -> str:
        """Where the miner running a job reports on it."""
        return f"{self.prefix}.jobs.{job_id}.reports"

    def all_reports(self) -> str:
        """The wildcard the ingestor consumes."""
        return f"{self.prefix}.jobs.*.reports"

    def events_subject(self, aggregate_id: str) -> str:
        """Where every committed event of one job (or miner) is published, in order."""
        return f"{self.prefix}.events.{aggregate_id}"

    def dead_letter_subject(self, what: str) -> str:
        """Where a message that can never be processed is kept for people to look at."""
        return f"{self.prefix}.dead.{what}"

    def stream_name(self, what: str) -> str:
        """A stream's name: the prefix in capitals, then what it holds."""
        return f"{self.prefix.upper().replace('.', '_').replace('-', '_')}_{what}"

    def job_of(self, reports_subject: str) -> str | None:
        """The job id in a reports subject, or None if the subject is not one."""
        head = f"{self.prefix}.jobs."
        if not reports_subject.startswith(head) or not reports_subject.endswith(".reports"):
            return None
        job_id = reports_subject[len(head) : -len(".reports")]
        return job_id if valid_token(job_id) else None

    def miner_of(self, miner_subject: str) -> str | None:
        """The miner id in a heartbeat, assignments or control subject."""
        head = f"{self.prefix}.miners."
        if not miner_subject.startswith(head):
            return None
        miner_id, _, _ = miner_subject[len(head) :].partition(".")
        return miner_id if valid_token(miner_id) else None

    def streams(self) -> tuple[StreamSpec, ...]:
        """Every stream of the protocol, with the settings docs/operations.md explains.

        Limits are message counts and ages, not bytes: JetStream reserves a stream's
        byte limit up front, which would stop several ledgers (or test runs) from
        sharing one server. Each message is at most MAX_MESSAGE_BYTES.
        """
        day = 86400
        return (
            StreamSpec(
                name=self.stream_name("ASSIGNMENTS"),
                subjects=(f"{self.prefix}.miners.*.assignments",),
                work_queue=True,
                max_age_seconds=day,
                max_messages=1_000_000,
                discard="new",
            ),
            StreamSpec(
                name=self.stream_name("CONTROL"),
                subjects=(f"{self.prefix}.miners.*.control",),
                work_queue=True,
                max_age_seconds=day,
                max_messages=1_000_000,
                discard="new",
            ),
            StreamSpec(
                name=self.stream_name("REPORTS"),
                subjects=(self.all_reports(),),
                work_queue=True,
                max_age_seconds=0,  # kept until applied, however long the ledger is down
                max_messages=10_000_000,
                discard="new",
            ),
            StreamSpec(
                name=self.stream_name("EVENTS"),
                subjects=(f"{self.prefix}.events.>",),
                work_queue=False,
                max_age_seconds=7 * day,
                max_messages=50_000_000,
                discard="old",
            ),
            StreamSpec(
                name=self.stream_name("DEAD"),
                subjects=(f"{self.prefix}.dead.>",),
                work_queue=False,
                max_age_seconds=30 * day,
                max_messages=1_000_000,
                discard="old",
            ),
        )

    def assignments_consumer(self, miner_id: str) -> str:
        """The durable consumer through which one miner pulls its assignments."""
        return f"assignments_{miner_id}"

    def control_consumer(self, miner_id: str) -> str:
        """The durable consumer through which one miner pulls its control messages."""
        return f"control_{miner_id}"

    def ingestor_consumer(self) -> str:
        """The one durable consumer all ledger processes share to ingest reports."""
        return "ingestor"


# ---- ledger -> miner --------------------------------------------------------


class OutputConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where the result should go and in which format, as the client asked."""

    destination: str
    format: str


class Requirements(msgspec.Struct, frozen=True, kw_only=True):
    """What hardware the job asked for."""

    gpu_type: str
    gpu_count: int
    min_vram_gb: int


class Assignment(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt of a job, handed to one miner. Msg id: `{job_id}:{version}` of JobAssigned."""

    job_id: str
    attempt: int
    model: str
    # The input text, or None when the job's input is an uploaded file (input_file_id),
    # which the miner fetches over HTTP from INPUT_PATH (docs/protocol.md, "Inputs").
    input: str | None
    input_file_id: str | None = None
    # The uploaded file's size and hex SHA-256, for checking the fetched bytes.
    input_size_bytes: int | None = None
    input_sha256: str | None = None
    output_config: OutputConfig
    requirements: Requirements
    priority: str
    timeout_seconds: int
    assigned_at: datetime
    # assigned_at + timeout_seconds: past it the ledger times the job out.
    deadline: datetime


class Control(msgspec.Struct, frozen=True, kw_only=True):
    """An order about one attempt the miner holds; `cancel` is the only action so far."""

    job_id: str
    attempt: int
    action: Literal["cancel"]
    reason: str = ""


# ---- miner -> ledger --------------------------------------------------------


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One GPU as NVML describes it."""

    index: int
    name: str
    uuid: str
    memory_total_mb: int
    driver: str


class HeldAttempt(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """A (job_id, attempt) the miner holds; sent as a two-element array."""

    job_id: str
    attempt: int


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A miner is alive, and this is what it holds. Sent every few seconds on core NATS."""

    miner_id: str
    inflight: Annotated[int, msgspec.Meta(ge=0)]
    gpus: list[GpuInfo]
    at: datetime
    # Every attempt the miner holds, running or waiting for a slot. Lets the ledger
    # notice an attempt a restarted miner no longer knows about.
    jobs: list[HeldAttempt] = []
    # Changes whenever the agent process restarts.
    session: str = ""
    max_concurrent: Annotated[int, msgspec.Meta(ge=0)] = 0
    # True once the miner is shutting down: it finishes what it holds and takes nothing new.
    draining: bool = False


class InlineResult(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="storage",
    tag="inline",
):
    """A result small enough to travel inside the completion report (`"storage": "inline"`).

    Allowed only for jobs whose destination is "local"; anything else is a StoredResult.
    """

    # The bytes: as text when encoding is utf-8, else base64.
    data: str
    encoding: Literal["utf-8", "base64"] = "utf-8"
    content_type: str = "application/octet-stream"
    size_bytes: Annotated[int, msgspec.Meta(ge=0)]
    # Hex SHA-256 of the bytes (after decoding base64); the ledger checks it.
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


class UploadAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """What RESULT_PATH answers (201) once the bytes are durable: a StoredResult's fields."""

    location: str
    size_bytes: int
    sha256: str
    content_type: str


class StoredResult(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="storage",
    tag="stored",
):
    """A result the miner stored through RESULT_PATH before reporting (`"storage": "stored"`).

    The fields repeat what the upload answered; the ledger checks them against what it
    recorded when it received the bytes (JobResultStored) and that the object is there.
    """

    location: Annotated[str, msgspec.Meta(max_length=2048)]
    size_bytes: Annotated[int, msgspec.Meta(ge=0)]
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


class Metrics(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the attempt cost in time and GPU, measured by the miner (NVML where present)."""

    execution_seconds: Annotated[float, msgspec.Meta(ge=0)]
    gpu_seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    peak_gpu_memory_mb: Annotated[int, msgspec.Meta(ge=0)] | None = None
    peak_gpu_utilization_percent: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    mean_gpu_utilization_percent: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Why an attempt failed: a stable machine code and a sentence for people."""

    code: Annotated[str, msgspec.Meta(pattern="^[a-z][a-z0-9_]{0,63}$")]
    message: str


class Receipt(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A miner's signature over a completion's claims (app/receipts.py; docs/protocol.md, Receipts).

    The signed bytes are `b"jobledger-receipt-v1\n"` and `claims` encoded UTF-8: the text as
    sent, so a verifier never depends on re-encoding it.
    """

    # "ed25519:" and 32 hex digits of the SHA-256 of the raw public key, registered beforehand.
    key_id: str
    # ReceiptClaims as JSON text.
    claims: str
    # Standard base64 of the 64-byte Ed25519 signature.
    signature: str


class _Report(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"
):
    miner_id: str
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    at: datetime


class Started(_Report, frozen=True, tag="started"):
    """The miner began executing the attempt."""


class Progress(_Report, frozen=True, tag="progress"):
    """How far the attempt has come, in percent; only ever increases."""

    progress: Annotated[int, msgspec.Meta(ge=0, le=100)]


class Completed(_Report, frozen=True, tag="completed"):
    """The attempt finished with a result."""

    result: InlineResult | StoredResult
    metrics: Metrics
    # Required from a miner that registered a receipt key; older agents send none.
    receipt: Receipt | None = None


class Failed(_Report, frozen=True, tag="failed"):
    """The attempt failed for good; the job fails."""

    error: ErrorInfo
    metrics: Metrics | None = None


class Canceled(_Report, frozen=True, tag="canceled"):
    """The miner stopped the attempt after a cancel order."""


class Released(_Report, frozen=True, tag="released"):
    """The miner hands the attempt back unfinished (it is draining); the job is requeued."""

    reason: str = ""


Report = Started | Progress | Completed | Failed | Canceled | Released


def report_msg_id(job_id: str, report: Report) -> str:
    """The Nats-Msg-Id of a report: one per (job, attempt, kind), and per percent for progress.

    A signed completion adds 16 hex digits of its signature's SHA-256: a forged or refused
    completion cannot take the id of the genuine one, and a retry of the same one keeps it.
    """
    kind = type(report).__struct_config__.tag
    if isinstance(report, Progress):
        return f"{job_id}:{report.attempt}:progress:{report.progress}"
    if isinstance(report, Completed) and report.receipt is not None:
        mark = hashlib.sha256(report.receipt.signature.encode("utf-8")).hexdigest()[:16]
        return f"{job_id}:{report.attempt}:completed:{mark}"
    return f"{job_id}:{report.attempt}:{kind}"


def event_msg_id(aggregate_id: str, version: int) -> str:
    """The Nats-Msg-Id of a relayed event: its aggregate and version, unique forever."""
    return f"{aggregate_id}:{version}"


# Prebuilt codecs: decoded once, strictly where miners send.
encoder = msgspec.json.Encoder()
report_decoder: msgspec.json.Decoder[Report] = msgspec.json.Decoder(Report)
heartbeat_decoder = msgspec.json.Decoder(Heartbeat)
assignment_decoder = msgspec.json.Decoder(Assignment)
control_decoder = msgspec.json.Decoder(Control)


def to_builtins(value: Any) -> Any:
    """A struct as plain JSON-ready data (for storing inside events)."""
    return msgspec.to_builtins(value)
