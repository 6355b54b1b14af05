"""OpenAPI building blocks: the documented error answers, headers and the seed's examples."""

from __future__ import annotations

from typing import Any

from litestar.datastructures import ResponseHeader
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Example

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
    413: ("request body too large", "Request Entity Too Large"),
    422: (
        "validation error; the message names the field",
        "invalid request: timeout_seconds: Expected `int` >= 1",
    ),
    429: ("rate limited; see Retry-After", "rate limit exceeded; retry in 12 s"),
    503: ("a dependency is unavailable; retry shortly", "the ledger's database is unavailable"),
}

SUBMIT: dict[str, Any] = {
    "model": "gpt2",
    "input": "Hello, GPU",
    "output_config": {"destination": "local", "format": "json"},
    "requirements": {"gpu_type": "v100", "gpu_count": 1, "min_vram_gb": 16},
    "priority": "normal",
    "timeout_seconds": 3600,
}

RATE_LIMIT_HEADERS = [
    ResponseHeader(
        documentation_only=True,
        name="X-RateLimit-Limit",
        description="requests allowed in the binding window",
    ),
    ResponseHeader(
        documentation_only=True,
        name="X-RateLimit-Remaining",
        description="requests left in that window",
    ),
    ResponseHeader(
        documentation_only=True,
        name="X-RateLimit-Reset",
        description="unix time when that window resets",
    ),
]


def errors(*codes: int) -> dict[int, ResponseSpec]:
    """Response specs for the given error statuses, all with the standard error body."""
    specs: dict[int, ResponseSpec] = {}
    for code in (*codes, 503):
        description, message = _ERRORS[code]
        example = {"error": {"status": code, "message": message, "details": None}}
        specs[code] = ResponseSpec(
            data_container=ErrorBody,
            description=description,
            examples=[Example(summary=description, value=example)],
        )
    return specs


def response(container: type[Any], description: str) -> ResponseSpec:
    """A documented non-default success answer."""
    return ResponseSpec(data_container=container, description=description)
