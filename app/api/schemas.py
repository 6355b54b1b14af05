"""HTTP request and response bodies; never reused as stored events (a separate contract)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec

from domain.pricing import Priority

MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
OutputFormat = Literal["json", "text", "binary", "archive"]


class OutputConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where the result goes and in which format."""

    destination: Annotated[
        str,
        msgspec.Meta(
            max_length=1024,
            description='"local" (the ledger\'s blob store) or "s3://bucket/prefix"',
            examples=["local", "s3://results-bucket/jobs"],
        ),
    ] = "local"
    format: Annotated[OutputFormat, msgspec.Meta(description="result format")] = "json"


class Requirements(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The hardware a job needs."""

    gpu_type: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=64,
            description="GPU model, e.g. v100, a100, h100 (vendor spellings are normalised)",
        ),
    ]
    gpu_count: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    min_vram_gb: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0


class FileInput(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An uploaded file as a job's input, named explicitly."""

    file_id: Annotated[
        str, msgspec.Meta(pattern=r"^file_[0-9a-f]{32}$", description="from POST /v1/files")
    ]


class SubmitJobRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /v1/jobs. Unknown fields (status, owner, cost, ...) are rejected, not ignored."""

    model: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=200,
            pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$",
            description="model name: letters, digits and . _ / : @ + -",
            examples=["gpt2", "meta-llama/Llama-3.1-8B"],
        ),
    ]
    input: Annotated[
        str | FileInput,
        msgspec.Meta(
            description=(
                "the input text, or an uploaded file: its file_id (a string of exactly that "
                'shape is taken as a file) or {"file_id": "..."}'
            )
        ),
    ]
    requirements: Requirements
    output_config: OutputConfig = msgspec.field(default_factory=OutputConfig)
    priority: Priority = Priority.NORMAL
    timeout_seconds: Annotated[int, msgspec.Meta(ge=1, le=MAX_TIMEOUT_SECONDS)] = 3600


class SubmitJobResponse(msgspec.Struct, kw_only=True):
    """The new job's id and what it is expected to cost and take."""

    job_id: str
    estimated_cost: Decimal
    estimated_time_seconds: int


class JobStatusResponse(msgspec.Struct, kw_only=True):
    """A job as the status view shows it."""

    job_id: str
    status: str
    progress: int
    miner_id: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    result: dict[str, Any] | None
    model: str
    priority: str
    attempt: int
    estimated_cost: Decimal
    cost: Decimal | None
    error: str | None
    # A stable machine-readable reason for failed and timed-out jobs ("unknown_model", ...).
    error_code: str | None = None
    # Why a pending job waits (no miner offers its GPU type, all busy, ...); status view only.
    pending_reason: str | None = None


class JobListResponse(msgspec.Struct, kw_only=True):
    """A page of jobs, newest first; pass `next_cursor` as `cursor` for the next page."""

    jobs: list[JobStatusResponse]
    total: int
    has_more: bool
    next_cursor: str | None


class HistoryTotals(msgspec.Struct, kw_only=True):
    """Totals over every job in the window (all pages)."""

    jobs: int
    by_status: dict[str, int]
    total_cost: Decimal
    total_estimated_cost: Decimal


class HistoryResponse(
    msgspec.Struct, kw_only=True, rename={"window_from": "from", "window_to": "to"}
):
    """Jobs created in an inclusive window, with totals."""

    window_from: datetime
    window_to: datetime
    jobs: list[JobStatusResponse]
    totals: HistoryTotals
    has_more: bool
    next_cursor: str | None


ThroughputBucketSize = Literal["hour", "day"]


class ThroughputBucketCounts(msgspec.Struct, kw_only=True):
    """Jobs submitted in [start, start + one bucket), by the status each has now."""

    start: datetime
    jobs: int
    by_status: dict[str, int]


class ThroughputTotals(msgspec.Struct, kw_only=True):
    """The whole window's jobs, by status."""

    jobs: int
    by_status: dict[str, int]


class ThroughputResponse(
    msgspec.Struct, kw_only=True, rename={"window_from": "from", "window_to": "to"}
):
    """Jobs submitted per UTC hour or day of an inclusive window, oldest bucket first."""

    window_from: datetime
    window_to: datetime
    bucket: ThroughputBucketSize
    buckets: list[ThroughputBucketCounts]
    totals: ThroughputTotals


class JobEvent(msgspec.Struct, kw_only=True):
    """One immutable event of a job, as stored."""

    sequence: int
    type: str
    timestamp: datetime
    data: dict[str, Any]


class JobEventsResponse(msgspec.Struct, kw_only=True):
    """A job's full history in order."""

    job_id: str
    events: list[JobEvent]


class JobWatchMessage(msgspec.Struct, kw_only=True):
    """The `data` of an `event: job` message of the watch stream: one stored event and the
    job as GET /v1/jobs/{job_id} showed it right after that event."""

    sequence: int
    type: str
    timestamp: datetime
    job: JobStatusResponse


class JobWatchEnd(msgspec.Struct, kw_only=True):
    """The `data` of the watch stream's last message, `event: end`: the job's terminal status."""

    status: str


class CreateKeyRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /v1/admin/keys."""

    role: Literal["client", "miner", "auditor", "admin"]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]


class CreateKeyResponse(msgspec.Struct, kw_only=True):
    """The new key; `key` is shown this once and stored only as a hash."""

    key_id: str
    key: str
    role: str
    name: str


MinerStatus = Literal["online", "draining", "offline", "deregistered"]


class MinerCapabilities(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """PUT /v1/miners/{miner_id}: what a miner offers, replacing what it offered before."""

    gpu_type: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=64,
            description="GPU model, e.g. v100, a100, h100 (vendor spellings are normalised)",
            examples=["a100", "NVIDIA H100 80GB HBM3"],
        ),
    ]
    price_per_hour: Annotated[
        Decimal,
        msgspec.Meta(
            description="the miner's price per hour, a decimal number >= 0 (at most 6 places)",
            examples=[0.1],
        ),
    ]
    gpu_count: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    vram_gb: Annotated[
        int, msgspec.Meta(ge=0, le=4096, description="memory of each GPU, in GB")
    ] = 0
    location: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] = "unknown"
    max_concurrent: Annotated[
        int, msgspec.Meta(ge=1, le=1024, description="jobs the miner runs at once")
    ] = 1


class RegisterMinerRequest(MinerCapabilities, forbid_unknown_fields=True, kw_only=True):
    """POST /v1/miners: a new miner's name and capabilities."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100, examples=["rig-1"])]


class RegisterMinerResponse(msgspec.Struct, kw_only=True):
    """The new miner and its API key; `api_key` is shown this once and stored only as a hash."""

    miner_id: str
    api_key: str
    key_id: str
    status: MinerStatus
    name: str
    gpu_type: str
    gpu_count: int
    vram_gb: int
    location: str
    price_per_hour: Decimal
    max_concurrent: int


class MinerResponse(msgspec.Struct, kw_only=True):
    """A miner as the registry shows it: what it offers, whether it is alive, what it holds."""

    miner_id: str
    name: str
    status: MinerStatus
    gpu_type: str
    gpu_count: int
    vram_gb: int
    location: str
    price_per_hour: Decimal
    max_concurrent: int
    # Jobs the ledger has handed the miner that have not finished.
    inflight: int
    # What the miner said it runs in its last heartbeat (null before the first).
    reported_inflight: int | None
    gpus: list[dict[str, Any]]
    last_heartbeat_at: datetime | None
    registered_at: datetime
    updated_at: datetime


class MinerListResponse(msgspec.Struct, kw_only=True):
    """A page of miners, newest first; pass `next_cursor` as `cursor` for the next page."""

    miners: list[MinerResponse]
    total: int
    has_more: bool
    next_cursor: str | None


class MinerStatsResponse(msgspec.Struct, kw_only=True):
    """A miner's job record; rates are null until there is something to divide by."""

    miner_id: str
    # Jobs that ended on this miner: completed, failed or timed out.
    total_jobs: int
    completed_jobs: int
    failed_jobs: int
    timed_out_jobs: int
    success_rate: Decimal | None
    # Mean seconds from start to completion of completed jobs.
    average_completion_time: Decimal | None
    earnings: Decimal
    earnings_per_gpu_hour: Decimal | None
    gpu_seconds: Decimal


class HealthResponse(msgspec.Struct, kw_only=True):
    """Whether the API can reach its dependencies."""

    status: Literal["ok", "unavailable"]
    postgres: bool
    nats: bool


class ErrorDetail(msgspec.Struct, kw_only=True):
    """What went wrong, for people and programs."""

    status: int
    message: str
    details: Any = None


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error answer has this shape."""

    error: ErrorDetail


class FileResponse(msgspec.Struct, kw_only=True):
    """An uploaded input file; pass `file_id` as a job's `input`."""

    file_id: str
    size_bytes: int
    sha256: str
    content_type: str
    filename: str | None
    created_at: datetime
    # The first job that used the file as input; a used file is kept (cannot be deleted).
    used_by: str | None


class UploadResultResponse(msgspec.Struct, kw_only=True):
    """Where the ledger stored a result, and what it received; repeat it in the completion."""

    location: str
    size_bytes: int
    sha256: str
    content_type: str


ReceiptKeyStatus = Literal["active", "revoked"]


class RegisterReceiptKeyRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /v1/miners/{miner_id}/keys: a public key the miner will sign its receipts with."""

    public_key: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=100,
            description="standard base64 of the raw 32-byte Ed25519 public key",
            examples=["A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="],
        ),
    ]


class ReceiptKeyResponse(msgspec.Struct, kw_only=True):
    """A miner's receipt key; a revoked key is listed, but its receipts are refused."""

    key_id: str
    public_key: str
    status: ReceiptKeyStatus


class ReceiptKeyListResponse(msgspec.Struct, kw_only=True):
    """Every receipt key the miner registered, oldest first."""

    keys: list[ReceiptKeyResponse]
