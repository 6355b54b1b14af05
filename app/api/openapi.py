"""OpenAPI building blocks: the documented error answers, headers and the seed's examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Example, OpenAPIMediaType, Operation, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType

from app.api.schemas import ErrorBody

_ERRORS = {
    400: ("invalid request: the body is not JSON", "JSON is malformed: ..."),
    401: ("unauthorized: no key, or an invalid or revoked key", "invalid or revoked API key"),
    403: ("forbidden: the key's role may not do this", "an auditor key cannot do this; ..."),
    404: ("not found (also for another client's job)", "job 'job_...' not found"),
    409: (
        "conflict with the job's current state",
        "cannot request_cancel job ...: it is completed",
    ),
    410: (
        "gone: the recorded bytes (a result or an input file) were removed from storage",
        "the bytes are gone: the result of job job_... was stored at s3://..., which no "
        "longer holds it",
    ),
    413: ("request body too large", "Request Entity Too Large"),
    416: ("the Range asked for lies outside the bytes", "range not satisfiable"),
    422: (
        "validation error; the message names the field",
        "invalid request: timeout_seconds: Expected `int` >= 1",
    ),
    429: ("rate limited; see Retry-After", "rate limit exceeded; retry in 12 s"),
    503: ("a dependency is unavailable; retry shortly", "the ledger's database is unavailable"),
}

# The client API reference's request, verbatim.
SUBMIT: dict[str, Any] = {
    "model": "gpt2",
    "input": "string or file_id",
    "output_config": {"destination": "local", "format": "json"},
    "requirements": {"gpu_type": "v100", "gpu_count": 1, "min_vram_gb": 16},
    "priority": "normal",
    "timeout_seconds": 3600,
}


def errors(*codes: int) -> dict[int, ResponseSpec]:
    """Response specs for the given error statuses, all with the standard error body."""
    specs: dict[int, ResponseSpec] = {}
    # Always 400 (replacing Litestar's generic one, whose body differs) and 503.
    for code in sorted({400, *codes, 503}):
        description, message = _ERRORS[code]
        example = {"error": {"status": code, "message": message, "details": None}}
        specs[code] = ResponseSpec(
            data_container=ErrorBody,
            description=description,
            examples=[Example(summary=description, value=example)],
        )
    return specs


def response(
    container: type[Any], description: str, example: dict[str, Any] | None = None
) -> ResponseSpec:
    """A documented success answer, with an example when one helps."""
    examples = [Example(summary=description, value=example)] if example else None
    return ResponseSpec(data_container=container, description=description, examples=examples)


# The seed's response examples.
SUBMITTED: dict[str, Any] = {
    "job_id": "job_0f8e2c1a9b7d4e6f8a0b1c2d3e4f5a6b",
    "estimated_cost": 0.05,
    "estimated_time_seconds": 600,
}
STATUS: dict[str, Any] = {
    "job_id": "job_0f8e2c1a9b7d4e6f8a0b1c2d3e4f5a6b",
    "status": "running",
    "progress": 45,
    "miner_id": "miner_5c0e1f2a3b4c4d5e8f9a0b1c2d3e4f5a",
    "created_at": "2026-02-13T10:00:00Z",
    "started_at": "2026-02-13T10:01:00Z",
    "completed_at": None,
    "result": None,
    "model": "gpt2",
    "priority": "normal",
    "attempt": 1,
    "estimated_cost": 0.05,
    "cost": None,
    "error": None,
}
LISTED: dict[str, Any] = {"jobs": [STATUS], "total": 1, "has_more": False, "next_cursor": None}

# The miner registry's examples.
REGISTER_MINER: dict[str, Any] = {
    "name": "rig-1",
    "gpu_type": "a100",
    "gpu_count": 8,
    "vram_gb": 80,
    "location": "eu-west",
    "price_per_hour": 0.1,
    "max_concurrent": 2,
}
_CAPABILITIES = {k: v for k, v in REGISTER_MINER.items() if k != "name"}
MINER_REGISTERED: dict[str, Any] = {
    "miner_id": "miner_5c0e1f2a3b4c4d5e8f9a0b1c2d3e4f5a",
    "api_key": "jl_3f9a0b1c2d3e_...",
    "key_id": "3f9a0b1c2d3e",
    "status": "offline",
    "name": "rig-1",
    **_CAPABILITIES,
}
MINER: dict[str, Any] = {
    "miner_id": "miner_5c0e1f2a3b4c4d5e8f9a0b1c2d3e4f5a",
    "name": "rig-1",
    "status": "online",
    **_CAPABILITIES,
    "inflight": 1,
    "reported_inflight": 1,
    "gpus": [
        {
            "index": 0,
            "name": "NVIDIA A100-SXM4-80GB",
            "uuid": "GPU-5c0e1f2a-3b4c-4d5e-8f9a-0b1c2d3e4f5a",
            "memory_total_mb": 81920,
            "driver": "550.54.15",
        }
    ],
    "last_heartbeat_at": "2026-02-13T10:01:05Z",
    "registered_at": "2026-02-13T09:00:00Z",
    "updated_at": "2026-02-13T09:00:00Z",
}
MINERS_LISTED: dict[str, Any] = {
    "miners": [MINER],
    "total": 1,
    "has_more": False,
    "next_cursor": None,
}
MINER_STATS: dict[str, Any] = {
    "miner_id": "miner_5c0e1f2a3b4c4d5e8f9a0b1c2d3e4f5a",
    "total_jobs": 20,
    "completed_jobs": 18,
    "failed_jobs": 1,
    "timed_out_jobs": 1,
    "success_rate": 0.9,
    "average_completion_time": 412.5,
    "earnings": 1.8,
    "earnings_per_gpu_hour": 0.8,
    "gpu_seconds": 8100,
}

FILE: dict[str, Any] = {
    "file_id": "file_3c5e1a0e2b7d4f6a8c9b0d1e2f3a4b5c",
    "size_bytes": 1048576,
    "sha256": "3f39d5c348e5b79d06e842c114e6cc571583bbf44e4b0ebfda1a01ec05745d43",
    "content_type": "application/octet-stream",
    "filename": "prompts.jsonl",
    "created_at": "2026-01-15T10:30:00Z",
    "used_by": None,
}


_BYTES = Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)


@dataclass
class RawUpload(Operation):
    """An operation whose body is the bytes themselves, read as a stream (not JSON)."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True,
            description="the bytes, streamed; at most JOBLEDGER_MAX_UPLOAD_BYTES",
            content={"application/octet-stream": OpenAPIMediaType(schema=_BYTES)},
        )


