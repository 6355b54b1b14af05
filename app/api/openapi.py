"""OpenAPI building blocks: the documented error answers, headers, the seed's examples and links."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import (
    Example,
    Link,
    OpenAPI,
    OpenAPIMediaType,
    OpenAPIResponse,
    Operation,
    RequestBody,
    Schema,
)
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType
from litestar.plugins import OpenAPISchemaPlugin

from app.api.auth import PUBLIC_PATHS
from app.api.schemas import ErrorBody

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.typing import FieldDefinition

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
            # HTTP cannot tell an absent body from an empty one: either is an empty file.
            required=False,
            description=(
                "the file, streamed: as the raw body (name it with ?filename=), or as the "
                "multipart form part `file`; at most JOBLEDGER_MAX_UPLOAD_BYTES; no body "
                "is an empty file"
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


class DecimalAsNumber(OpenAPISchemaPlugin):
    """Money and rates go out as exact JSON numbers (LedgerResponse): "number", not "string"."""

    @staticmethod
    def is_plugin_supported_type(value: Any) -> bool:
        """Only `Decimal` itself."""
        return value is Decimal

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        """A plain number; the field's own description and examples are added by Litestar."""
        return Schema(type=OpenAPIType.NUMBER)


class StrictStructs(StructSchemaPlugin):
    """A body decoded with `forbid_unknown_fields` says so: `additionalProperties: false`."""

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        """Litestar's own schema of the struct, closed when the struct refuses unknown fields."""
        schema = super().to_openapi_schema(field_definition, schema_creator)
        if field_definition.type_.__struct_config__.forbid_unknown_fields:
            schema.additional_properties = False
        return schema


@dataclass(frozen=True)
class Follow:
    """A link from an answer to the operation `target` ("GET /v1/jobs/{job_id}")."""

    target: str
    description: str
    # Parameter name → constant or runtime expression ("$response.body#/job_id").
    parameters: dict[str, str] = field(default_factory=dict)
    # Merged into the target's body by tools that follow links (schemathesis does).
    request_body: Any = None


def _job_links(job_id: str) -> dict[str, Follow]:
    """Where a job's id leads: its status, events, result, cancellation and event stream."""
    return {
        "status": Follow("GET /v1/jobs/{job_id}", "the job's status", {"job_id": job_id}),
        "events": Follow(
            "GET /v1/jobs/{job_id}/events", "the job's event history", {"job_id": job_id}
        ),
        "download": Follow(
            "GET /v1/jobs/{job_id}/download", "the job's result bytes", {"job_id": job_id}
        ),
        "cancel": Follow("DELETE /v1/jobs/{job_id}", "cancel the job", {"job_id": job_id}),
        # timeout 0: what is stored, then the stream closes (a link must not open forever).
        "watch": Follow(
            "GET /v1/jobs/{job_id}/watch",
            "the job's events so far, as Server-Sent Events",
            {"job_id": job_id, "timeout": "0"},
        ),
    }


def _file_links(file_id: str) -> dict[str, Follow]:
    """Where a file's id leads: its facts, its bytes, its deletion, a job reading it."""
    return {
        "facts": Follow("GET /v1/files/{file_id}", "the file's facts", {"file_id": file_id}),
        "content": Follow(
            "GET /v1/files/{file_id}/content", "the file's bytes", {"file_id": file_id}
        ),
        "delete": Follow("DELETE /v1/files/{file_id}", "delete the file", {"file_id": file_id}),
        "submit": Follow(
            "POST /v1/jobs",
            "submit a job whose input is the file",
            request_body={"input": {"file_id": file_id}},
        ),
    }


