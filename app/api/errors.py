"""The one place that turns exceptions into HTTP answers: {"error": {status, message, details}}."""

from __future__ import annotations

import logging
import re
from typing import Any

import eventsourcing.persistence
import msgspec
import psycopg
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import (
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ExceptionHandlersMap

from app.api.schemas import ErrorBody, ErrorDetail
from app.blobs import BlobMissing, BlobUnavailable
from app.database_watch import DatabaseDown
from domain.errors import (
    Conflict,
    DomainError,
    InvalidJobRequest,
    NotFound,
)

log = logging.getLogger("jobledger.api")

# The database is down or unreachable: a 503 the client may retry, not a 500.
_UNAVAILABLE = (
    psycopg.OperationalError,
    eventsourcing.persistence.OperationalError,
    eventsourcing.persistence.InterfaceError,
)

# Money goes out as JSON numbers written from the Decimal's digits, never through a float.
_ENCODER = msgspec.json.Encoder(decimal_format="number")
_PATH = re.compile(r" - at `\$(?:\.data)?\.?([^`]*)`")
_NAMED_FIELD = re.compile(r"(?:unknown|required) field `([^`]+)`")
_MISSING_PARAMETER = re.compile(r"Missing required \w+ parameter '([^']+)'")

_DOMAIN_STATUS: tuple[tuple[type[DomainError], int], ...] = (
    (NotFound, HTTP_404_NOT_FOUND),
    (Conflict, HTTP_409_CONFLICT),
    (InvalidJobRequest, HTTP_422_UNPROCESSABLE_ENTITY),
)


class LedgerResponse(Response[Any]):
    """JSON responses encoded by msgspec with decimals as exact JSON numbers."""

    def render(self, content: Any, media_type: str, enc_hook: Any = None) -> bytes:
        """Encode JSON bodies ourselves; defer everything else to Litestar."""
        if media_type == MediaType.JSON and not isinstance(content, bytes | str):
            return _ENCODER.encode(content)
        return super().render(content, media_type, enc_hook)


def error_response(
    status: int, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> Response[Any]:
    """The standard error body."""
    body = ErrorBody(error=ErrorDetail(status=status, message=message, details=details))
    return LedgerResponse(body, status_code=status, headers=headers, media_type=MediaType.JSON)


def _field_of(path: str, message: str) -> str:
    """The field an error is about: its path, or for "unknown field `cost`", the field named."""
    if named := _NAMED_FIELD.search(message):
        return f"{path}.{named.group(1)}" if path else named.group(1)
    return path or "body"


def _validation_errors(exc: ValidationException) -> tuple[str, list[dict[str, str]]]:
    cause = str(exc.__cause__) if exc.__cause__ is not None else ""
    match = _PATH.search(cause)
    errors: list[dict[str, str]] = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        message = str(item.get("message", ""))
        if item.get("key") == "data" and message == "'data'":
            # Litestar's words for a request with no body at all.
            errors.append({"field": "body", "message": "a JSON body is required"})
            continue
        path = match.group(1) if match and item.get("source") == "body" else item.get("key", "")
        errors.append({"field": _field_of(str(path), message), "message": message})
    if not errors:
        missing = _MISSING_PARAMETER.search(str(exc.detail))
        field = missing.group(1) if missing else "request"
        return f"invalid request: {exc.detail}", [{"field": field, "message": str(exc.detail)}]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return f"invalid request: {summary}", errors


def strict_validation_error(error: msgspec.ValidationError) -> InvalidJobRequest:
    """A 422 for a body that only lax decoding would accept (e.g. "3600" for an integer)."""
    text = str(error)
    match = _PATH.search(text)
    message = _PATH.sub("", text)
    field = _field_of(match.group(1) if match else "", message)
    return InvalidJobRequest(
        f"invalid request: {field}: {message}",
        details={"errors": [{"field": field, "message": message}]},
    )


def handle_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Litestar's own exceptions: validation (422), malformed bodies (400), auth, limits."""
    if isinstance(exc, ValidationException):
        message, errors = _validation_errors(exc)
        return error_response(HTTP_422_UNPROCESSABLE_ENTITY, message, {"errors": errors})
    if exc.status_code >= HTTP_500_INTERNAL_SERVER_ERROR and exc.status_code != 503:
        log.error("server error on %s %s: %s", request.method, request.url.path, exc.detail)
    return error_response(exc.status_code, str(exc.detail), exc.extra or None, exc.headers)


def handle_domain(_: Request[Any, Any, Any], exc: DomainError) -> Response[Any]:
    """Domain refusals map to 404, 409 or 422 by their class."""
    for error_class, status in _DOMAIN_STATUS:
        if isinstance(exc, error_class):
            return error_response(status, exc.message, exc.details or None)
    return error_response(HTTP_422_UNPROCESSABLE_ENTITY, exc.message, exc.details or None)


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """A bug or an outage: log it whole, tell the client nothing internal."""
    if isinstance(exc, UnicodeDecodeError):
        return error_response(400, "invalid request: the body is not valid UTF-8")
    if isinstance(exc, RecursionError):
        # The framework decodes JSON bodies before our handlers; absurd nesting ends here.
        return error_response(400, "invalid request: the JSON is nested too deeply")
    if isinstance(exc, _UNAVAILABLE):
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            HTTP_503_SERVICE_UNAVAILABLE,
            "the ledger's database is unavailable; retry shortly",
            headers={"Retry-After": "2"},
        )
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(HTTP_500_INTERNAL_SERVER_ERROR, "internal server error")


def handle_database_down(request: Request[Any, Any, Any], exc: DatabaseDown) -> Response[Any]:
    """Refused untried while the database is down (the watch logs the outage once)."""
    return error_response(HTTP_503_SERVICE_UNAVAILABLE, str(exc), headers={"Retry-After": "1"})


def handle_blob_unavailable(request: Request[Any, Any, Any], exc: BlobUnavailable) -> Response[Any]:
    """Blob storage (a disk, S3) failed or cannot be reached: retry later, like the database."""
    log.warning("blob storage unavailable on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        HTTP_503_SERVICE_UNAVAILABLE,
        "the ledger's blob storage is unavailable; retry shortly",
        headers={"Retry-After": "2"},
    )


def handle_blob_missing(request: Request[Any, Any, Any], exc: BlobMissing) -> Response[Any]:
    """Bytes the ledger recorded are no longer where it put them (410)."""
    log.error("recorded bytes missing on %s %s: %s", request.method, request.url.path, exc)
    return error_response(410, f"the bytes are gone: {exc}")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    HTTPException: handle_http,
    DomainError: handle_domain,
    DatabaseDown: handle_database_down,
    BlobUnavailable: handle_blob_unavailable,
    BlobMissing: handle_blob_missing,
    Exception: handle_unexpected,
}
