"""The client API: submit, status, list, cancel, download, history and events of jobs."""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.openapi.spec import Example
from litestar.params import Body, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_202_ACCEPTED

from app.api import openapi
from app.api.auth import allow, owner_filter
from app.api.errors import LedgerResponse, strict_validation_error
from app.api.observability import seconds_since_arrival
from app.api.schemas import (
    FileInput,
    HistoryResponse,
    HistoryTotals,
    JobEvent,
    JobEventsResponse,
    JobListResponse,
    JobStatusResponse,
    SubmitJobRequest,
    SubmitJobResponse,
)
from app.api.transfer import stream_response
from app.audit.replay import job_as_of, parse_as_of
from app.blobs import BlobMissing, Blobs, InvalidLocation, Location, check_destination
from app.formats import EXTENSIONS, MEDIA_TYPES
from app.keys import Principal, Role
from app.logs import bind_log_ids
from app.services import Services
from app.store import SubmitRequest
from domain.errors import Conflict, InvalidJobRequest, JobNotFound
from domain.files import is_file_id
from domain.gpus import normalize_gpu_type
from domain.jobs import JobSpec, JobStatus, aggregate_id_of
from projections.jobs import JobRow

log = logging.getLogger("jobledger.api.jobs")
MAX_PAGE = 100
_STRICT_SUBMIT = msgspec.json.Decoder(SubmitJobRequest)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")
_CURSOR_PREFIX = "seq:"


def services_of(state: State) -> Services:
    """The process's services, opened by the lifespan."""
    services: Services = state.services
    return services


def status_view(row: JobRow, pending_reason: str | None = None) -> JobStatusResponse:
    """The public shape of a job row."""
    return JobStatusResponse(
        job_id=row.job_id,
        status=row.status,
        progress=row.progress,
        miner_id=row.miner_id,
        created_at=row.created_at,
        started_at=row.started_at,
        completed_at=row.completed_at,
        result=row.result,
        model=row.model,
        priority=row.priority,
        attempt=row.attempt,
        estimated_cost=row.estimated_cost,
        cost=row.cost,
        error=row.error,
        error_code=row.error_code,
        pending_reason=pending_reason if row.status == JobStatus.PENDING else None,
    )


def downloadable(result: dict[str, Any], allowed_buckets: frozenset[str]) -> Location | bytes:
    """Where a completed job's result bytes are: a stored location, or the inline bytes."""
    if result.get("storage") == "stored":
        return Location.parse(str(result["location"]), allowed_buckets)
    data = str(result["data"])
    return base64.b64decode(data) if result.get("encoding") == "base64" else data.encode()


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def require_blob(blobs: Blobs, location: Location, what: str) -> None:
    """BlobMissing (410) before any byte is sent if the recorded bytes are not there."""
    if await blobs.stat(location) is None:
        raise BlobMissing(f"{what} was stored at {location}, which no longer holds it")


def encode_cursor(seq: int) -> str:
    """An opaque continuation token for the page after the job at `seq`."""
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The position a cursor continues after; a token we did not issue is a 422."""
    if cursor is None:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if text.startswith(_CURSOR_PREFIX):
            return int(text.removeprefix(_CURSOR_PREFIX))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise InvalidJobRequest(
        "cursor is not valid: pass next_cursor from a previous page", details={"field": "cursor"}
    )


def parse_bound(value: str, field: str, *, end: bool) -> datetime:
    """A history bound: YYYY-MM-DD (the whole day, inclusive) or an RFC 3339 time with offset."""
    try:
        if _DATE.fullmatch(value):
            moment = datetime.combine(date.fromisoformat(value), time.min, tzinfo=UTC)
            return moment + timedelta(days=1, microseconds=-1) if end else moment
        if _RFC3339.fullmatch(value):
            return datetime.fromisoformat(value.upper().replace(" ", "T")).astimezone(UTC)
    except (ValueError, OverflowError):
        pass  # shaped right but impossible: 2026-02-30, or 0001-01-01T00:00:00+05:00
    raise InvalidJobRequest(
        f"{field} must be a date (YYYY-MM-DD) or an RFC 3339 time with an offset "
        f"(2026-01-31T23:59:59Z), got {value!r}",
        details={"field": field},
    )


def to_spec(data: SubmitJobRequest, services: Services) -> JobSpec:
    """Check what the schema cannot (destination, GPU type) and build the domain's spec."""
    destination = data.output_config.destination
    try:
        check_destination(destination, services.settings.s3_allowed_buckets)
    except InvalidLocation as error:
        raise InvalidJobRequest(
            str(error), details={"field": "output_config.destination"}
        ) from None
    if isinstance(data.input, FileInput):
        input_text, input_file_id = None, data.input.file_id
    elif is_file_id(data.input):
        input_text, input_file_id = None, data.input
    else:
        input_text, input_file_id = data.input, None
    return JobSpec(
        model=data.model,
        input_text=input_text,
        input_file_id=input_file_id,
        output_destination=destination,
        output_format=data.output_config.format,
        gpu_type=normalize_gpu_type(data.requirements.gpu_type),
        gpu_count=data.requirements.gpu_count,
        min_vram_gb=data.requirements.min_vram_gb,
        priority=data.priority,
        timeout_seconds=data.timeout_seconds,
    )


