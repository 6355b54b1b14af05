"""GET /v1/jobs/{job_id}/watch: a job's events as Server-Sent Events, as they are committed.

The event store is the truth; NATS only says when to look. A stream subscribes to the
job's events subject (app/wakeups.py) before it reads the store, then sends every stored
event after the last sequence it sent, each with the job folded up to it by the same pure
fold the views use (projections/jobs.py), so `job` is what GET /v1/jobs/{job_id} showed
right after that event. Each NATS message wakes it to read again, and so does a timer,
so a lost message or a relay that is behind delays an event by at most POLL_SECONDS.
Sequences go out strictly one after another: never skipped, never repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get
from litestar.datastructures import ResponseHeader, State
from litestar.openapi.spec import Example
from litestar.openapi.spec.enums import OpenAPIType
from litestar.params import Parameter
from litestar.response import Stream

from app.api import openapi
from app.api.auth import allow, owner_filter
from app.api.errors import LedgerResponse
from app.api.jobs import READERS, services_of, status_view
from app.api.schemas import JobWatchEnd, JobWatchMessage
from app.keys import Principal
from app.services import Services
from app.store import DATABASE_DOWN, event_type_name
from app.wakeups import JobWakeups
from domain.errors import InvalidJobRequest
from domain.jobs import JobStatus, aggregate_id_of
from projections.jobs import JobRow, fold

log = logging.getLogger("jobledger.watch")

# The reconnect delay an EventSource is told (milliseconds).
RETRY_MILLISECONDS = 2000
# The store is read at least this often, whatever NATS says.
POLL_SECONDS = 2.0
# A comment after this long without a byte, so proxies and clients see the stream alive.
KEEPALIVE_SECONDS = 15.0
MAX_TIMEOUT_SECONDS = 86400
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_SEQUENCE = re.compile(r"^[0-9]{1,18}$", re.ASCII)
_SHOWN_CHARS = 64
# The parameters' documented schemas: absent or a value, never null (Litestar would
# document `str | None` as "a string or null", and a client could send "null").
_SEQUENCE_SCHEMA = {"one_of": None, "type": OpenAPIType.STRING, "pattern": _SEQUENCE.pattern}
_TIMEOUT_SCHEMA = {
    "one_of": None,
    "type": OpenAPIType.INTEGER,
    "minimum": 0,  # Litestar leaves out a bound of 0
    "maximum": MAX_TIMEOUT_SECONDS,
}
_ENCODER = msgspec.json.Encoder(decimal_format="number")
_KEEPALIVE = b": keepalive\n\n"


def resume_after(header: str | None, query: str | None) -> int | None:
    """The sequence the client has seen (Last-Event-ID, else ?last_event_id); None: neither.

    The header wins: an EventSource opened with ?last_event_id=N keeps that URL when it
    reconnects, and then sends the id it really saw last in the header.
    """
    seen: list[int] = []
    for field, value in (("Last-Event-ID", header), ("last_event_id", query)):
        if value is None:
            continue
        if not _SEQUENCE.fullmatch(value):
            shown = value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "..."
            raise InvalidJobRequest(
                f"{field} must be the sequence number of an event of the job (0, 1, 2, ...: "
                f"the `id` of the last message received), got {shown!r}",
                details={"errors": [{"field": field, "message": "not an event sequence"}]},
            )
        seen.append(int(value))
    return seen[0] if seen else None


def job_frame(event: Any, row: JobRow) -> bytes:
    """The `event: job` message for one stored event and the job right after it."""
    message = JobWatchMessage(
        sequence=event.originator_version,
        type=event_type_name(event),
        timestamp=event.timestamp,
        job=status_view(row),
    )
    data = _ENCODER.encode(message).decode()
    return f"id: {event.originator_version}\nevent: job\ndata: {data}\n\n".encode()


def end_frame(status: str) -> bytes:
    """The last message: the job ended with `status`."""
    data = _ENCODER.encode(JobWatchEnd(status=status)).decode()
    return f"event: end\ndata: {data}\n\n".encode()


class JobFold:
    """The job row folded event by event, exactly as far as the events it was given."""

    def __init__(self) -> None:
        self.row: JobRow | None = None
        self.version = 0

    def apply(self, events: Sequence[Any]) -> list[tuple[Any, JobRow]]:
        """Fold the events that continue the last one; each with the row right after it."""
        folded = []
        for event in events:
            if event.originator_version != self.version + 1:
                break  # not the next one (cannot happen: versions are contiguous); read again
            # The log position is the projector's business; as in JobLedger.job_row.
            self.row = fold(self.row, event, self.row.seq if self.row else 0)
            self.version = event.originator_version
            folded.append((event, self.row))
        return folded

    @property
    def terminal(self) -> bool:
        """Whether the job has ended: nothing after this changes its status."""
        return self.row is not None and JobStatus(self.row.status).is_terminal


async def job_stream(
    services: Services,
    wakeups: JobWakeups,
    job_id: str,
    history: tuple[Sequence[Any], int],
    after: int | None,
    timeout: int | None,
) -> AsyncIterator[bytes]:
    """The SSE frames of one watch: the events after `after` (None: the current state), then
    each new one as it is committed, then `end` once the job is terminal.

    `history` is the job's events as read (and owner-checked) before the answer started,
    with the log position of the last. Each batch waits (a little) for the views to show
    it, so that a GET after a message never shows an older state than the message did.
    Without `timeout` it ends only with the job, when the client goes away, or when the
    server shuts down; with it, after that many seconds (the client resumes with its
    Last-Event-ID).
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    yield f"retry: {RETRY_MILLISECONDS}\n\n".encode()
    # Joined here, not in the handler: `finally` runs only for a generator that started.
    wake = wakeups.join(job_id)
    try:
        await wakeups.ready(job_id)
        job = JobFold()
        events, position = history
        await _views_reach(services, position)
        folded = job.apply(events)
        # What was committed between the handler's read and the subscription.
        folded += job.apply(await _read_after(services, job_id, job.version))
        if after is None:
            after = job.version - 1  # the current state stands for everything so far
        for event, row in folded:
            if event.originator_version > after:
                yield job_frame(event, row)
        last_read = last_sent = loop.time()
        while not job.terminal:
            until = min(last_read + POLL_SECONDS, last_sent + KEEPALIVE_SECONDS)
            if deadline is not None:
                until = min(until, deadline)
            woke = await _wait(wake, until - loop.time())
            if wakeups.closing:
                return  # the server is stopping; the client reconnects with Last-Event-ID
            if deadline is not None and loop.time() >= deadline:
                yield b": timeout: reconnect with Last-Event-ID to go on\n\n"
                return
            if woke or loop.time() >= last_read + POLL_SECONDS:
                last_read = loop.time()
                for event, row in job.apply(await _read_after(services, job_id, job.version)):
                    if event.originator_version > after:
                        yield job_frame(event, row)
                        last_sent = loop.time()
            if loop.time() >= last_sent + KEEPALIVE_SECONDS:
                yield _KEEPALIVE
                last_sent = loop.time()
        assert job.row is not None  # folded from a history that starts with JobSubmitted
        yield end_frame(job.row.status)
    finally:
        wakeups.leave(job_id, wake)