def _miner_links(miner_id: str) -> dict[str, Follow]:
    """Where a miner's id leads: itself, its record, its receipt keys, its retirement."""
    path = {"miner_id": miner_id}
    return {
        "miner": Follow("GET /v1/miners/{miner_id}", "the miner", path),
        "update": Follow("PUT /v1/miners/{miner_id}", "change what the miner offers", path),
        "stats": Follow("GET /v1/miners/{miner_id}/stats", "the miner's job record", path),
        "keys": Follow("GET /v1/miners/{miner_id}/keys", "the miner's receipt keys", path),
        "register_key": Follow("POST /v1/miners/{miner_id}/keys", "add a receipt key", path),
        "deregister": Follow("DELETE /v1/miners/{miner_id}", "retire the miner", path),
    }


_JOB_ID = "$response.body#/job_id"
_FILE_ID = "$response.body#/file_id"
_MINER_ID = "$response.body#/miner_id"
_NEXT_PAGE = {"cursor": "$response.body#/next_cursor"}
_RECEIPT_KEY = {"miner_id": "$request.path.miner_id", "key_id": "$response.body#/key_id"}

# Operation → status → name → link: how a client (or schemathesis' stateful phase)
# gets from an answer to the calls that use the ids in it.
LINKS: dict[str, dict[int, dict[str, Follow]]] = {
    "POST /v1/jobs": {201: _job_links(_JOB_ID)},
    "GET /v1/jobs": {
        200: {
            **_job_links("$response.body#/jobs/0/job_id"),
            "next_page": Follow("GET /v1/jobs", "the next page", _NEXT_PAGE),
        }
    },
    "GET /v1/jobs/history": {
        200: {
            "next_page": Follow(
                "GET /v1/jobs/history",
                "the next page of the same window",
                {"from": "$request.query.from", "to": "$request.query.to", **_NEXT_PAGE},
            )
        }
    },
    "GET /v1/jobs/{job_id}": {200: _job_links(_JOB_ID)},
    "DELETE /v1/jobs/{job_id}": {
        status: {name: _job_links(_JOB_ID)[name] for name in ("status", "events")}
        for status in (200, 202)
    },
    "POST /v1/files": {201: _file_links(_FILE_ID), 200: _file_links(_FILE_ID)},
    "GET /v1/files/{file_id}": {200: _file_links(_FILE_ID)},
    "POST /v1/miners": {201: _miner_links(_MINER_ID)},
    "GET /v1/miners": {200: _miner_links("$response.body#/miners/0/miner_id")},
    "POST /v1/miners/{miner_id}/keys": {
        status: {
            "revoke": Follow(
                "DELETE /v1/miners/{miner_id}/keys/{key_id}", "revoke the key", _RECEIPT_KEY
            )
        }
        for status in (201, 200)
    },
    "POST /v1/admin/keys": {
        201: {
            "revoke": Follow(
                "DELETE /v1/admin/keys/{key_id}",
                "revoke the key",
                {"key_id": "$response.body#/key_id"},
            )
        }
    },
}

_METHODS = ("get", "put", "post", "delete", "patch")


def operations_of(document: OpenAPI) -> dict[str, Operation]:
    """Every operation of the document by "METHOD /path"."""
    return {
        f"{method.upper()} {path}": operation
        for path, item in (document.paths or {}).items()
        for method in _METHODS
        if (operation := getattr(item, method)) is not None
    }


def complete(document: OpenAPI) -> None:
    """Add what route handlers cannot declare: LINKS, and no security on the public routes.

    A KeyError here means LINKS names an operation or status the API does not have.
    """
    operations = operations_of(document)
    for source, by_status in LINKS.items():
        responses = operations[source].responses or {}
        for status, links in by_status.items():
            response = responses[str(status)]
            assert isinstance(response, OpenAPIResponse)
            response.links = {
                name: Link(
                    operation_id=operations[follow.target].operation_id,
                    description=follow.description,
                    parameters=follow.parameters or None,
                    request_body=follow.request_body,
                )
                for name, follow in links.items()
            }
    for name, operation in operations.items():
        path = name.split(" ", 1)[1]
        if any(re.match(pattern, path) for pattern in PUBLIC_PATHS):
            operation.security = []  # the middleware lets these through without a key
