"""The miner's side of inputs and results: fetch a held attempt's input, store its result.

Both routes take a miner key and answer only for an attempt that miner holds right
now (assigned, running or canceling, on that attempt number); for anything else the
attempt is not found. The routes are docs/protocol.md's "Inputs" and "Results".
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

from litestar import Controller, Request, Response, get, put
from litestar.datastructures import State
from litestar.status_codes import HTTP_201_CREATED

from app.api import openapi
from app.api.auth import allow
from app.api.errors import LedgerResponse
from app.api.files import BadUpload, refuse_announced_excess, too_large
from app.api.jobs import require_blob, services_of
from app.api.schemas import UploadResultResponse
from app.api.transfer import body_chunks, parse_content_digest, stream_response
from app.blobs import BlobTooLarge, DigestMismatch, Location, result_location
from app.formats import MEDIA_TYPES, FormatMismatch, checked
from app.keys import Principal, Role
from domain.errors import InvalidJobRequest
from domain.jobs import aggregate_id_of


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


class AttemptController(Controller):
    """/v1/jobs/{job_id}/attempts/{attempt}: what the miner holding the attempt may touch."""

    path = "/v1/jobs/{job_id:str}/attempts/{attempt:int}"
    tags = ["miners"]
    response_class = LedgerResponse

    @get(
        "/input",
        guards=[allow(Role.MINER)],
        summary="Fetch the input of an attempt you hold",
        media_type="application/octet-stream",
        responses=openapi.errors(401, 403, 404, 410, 416, 429),
    )
    async def fetch_input(
        self, request: Request[Principal, Any, Any], state: State, job_id: str, attempt: int
    ) -> Response[Any]:
        """The input bytes (an uploaded file, or the text as UTF-8); Range requests resume."""
        services = services_of(state)
        aggregate_id_of(job_id)
        facts = await services.run(
            services.ledger.attempt_input, job_id, miner_id=request.user.subject, attempt=attempt
        )
        if facts.text is not None:
            data = facts.text.encode()
            return stream_response(
                request_headers=request.headers,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                media_type=MEDIA_TYPES["text"],
                filename=None,
                chunks=lambda start, end: _one_chunk(data[start:end]),
            )
        assert facts.location is not None and facts.sha256 is not None  # a file input
        location = Location.parse(facts.location, services.settings.s3_allowed_buckets)
        await require_blob(services.blobs, location, f"the input of job {job_id}")
        return stream_response(
            request_headers=request.headers,
            size=facts.size_bytes,
            sha256=facts.sha256,
            media_type="application/octet-stream",
            filename=None,
            chunks=lambda start, end: services.blobs.read(location, start, end),
        )

    @put(
        "/result",
        guards=[allow(Role.MINER)],
        status_code=HTTP_201_CREATED,
        summary="Store the result of an attempt you hold",
        operation_class=openapi.RawUpload,
        # Streamed into the blob store; the limit is JOBLEDGER_MAX_UPLOAD_BYTES.
        request_max_body_size=None,
        responses={
            201: openapi.response(UploadResultResponse, "the bytes are stored"),
            **openapi.errors(401, 403, 404, 413, 422, 429),
        },
    )
    async def store_result(
        self, request: Request[Principal, Any, Any], state: State, job_id: str, attempt: int
    ) -> Response[UploadResultResponse]:
        """Store the result where the job's destination says; then report `completed` with it.

        The bytes must be in the job's output format and, if a Content-Digest is sent,
        hash to it; otherwise nothing is kept. Uploading again replaces the bytes.
        """
        services = services_of(state)
        aggregate_id_of(job_id)
        miner_id = request.user.subject
        try:
            expected = parse_content_digest(request.headers.get("content-digest"))
        except ValueError as error:
            raise BadUpload(str(error)) from None
        limit = services.settings.max_upload_bytes
        refuse_announced_excess(request, limit)
        destination, output_format = await services.run(
            services.ledger.output_of, job_id, miner_id=miner_id, attempt=attempt
        )
        location = result_location(destination, job_id, attempt, output_format)
        media_type = MEDIA_TYPES[output_format]
        try:
            # A failed check raises inside the stream, so the store keeps nothing (and
            # whatever an earlier upload of this attempt stored stays as it was).
            stored = await services.blobs.put(
                location,
                checked(body_chunks(request), output_format),
                content_type=media_type,
                max_bytes=limit,
                expected_sha256=expected,
            )
        except BlobTooLarge:
            raise too_large(limit) from None
        except FormatMismatch as error:
            raise InvalidJobRequest(
                f"the result is not what the job asked for: {error}; nothing was kept",
                details={"format": output_format},
            ) from None
        except DigestMismatch as error:
            raise InvalidJobRequest(
                f"{error}; nothing was kept",
                details={"expected": error.expected, "received": error.received},
            ) from None
        await services.run(
            services.ledger.store_result,
            job_id,
            miner_id=miner_id,
            attempt=attempt,
            location=str(location),
            size_bytes=stored.size_bytes,
            sha256=stored.sha256,
            content_type=media_type,
        )
        body = UploadResultResponse(
            location=str(location),
            size_bytes=stored.size_bytes,
            sha256=stored.sha256,
            content_type=media_type,
        )
        return LedgerResponse(body, status_code=HTTP_201_CREATED)
