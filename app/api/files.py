"""/v1/files: clients upload job inputs as a stream, read them back, delete unused ones."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT

from app.api import openapi
from app.api.auth import allow, owner_filter
from app.api.errors import LedgerResponse
from app.api.jobs import READERS, require_blob, services_of
from app.api.schemas import FileResponse
from app.api.transfer import (
    MultipartError,
    body_chunks,
    multipart_file,
    stream_response,
)
from app.blobs import BlobTooLarge, Location, file_location
from app.keys import Principal, Role
from app.services import Services
from app.store import FileFacts
from domain.files import file_aggregate_id_of

_MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f\"\\/]")
MAX_FILENAME = 255


class PayloadTooLarge(HTTPException):
    """The body is larger than the ledger accepts (413)."""

    status_code = 413


class BadUpload(HTTPException):
    """The body is not a well-formed upload (400)."""

    status_code = 400


def too_large(limit: int) -> PayloadTooLarge:
    """The 413 for a body past `limit` bytes, saying what the limit is."""
    return PayloadTooLarge(
        f"the body is larger than {limit} bytes, the most this ledger accepts "
        "(JOBLEDGER_MAX_UPLOAD_BYTES)",
        extra={"limit_bytes": limit},
    )


def refuse_announced_excess(request: Request[Any, Any, Any], limit: int) -> None:
    """Answer 413 before reading anything when Content-Length already says too much."""
    announced = request.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > limit:
        raise too_large(limit)


def media_type_of(value: str | None) -> str:
    """A well-formed media type (parameters dropped), or application/octet-stream.

    application/x-www-form-urlencoded is what `curl --data-binary` sends unless told
    otherwise; it never describes an uploaded file, so it counts as unknown too.
    """
    bare = (value or "").split(";", 1)[0].strip().lower()
    if bare == "application/x-www-form-urlencoded" or not _MEDIA_TYPE.fullmatch(bare):
        return "application/octet-stream"
    return bare


def safe_filename(value: str | None) -> str | None:
    """The last path component of a client's file name, without control characters or quotes."""
    if not value:
        return None
    name = _UNSAFE_NAME.sub("_", value.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    if name in (".", ".."):
        return None  # a path step, not a name
    return name[:MAX_FILENAME] or None


def file_view(facts: FileFacts) -> FileResponse:
    """The public shape of a file."""
    return FileResponse(
        file_id=facts.file_id,
        size_bytes=facts.size_bytes,
        sha256=facts.sha256,
        content_type=facts.content_type,
        filename=facts.filename,
        created_at=facts.created_at,
        used_by=facts.used_by,
    )


async def _incoming(
    request: Request[Any, Any, Any], filename: str | None
) -> tuple[AsyncIterator[bytes], str, str | None]:
    """The upload's bytes, media type and file name: a multipart part or the raw body."""
    content_type = request.headers.get("content-type", "")
    if content_type.lower().startswith("multipart/form-data"):
        try:
            part = await multipart_file(request)
        except MultipartError as error:
            raise BadUpload(str(error)) from None
        return part.chunks, media_type_of(part.content_type), safe_filename(part.filename)
    return body_chunks(request), media_type_of(content_type), safe_filename(filename)


async def receive_file(
    services: Services, request: Request[Any, Any, Any], owner: str, filename: str | None
) -> tuple[FileFacts, bool]:
    """Stream an upload into the blob store and record it; returns the file and if it is new."""
    limit = services.settings.max_upload_bytes
    refuse_announced_excess(request, limit)
    chunks, media_type, name = await _incoming(request, filename)
    location = file_location(uuid.uuid4().hex)
    try:
        stored = await services.blobs.put(
            location, chunks, content_type=media_type, max_bytes=limit
        )
    except BlobTooLarge:
        raise too_large(limit) from None
    except MultipartError as error:  # raised mid-stream: the store kept nothing
        raise BadUpload(str(error)) from None
    uploaded = await services.run(
        services.ledger.upload_file,
        owner=owner,
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
        content_type=media_type,
        filename=name,
        location=str(location),
    )
    if not uploaded.created:  # the owner had these bytes already: keep one copy
        await services.blobs.delete(location)
    return uploaded.file, uploaded.created


class FileController(Controller):
    """/v1/files: a client's uploaded inputs; auditors and admins read everyone's."""

    path = "/v1/files"
    tags = ["files"]
    response_class = LedgerResponse

    @post(
        "/",
        guards=[allow(Role.CLIENT)],
        status_code=HTTP_201_CREATED,
        summary="Upload an input file",
        operation_class=openapi.FileUpload,
        # Streamed into the blob store; the limit is JOBLEDGER_MAX_UPLOAD_BYTES, not the JSON one.
        request_max_body_size=None,
        responses={
            201: openapi.response(FileResponse, "the file is stored", openapi.FILE),
            200: openapi.response(FileResponse, "you had uploaded these bytes before"),
            **openapi.errors(401, 403, 413, 422, 429),
        },
    )
    async def upload(
        self,
        request: Request[Principal, Any, Any],
        state: State,
        filename: Annotated[
            str | None,
            Parameter(
                query="filename",
                max_length=1024,
                description="a name to remember the file by, for raw-body uploads",
            ),
        ] = None,
    ) -> Response[FileResponse]:
        """Store a file sent as the raw body or as the multipart part `file`; name it in a job."""
        facts, created = await receive_file(
            services_of(state), request, request.user.subject, filename
        )
        code = HTTP_201_CREATED if created else HTTP_200_OK
        return LedgerResponse(file_view(facts), status_code=code)

    @get(
        "/{file_id:str}",
        guards=[allow(*READERS)],
        summary="An uploaded file's facts",
        responses={
            200: openapi.response(FileResponse, "the file", openapi.FILE),
            **openapi.errors(401, 403, 404, 429),
        },
    )
    async def get_file(
        self, request: Request[Principal, Any, Any], state: State, file_id: str
    ) -> FileResponse:
        """Size, digest, type and name of a file, and the first job that used it."""
        services = services_of(state)
        file_aggregate_id_of(file_id)  # a malformed id is not found without asking the database
        facts = await services.run(services.ledger.file, file_id, owner=owner_filter(request.user))
        return file_view(facts)

    @get(
        "/{file_id:str}/content",
        guards=[allow(*READERS)],
        summary="An uploaded file's bytes",
        media_type="application/octet-stream",
        responses=openapi.errors(401, 403, 404, 410, 416, 429),
    )
    async def content(
        self, request: Request[Principal, Any, Any], state: State, file_id: str
    ) -> Response[Any]:
        """The file's bytes, with their sha256 as ETag and Digest; Range requests resume."""
        services = services_of(state)
        file_aggregate_id_of(file_id)
        facts = await services.run(services.ledger.file, file_id, owner=owner_filter(request.user))
        location = Location.parse(facts.location, services.settings.s3_allowed_buckets)
        await require_blob(services.blobs, location, f"file {file_id}")
        return stream_response(
            request_headers=request.headers,
            size=facts.size_bytes,
            sha256=facts.sha256,
            media_type=facts.content_type,
            filename=facts.filename or facts.file_id,
            chunks=lambda start, end: services.blobs.read(location, start, end),
        )

    @delete(
        "/{file_id:str}",
        guards=[allow(Role.CLIENT, Role.ADMIN)],
        status_code=HTTP_204_NO_CONTENT,
        summary="Delete a file no job used",
        responses=openapi.errors(401, 403, 404, 409, 429),
    )
    async def delete_file(
        self, request: Request[Principal, Any, Any], state: State, file_id: str
    ) -> None:
        """Delete the file and its bytes; 409 once a job used it (its record names them)."""
        services = services_of(state)
        file_aggregate_id_of(file_id)
        location = await services.run(
            services.ledger.delete_file, file_id, owner=owner_filter(request.user)
        )
        await services.blobs.delete(Location.parse(location, services.settings.s3_allowed_buckets))