@dataclass
class FileUpload(Operation):
    """POST /v1/files: the raw bytes, or a multipart form whose part `file` holds them."""

    def __post_init__(self) -> None:
        form = Schema(type=OpenAPIType.OBJECT, properties={"file": _BYTES}, required=["file"])
        self.request_body = RequestBody(
            required=True,
            description=(
                "the file, streamed: as the raw body (name it with ?filename=), or as the "
                "multipart form part `file`; at most JOBLEDGER_MAX_UPLOAD_BYTES"
            ),
            content={
                "application/octet-stream": OpenAPIMediaType(schema=_BYTES),
                "multipart/form-data": OpenAPIMediaType(schema=form),
            },
        )


# Receipt keys: the key of the private key bytes 0..31, a well-known test value.
RECEIPT_KEY: dict[str, Any] = {
    "key_id": "ed25519:56475aa75463474c0285df5dbf2bcab7",
    "public_key": "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=",
    "status": "active",
}
REGISTER_RECEIPT_KEY: dict[str, Any] = {"public_key": RECEIPT_KEY["public_key"]}
RECEIPT_KEY_REVOKED: dict[str, Any] = RECEIPT_KEY | {"status": "revoked"}
RECEIPT_KEYS: dict[str, Any] = {"keys": [RECEIPT_KEY]}