async def load_row(services: Services, principal: Principal, job_id: str) -> JobRow:
    """The job's view row; straight from the log if the projector has not reached it yet."""
    owner = owner_filter(principal)
    aggregate_id_of(job_id)  # a malformed id is not found without asking the database
    row = await services.queries.get(job_id)
    if row is None:
        return await services.run(services.ledger.job_row, job_id, owner=owner)
    if owner is not None and row.owner != owner:
        raise JobNotFound(f"job {job_id!r} not found", details={"job_id": job_id})
    return row


async def status_as_of(
    services: Services, principal: Principal, job_id: str, as_of: str
) -> JobStatusResponse:
    """The job as it stood at `as_of`, from its events; no pending reason (not in the history)."""
    moment = parse_as_of(as_of)
    row, _ = await services.run(
        job_as_of, services.ledger, job_id, moment, owner=owner_filter(principal)
    )
    return status_view(row)


READERS = (Role.CLIENT, Role.AUDITOR, Role.ADMIN)


class JobController(Controller):
    """/v1/jobs: clients act on their own jobs; auditors and admins read all of them."""

    path = "/v1/jobs"
    tags = ["jobs"]
    response_class = LedgerResponse

    @post(
        "/",
        guards=[allow(Role.CLIENT)],
        status_code=HTTP_201_CREATED,
        summary="Submit a job",
        responses={
            201: openapi.response(SubmitJobResponse, "the job is recorded", openapi.SUBMITTED),
            **openapi.errors(401, 403, 409, 413, 422, 429),
        },
    )
    async def submit(
        self,
        request: Request[Principal, Any, Any],
        state: State,
        data: Annotated[
            SubmitJobRequest, Body(examples=[Example(summary="seed example", value=openapi.SUBMIT)])
        ],
        idempotency_key: Annotated[
            str | None,
            Parameter(
                header="Idempotency-Key",
                min_length=1,
                max_length=255,
                pattern=r"^[\x21-\x7e]+$",
                description="retries with the same key return the original job, never a second",
            ),
        ] = None,
    ) -> Response[SubmitJobResponse]:
        """Submit a job; answers once it is durable and visible in the status view."""
        services = services_of(state)
        # Litestar decoded `data` leniently ("3600" would pass for 3600); a ledger
        # takes only exact types, so the body is decoded once more, strictly.
        try:
            data = _STRICT_SUBMIT.decode(await request.body())
        except msgspec.ValidationError as error:
            raise strict_validation_error(error) from None
        spec = to_spec(data, services)
        outcome = await services.submissions.submit(
            SubmitRequest(owner=request.user.subject, spec=spec, idempotency_key=idempotency_key)
        )
        if outcome.created:
            await services.views.wait_for(outcome.position, services.settings.view_wait_seconds)
        bind_log_ids(job_id=outcome.job_id)
        log.info("job %s %s", outcome.job_id, "submitted" if outcome.created else "replayed")
        if (waited := seconds_since_arrival(request.scope)) is not None:
            outcome_label = "created" if outcome.created else "replayed"
            services.metrics.submit_latency.labels(outcome_label).observe(waited)
        body = SubmitJobResponse(
            job_id=outcome.job_id,
            estimated_cost=outcome.estimated_cost,
            estimated_time_seconds=outcome.estimated_time_seconds,
        )
        headers = {} if outcome.created else {"Idempotent-Replayed": "true"}
        return LedgerResponse(body, status_code=HTTP_201_CREATED, headers=headers)

    @get(
        "/",
        guards=[allow(*READERS)],
        summary="List jobs",
        responses={
            200: openapi.response(JobListResponse, "a page of jobs", openapi.LISTED),
            **openapi.errors(401, 403, 422, 429),
        },
    )
    async def list_jobs(
        self,
        request: Request[Principal, Any, Any],
        state: State,
        status: JobStatus | None = None,
        limit: Annotated[int, Parameter(ge=1, le=MAX_PAGE)] = 20,
        cursor: Annotated[str | None, Parameter(max_length=200)] = None,
    ) -> JobListResponse:
        """Jobs newest first; paging by cursor neither skips nor repeats a job."""
        services = services_of(state)
        page = await services.queries.page(
            owner=owner_filter(request.user),
            status=status.value if status else None,
            limit=limit,
            before_seq=decode_cursor(cursor),
        )
        return JobListResponse(
            jobs=[status_view(row) for row in page.rows],
            total=page.total,
            has_more=page.has_more,
            next_cursor=encode_cursor(page.rows[-1].seq) if page.has_more else None,
        )

    @get(
        "/history",
        guards=[allow(*READERS)],
        summary="Jobs created in a window, with totals",
        responses=openapi.errors(401, 403, 422, 429),
    )
    async def history(
        self,
        request: Request[Principal, Any, Any],
        state: State,
        # Required, but checked here so that one answer names every missing bound.
        window_from: Annotated[
            str | None,
            Parameter(
                query="from",
                description="required: YYYY-MM-DD or RFC 3339",
                examples=[Example(value="2026-01-01")],
            ),
        ] = None,
        window_to: Annotated[
            str | None,
            Parameter(
                query="to",
                description="required: YYYY-MM-DD or RFC 3339 (inclusive)",
                examples=[Example(value="2026-01-31")],
            ),
        ] = None,
        limit: Annotated[int, Parameter(ge=1, le=MAX_PAGE)] = 100,
        cursor: Annotated[str | None, Parameter(max_length=200)] = None,
    ) -> HistoryResponse:
        """Jobs created between `from` and `to` inclusive; totals cover the whole window."""
        if not window_from or not window_to:
            bounds = (("from", window_from), ("to", window_to))
            missing = [name for name, value in bounds if not value]
            raise InvalidJobRequest(
                f"history needs {' and '.join(missing)}: a date (YYYY-MM-DD) or an RFC 3339 time",
                details={"errors": [{"field": name, "message": "required"} for name in missing]},
            )
        start = parse_bound(window_from, "from", end=False)
        end = parse_bound(window_to, "to", end=True)
        if start > end:
            raise InvalidJobRequest("from must not be after to", details={"field": "from"})
        services = services_of(state)
        page, totals = await services.queries.history(
            owner=owner_filter(request.user),
            start=start,
            end=end,
            limit=limit,
            before_seq=decode_cursor(cursor),
        )
        return HistoryResponse(
            window_from=start,
            window_to=end,
            jobs=[status_view(row) for row in page.rows],
            totals=HistoryTotals(
                jobs=totals.jobs,
                by_status=totals.by_status,
                total_cost=totals.total_cost,
                total_estimated_cost=totals.total_estimated_cost,
            ),
            has_more=page.has_more,
            next_cursor=encode_cursor(page.rows[-1].seq) if page.has_more else None,
        )

    @get(
        "/{job_id:str}",
        guards=[allow(*READERS)],
        summary="Job status",
        responses={
            200: openapi.response(JobStatusResponse, "the job", openapi.STATUS),
            **openapi.errors(401, 403, 404, 422, 429),
        },
    )
    async def status(
        self,
        request: Request[Principal, Any, Any],
        state: State,
        job_id: str,
        as_of: Annotated[
            str | None,
            Parameter(
                description="the job as it stood then, rebuilt from its events: an event "
                "sequence number (1 = just submitted) or an RFC 3339 time with an offset; "
                "later than the last event is the current state, before the job is a 404",
                examples=[Example(value="2"), Example(value="2026-11-29T12:00:00Z")],
            ),
        ] = None,
    ) -> JobStatusResponse:
        """The job as the status view shows it; a pending job says why it waits.

        With `as_of`, the job as it stood then, replayed from its events: a sequence
        past the last event or a time after it (even in the future) is the current
        state; sequence 0 or a time before the submission is a 404; anything else a 422.
        """
        services = services_of(state)
        if as_of is not None:
            return await status_as_of(services, request.user, job_id, as_of)
        row = await load_row(services, request.user, job_id)
        reason = None
        if row.status == JobStatus.PENDING:
            reason = await services.queries.pending_reason(job_id)
        return status_view(row, reason)

    @delete(
        "/{job_id:str}",
        guards=[allow(Role.CLIENT, Role.ADMIN)],
        status_code=HTTP_200_OK,
        summary="Cancel a job",
        responses={
            202: openapi.response(JobStatusResponse, "cancel requested; the miner is told to stop"),
            **openapi.errors(401, 403, 404, 409, 429),
        },
    )
    async def cancel(
        self, request: Request[Principal, Any, Any], state: State, job_id: str
    ) -> Response[JobStatusResponse]:
        """Cancel: pending jobs at once (200); assigned or running ones become canceling (202)."""
        services = services_of(state)
        row, position = await services.run(
            services.ledger.cancel, job_id, owner=owner_filter(request.user)
        )
        await services.views.wait_for(position, services.settings.view_wait_seconds)
        log.info("job %s %s by request", job_id, row.status)
        code = HTTP_202_ACCEPTED if row.status == JobStatus.CANCELING else HTTP_200_OK
        return LedgerResponse(status_view(row), status_code=code)

    @get(
        "/{job_id:str}/download",
        guards=[allow(*READERS)],
        summary="Download the result",
        media_type="application/octet-stream",
        responses=openapi.errors(401, 403, 404, 409, 410, 416, 429),
    )
    async def download(
        self, request: Request[Principal, Any, Any], state: State, job_id: str
    ) -> Response[Any]:
        """The result bytes in the job's format, with their sha256 (ETag, Digest); Range resumes.

        409 while the job has no result; 410 if its stored bytes were removed since.
        """
        services = services_of(state)
        row = await load_row(services, request.user, job_id)
        if row.status != JobStatus.COMPLETED or row.result is None:
            raise Conflict(
                f"job {job_id} has no result to download (status: {row.status})",
                details={"job_id": job_id, "status": row.status},
            )
        result = downloadable(row.result, services.settings.s3_allowed_buckets)
        if isinstance(result, Location):
            await require_blob(services.blobs, result, f"the result of job {job_id}")
            location = result

            def chunks(start: int, end: int) -> AsyncIterator[bytes]:
                return services.blobs.read(location, start, end)

        else:
            data = result

            def chunks(start: int, end: int) -> AsyncIterator[bytes]:
                return _one_chunk(data[start:end])

        return stream_response(
            request_headers=request.headers,
            size=int(row.result["size_bytes"]),
            sha256=str(row.result["sha256"]),
            media_type=MEDIA_TYPES.get(row.output_format, "application/octet-stream"),
            filename=f"{job_id}.{EXTENSIONS.get(row.output_format, 'bin')}",
            chunks=chunks,
        )

    @get(
        "/{job_id:str}/events",
        guards=[allow(*READERS)],
        summary="The job's full event history",
        responses=openapi.errors(401, 403, 404, 429),
    )
    async def events(
        self, request: Request[Principal, Any, Any], state: State, job_id: str
    ) -> JobEventsResponse:
        """Every stored event of the job, in order, read from the event store itself."""
        services = services_of(state)
        records = await services.run(
            services.ledger.job_events, job_id, owner=owner_filter(request.user)
        )
        return JobEventsResponse(
            job_id=job_id,
            events=[
                JobEvent(sequence=r.sequence, type=r.type, timestamp=r.timestamp, data=r.data)
                for r in records
            ],
        )