async def _wait(wake: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for a wake-up; whether one came (it is then cleared)."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):  # time to poll, to keep alive or to stop
            async with asyncio.timeout(seconds):
                await wake.wait()
    woke = wake.is_set()
    wake.clear()
    return woke


async def _read_after(services: Services, job_id: str, version: int) -> list[Any]:
    """The job's events after `version`, once the views show them too.

    Nothing while the database is down: the timer tries again.
    """
    if not services.database.up:
        return []
    try:
        events, position = await services.run(services.ledger.job_history_after, job_id, version)
    except DATABASE_DOWN as error:
        # The stream stays open, so an EventSource (which gives up on an error answer
        # to a reconnect) is still there when the database is back.
        log.warning("watch of %s cannot read the store: %s; retrying", job_id, error)
        return []
    if events:
        await _views_reach(services, position)
    return events


async def _views_reach(services: Services, position: int) -> None:
    """Wait until the views show the log up to `position`, as a write's answer does (bounded)."""
    await services.views.wait_for(position, services.settings.view_wait_seconds)


WATCH_DESCRIPTION = f"""\
The job's events as [Server-Sent Events](https://html.spec.whatwg.org/multipage/server-sent-events.html),
pushed as they are committed, until the job ends. Usable from a browser's `EventSource`
(with `?last_event_id=` where it cannot set the header) and from any HTTP client.

The stream starts with `retry: {RETRY_MILLISECONDS}`, then sends one message per stored
event of the job, in order:

```
id: 3
event: job
data: {{"sequence": 3, "type": "JobStarted", "timestamp": "2026-02-13T10:01:00Z", "job": {{...}}}}
```

`id` and `sequence` are the event's sequence in the job (1 = `JobSubmitted`); `type` is
its name as in GET /v1/jobs/{{job_id}}/events; `job` is the body of GET /v1/jobs/{{job_id}}
as it stood right after the event (`pending_reason` is not part of the history: always null
here, as with `?as_of=`).

**Where it starts.** With `Last-Event-ID: N` (or `?last_event_id=N`; the header wins):
every event after sequence N, then the new ones. With neither: one message for the
latest event (the current state), then the new ones. No sequence is ever skipped or
repeated.

**How it ends.** After the message that shows the job completed, failed, canceled or
timed out (and any events stored with it), the server sends `event: end` with
`data: {{"status": "<terminal status>"}}` and closes. A job that has already ended
gets its last state (when no Last-Event-ID was given) and `end` at once. A comment line
`: keepalive` is sent after {KEEPALIVE_SECONDS:.0f} s of silence. If the connection drops
(or the server restarts, or `timeout` passes), reconnect with the last `id` received as
`Last-Event-ID`: nothing is lost.

A job that is assigned, starts, reports progress and completes, watched from its start
(`Last-Event-ID: 1`):

```
retry: {RETRY_MILLISECONDS}

id: 2
event: job
data: {{"sequence": 2, "type": "JobAssigned", "job": {{"status": "assigned", ...}}}}

id: 3
event: job
data: {{"sequence": 3, "type": "JobStarted", "job": {{"status": "running", ...}}}}

id: 4
event: job
data: {{"sequence": 4, "type": "JobProgressReported", "job": {{"progress": 50, ...}}}}

: keepalive

id: 5
event: job
data: {{"sequence": 5, "type": "JobCompleted", "job": {{"status": "completed", ...}}}}

event: end
data: {{"status": "completed"}}
```
"""


class WatchController(Controller):
    """/v1/jobs/{job_id}/watch: the live event stream of one job, for its owner or an auditor."""

    path = "/v1/jobs"
    tags = ["jobs"]
    response_class = LedgerResponse

    @get(
        "/{job_id:str}/watch",
        guards=[allow(*READERS)],
        summary="Watch the job's events live (Server-Sent Events)",
        description=WATCH_DESCRIPTION,
        media_type=MEDIA_TYPE,
        response_description="the event stream (text/event-stream), until the job ends",
        response_headers=[
            ResponseHeader(
                name=name,
                value=value,
                description="so that caches and proxies pass each message on at once",
                documentation_only=True,
            )
            for name, value in HEADERS.items()
        ],
        responses=openapi.errors(401, 403, 404, 422, 429),
    )
    async def watch(
        self,
        request: Request[Principal, Any, Any],
        state: State,
        job_id: str,
        last_event_id_header: Annotated[
            str | None,
            Parameter(
                header="Last-Event-ID",
                description="resume: send every event after this sequence (the `id` of the "
                "last message received); EventSource sends it when it reconnects",
                schema_extra=_SEQUENCE_SCHEMA,
                examples=[Example(value="3")],
            ),
        ] = None,
        last_event_id: Annotated[
            str | None,
            Parameter(
                description="the same as the Last-Event-ID header, for clients that cannot set "
                "headers; the header wins when both are given",
                schema_extra=_SEQUENCE_SCHEMA,
                examples=[Example(value="3")],
            ),
        ] = None,
        timeout: Annotated[
            int | None,
            Parameter(
                ge=0,
                le=MAX_TIMEOUT_SECONDS,
                schema_extra=_TIMEOUT_SCHEMA,
                description="close the stream after this many seconds even if the job has "
                "not ended (reconnect with Last-Event-ID to go on); 0 sends what is stored "
                "and closes at once; default: no limit",
                examples=[Example(value=60)],
            ),
        ] = None,
    ) -> Stream:
        """Stream the job's events as they are committed; `end` once it is terminal."""
        after = resume_after(last_event_id_header, last_event_id)
        if timeout is None and "timeout" in request.query_params:
            # Litestar reads `?timeout=null` as no timeout: a stream that never closes.
            raise InvalidJobRequest(
                f"timeout must be a whole number of seconds from 0 to {MAX_TIMEOUT_SECONDS}",
                details={"errors": [{"field": "timeout", "message": "not a number"}]},
            )
        services = services_of(state)
        aggregate_id_of(job_id)  # a malformed id is not found without asking the database
        history = await services.run(
            services.ledger.job_history_after, job_id, 0, owner=owner_filter(request.user)
        )
        return Stream(
            job_stream(services, services.watches, job_id, history, after, timeout),
            media_type=MEDIA_TYPE,
            # Exactly text/event-stream (Litestar would add "; charset=utf-8" to a text type).
            headers={"Content-Type": MEDIA_TYPE, **HEADERS},
        )
