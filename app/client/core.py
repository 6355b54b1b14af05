"""The SDK's sans-IO core: requests, answers, errors, retry decisions, SSE and download checks.

`Client` and `AsyncClient` only move bytes; every decision they make comes from
here, so the two stay thin and behave the same. Nothing in this module does I/O.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Final, Generic, TypeVar
from urllib.parse import quote, unquote

import httpx
import msgspec

from app.api.schemas import (
    ErrorBody,
    FileInput,
    FileResponse,
    HistoryResponse,
    JobEventsResponse,
    JobListResponse,
    JobStatusResponse,
    JobWatchEnd,
    JobWatchMessage,
    OutputConfig,
    OutputFormat,
    Requirements,
    SubmitJobRequest,
    SubmitJobResponse,
)
from app.client import errors
from app.client.config import DEFAULT_URL, ClientConfig, checked_url
from domain.pricing import Priority

T = TypeVar("T")

USER_AGENT: Final = "jobledger-python-sdk"
TERMINAL_STATUSES: Final = frozenset({"completed", "failed", "canceled", "timed_out"})
# The API's largest page (GET /v1/jobs?limit=).
MAX_PAGE: Final = 100
# Upload and download chunks: bounded memory for files of any size.
CHUNK_BYTES: Final = 1024 * 1024
# The watch stream sends a keepalive every 15 s of silence; three missed ones mean it is dead.
WATCH_READ_TIMEOUT: Final = 45.0
# Connect errors and timeouts before connecting: the request never reached the server.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Transient transport failures worth another try; anything else (a bad URL) is final.
_TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)

_ENCODER = msgspec.json.Encoder(decimal_format="number")
_SUBMITTED = msgspec.json.Decoder(SubmitJobResponse)
_STATUS = msgspec.json.Decoder(JobStatusResponse)
_LIST = msgspec.json.Decoder(JobListResponse)
_HISTORY = msgspec.json.Decoder(HistoryResponse)
_EVENTS = msgspec.json.Decoder(JobEventsResponse)
_FILE = msgspec.json.Decoder(FileResponse)
_ERROR = msgspec.json.Decoder(ErrorBody)


# ---- requests ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One API request and how to read its answer; built once, sent (and retried) as is."""

    method: str
    path: str
    decode: Callable[[bytes], T]
    params: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    # Safe to send again after it may have reached the server: reads, cancel, a keyed submit.
    idempotent: bool = True


def job_path(job_id: str, suffix: str = "") -> str:
    """The path of a job's resource, the id escaped so it can never leave its segment."""
    if not job_id or not job_id.strip():
        raise ValueError("a job id is needed (job_...)")
    return f"/v1/jobs/{quote(job_id.strip(), safe='')}{suffix}"


def submit_call(
    model: str,
    job_input: str | FileInput,
    *,
    output_destination: str,
    output_format: OutputFormat,
    gpu_type: str,
    gpu_count: int,
    min_vram_gb: int,
    priority: Priority | str,
    timeout_seconds: int,
    idempotency_key: str | None,
) -> Call[SubmitJobResponse]:
    """POST /v1/jobs, always with an Idempotency-Key: every retry of this call reuses it."""
    body = SubmitJobRequest(
        model=model,
        input=job_input,
        requirements=Requirements(gpu_type=gpu_type, gpu_count=gpu_count, min_vram_gb=min_vram_gb),
        output_config=OutputConfig(destination=output_destination, format=output_format),
        priority=Priority(priority),
        timeout_seconds=timeout_seconds,
    )
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": idempotency_key or str(uuid.uuid4()),
    }
    return Call("POST", "/v1/jobs", _SUBMITTED.decode, headers=headers, body=_ENCODER.encode(body))


def status_call(job_id: str) -> Call[JobStatusResponse]:
    """GET /v1/jobs/{job_id}."""
    return Call("GET", job_path(job_id), _STATUS.decode)


def list_call(status: str | None, limit: int, cursor: str | None) -> Call[JobListResponse]:
    """GET /v1/jobs: one page, newest first."""
    params = {"limit": str(limit)}
    if status:
        params["status"] = status
    if cursor:
        params["cursor"] = cursor
    return Call("GET", "/v1/jobs", _LIST.decode, params=params)


def cancel_call(job_id: str) -> Call[JobStatusResponse]:
    """DELETE /v1/jobs/{job_id}; idempotent in effect, so it is retried like a read."""
    return Call("DELETE", job_path(job_id), _STATUS.decode)


def _bound(value: date | datetime | str) -> str:
    """A history bound as the API takes it: YYYY-MM-DD or RFC 3339 (naive times are UTC)."""
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


def history_call(
    window_from: date | datetime | str,
    window_to: date | datetime | str,
    limit: int,
    cursor: str | None,
) -> Call[HistoryResponse]:
    """GET /v1/jobs/history: jobs created in an inclusive window, with totals."""
    params = {"from": _bound(window_from), "to": _bound(window_to), "limit": str(limit)}
    if cursor:
        params["cursor"] = cursor
    return Call("GET", "/v1/jobs/history", _HISTORY.decode, params=params)


def events_call(job_id: str) -> Call[JobEventsResponse]:
    """GET /v1/jobs/{job_id}/events: the job's stored events, in order."""
    return Call("GET", job_path(job_id, "/events"), _EVENTS.decode)


def upload_call(size: int, filename: str | None, content_type: str) -> Call[FileResponse]:
    """POST /v1/files with the raw body (streamed by the transport) and its length announced.

    Not idempotent: it is retried only when it cannot have reached the server.
    """
    params = {"filename": filename} if filename else {}
    headers = {"Content-Type": content_type, "Content-Length": str(size)}
    return Call("POST", "/v1/files", _FILE.decode, params=params, headers=headers, idempotent=False)


# ---- answers and errors -----------------------------------------------------------------


def _error_fields(details: Any) -> list[str]:
    """The fields a 400/422 names in `details.errors[].field` or `details.field`."""
    if not isinstance(details, dict):
        return []
    named = [
        str(item["field"])
        for item in details.get("errors") or []
        if isinstance(item, dict) and item.get("field")
    ]
    if not named and details.get("field"):
        named = [str(details["field"])]
    return named


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date); None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def describe_transport_error(error: Exception) -> str:
    """A short reason for a transport failure, in words a person can act on."""
    detail = str(error).strip()
    match error:
        case httpx.ConnectTimeout():
            reason = "timed out connecting"
        case httpx.ConnectError():
            reason = "could not connect"
        case httpx.ReadTimeout():
            reason = "no answer in time"
        case httpx.RemoteProtocolError():
            reason = "the connection was closed mid-answer"
        case _:
            reason = type(error).__name__
    return f"{reason} ({detail})" if detail and detail not in reason else reason


_ERROR_KINDS: dict[int, type[errors.ApiError]] = {
    400: errors.BadRequest,
    401: errors.Unauthorized,
    403: errors.Forbidden,
    404: errors.NotFound,
    409: errors.Conflict,
    410: errors.Gone,
    413: errors.BadRequest,
    422: errors.ValidationError,
    429: errors.RateLimited,
}
_FIXED_HINTS = {
    403: "this key's role may not do that: jobs are submitted and changed with a client key, "
    "read with a client, auditor or admin key",
    404: "check the id (`jobledger jobs list` shows yours); another client's job is not found "
    "either",
    409: "the job's state does not allow it; see it with `jobledger jobs status <id>`",
    410: "the stored bytes were removed; ask the operator",
    413: "send less: the message says the API's limit",
}


@dataclass(frozen=True, slots=True)
class ClientCore:
    """What both transports share for one API: its address, key, retries, and error wording."""

    config: ClientConfig
    policy: RetryPolicy

    @property
    def headers(self) -> dict[str, str]:
        """Headers sent with every request."""
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.config.api_key:
            headers["X-Api-Key"] = self.config.api_key
        return headers

    def answer(
        self, call: Call[T], status: int, headers: Mapping[str, str], body: bytes, attempts: int
    ) -> T:
        """The decoded body of a 2xx answer; the matching ApiError for anything else."""
        if 200 <= status < 300:
            try:
                return call.decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                raise errors.InvalidResponse(
                    f"{call.method} {call.path} answered {status} with a body this client cannot "
                    f"read: {error}",
                    f"is {self.config.url} a jobledger API? check JOBLEDGER_URL / --url",
                ) from None
        raise self.error(status, headers, body, attempts)

    def error(
        self, status: int, headers: Mapping[str, str], body: bytes, attempts: int = 1
    ) -> errors.ApiError:
        """The ApiError for an error answer, with the API's message and a hint what to do."""
        try:
            detail = _ERROR.decode(body).error
            message, details = detail.message, detail.details
        except (msgspec.DecodeError, msgspec.ValidationError):
            text = body[:200].decode("utf-8", "replace").strip()
            reason = httpx.codes.get_reason_phrase(status)
            message, details = f"HTTP {status} {reason}" + (f": {text}" if text else ""), None
        kind = _ERROR_KINDS.get(status) or (
            errors.ServerError if status >= 500 else errors.ApiError
        )
        hint = self._hint(status, details, headers)
        if kind is errors.RateLimited:
            return errors.RateLimited(
                status,
                message,
                details,
                hint,
                attempts,
                retry_after=parse_retry_after(headers.get("retry-after")),
            )
        return kind(status, message, details, hint, attempts)

    def _hint(self, status: int, details: Any, headers: Mapping[str, str]) -> str:
        """What to do about an error answer, in a sentence."""
        hint = _FIXED_HINTS.get(status, "")
        if status in (400, 422):
            fields = _error_fields(details)
            hint = f"fix {', '.join(fields) if fields else 'the request'} and send it again"
        elif status == 401:
            hint = self._unauthorized_hint()
        elif status == 429:
            wait = parse_retry_after(headers.get("retry-after"))
            hint = f"limits are per key; try again in {f'{wait:.0f} s' if wait else 'a while'}"
        elif status >= 500:
            hint = (
                f"the API at {self.config.url} could not answer; try again shortly, and if it "
                "persists check its logs"
            )
        return hint

    def _unauthorized_hint(self) -> str:
        """What to do about a 401: send a key, or check the one that was refused."""
        if self.config.key_source is None:
            return (
                "no API key was sent: set JOBLEDGER_API_KEY, or put api_key in a profile of "
                "the config file and choose it (--profile / JOBLEDGER_PROFILE)"
            )
        return (
            f"the key from {self.config.key_source} was refused (mistyped or revoked): check "
            "it, or ask an admin for a new one (jobledger keys create --role client)"
        )

    def connection_failed(self, error: Exception) -> errors.ConnectionFailed:
        """The error for an API that could not be reached after the retries allowed."""
        return errors.ConnectionFailed(
            self.config.url,
            describe_transport_error(error),
            f"is `scripts/serve` running at {self.config.url}? Otherwise set JOBLEDGER_URL "
            "or pass --url",
        )


def canceled_by_us(conflict: errors.Conflict) -> bool:
    """Whether a cancel's 409 says the job is already canceled or canceling."""
    details = conflict.details
    return isinstance(details, dict) and details.get("status") in ("canceled", "canceling")


def explicit_config(url: str | None, api_key: str | None) -> ClientConfig:
    """The configuration of a client given its URL and key directly (nothing read elsewhere)."""
    return ClientConfig(
        url=checked_url(url or DEFAULT_URL, "url"),
        api_key=api_key,
        key_source="the api_key argument" if api_key else None,
    )


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How patient a client is: its timeouts and retries."""

    timeout: float
    max_retries: int
    retry_policy: RetryPolicy | None

    def core(self, config: ClientConfig) -> ClientCore:
        """The shared core for this configuration."""
        return ClientCore(config, self.retry_policy or RetryPolicy(max_retries=self.max_retries))

    def http_timeout(self) -> httpx.Timeout:
        """Timeouts of ordinary requests: `timeout` for each step, connecting within 10 s."""
        return httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0))

    def watch_timeout(self, deadline: float | None) -> httpx.Timeout:
        """Timeouts of a watch stream: reads wait for keepalives, or until the deadline."""
        read = WATCH_READ_TIMEOUT
        if deadline is not None:
            read = max(0.05, min(read, deadline - time.monotonic()))
        return httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0), read=read)


# ---- retries ----------------------------------------------------------------------------


def _random() -> float:
    """Jitter for backoff delays: spreading clients out is all it is for."""
    return random.random()  # noqa: S311 - not cryptographic


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to send a request again, and after how long.

    Retried: transport failures (unless the request may have reached the server and
    is not idempotent), 429 and 503 (refused untried; Retry-After is honoured up to
    `max_retry_after`, beyond which the error is raised at once), and 502/504 for
    idempotent requests. Delays grow exponentially up to `backoff_max`, with jitter.
    """

    max_retries: int = 3
    backoff_first: float = 0.5
    backoff_max: float = 8.0
    max_retry_after: float = 30.0
    jitter: Callable[[], float] = _random

    def backoff(self, retries_done: int) -> float:
        """Seconds before retry number `retries_done + 1`: half fixed, half random."""
        ceiling = min(self.backoff_max, self.backoff_first * 2.0**retries_done)
        return ceiling / 2 + ceiling / 2 * self.jitter()

    def after_status(
        self, retries_done: int, status: int, retry_after: str | None, idempotent: bool
    ) -> float | None:
        """Seconds to wait before sending again after this status; None to stop here."""
        if retries_done >= self.max_retries:
            return None
        refused_untried = status in (429, 503)
        if not refused_untried and not (status in (502, 504) and idempotent):
            return None
        asked = parse_retry_after(retry_after)
        if asked is None:
            return self.backoff(retries_done)
        return asked if asked <= self.max_retry_after else None

    def after_transport_error(
        self, retries_done: int, error: Exception, idempotent: bool
    ) -> float | None:
        """Seconds to wait before sending again after a transport failure; None to stop."""
        if retries_done >= self.max_retries or not isinstance(error, _TRANSIENT):
            return None
        if not idempotent and not isinstance(error, _NOT_SENT):
            return None  # it may have reached the server: sending it again could act twice
        return self.backoff(retries_done)


# ---- server-sent events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SseMessage:
    """One dispatched server-sent event."""

    event: str
    data: str
    # The stream's last event id as of this message (the `id:` field, sticky).
    id: str | None


_LINE_END = re.compile(r"\r\n|\r|\n")


class SseParser:
    """An incremental text/event-stream parser (WHATWG HTML 9.2.6): feed bytes as they arrive.

    Chunks may split anything, a line, a CRLF or a multi-byte character; comments
    (keepalives) are skipped; `retry` is kept in `retry_ms`.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._started = False
        self._event = ""
        self._data: list[str] = []
        self._last_id: str | None = None
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[SseMessage]:
        """The messages completed by this chunk."""
        return self._parse(self._decoder.decode(chunk), final=False)

    def close(self) -> list[SseMessage]:
        """The end of the stream: a last line is read; an unfinished message is dropped."""
        return self._parse(self._decoder.decode(b"", final=True), final=True)

    def _parse(self, text: str, final: bool) -> list[SseMessage]:
        if not self._started and text:
            text = text.removeprefix("\ufeff")
            self._started = True
        self._buffer += text
        messages: list[SseMessage] = []
        while match := _LINE_END.search(self._buffer):
            # A CR ending the buffer may be the first half of a CRLF split across chunks.
            if match.group() == "\r" and match.end() == len(self._buffer) and not final:
                break
            line, self._buffer = self._buffer[: match.start()], self._buffer[match.end() :]
            if (message := self._line(line)) is not None:
                messages.append(message)
        return messages

    def _line(self, line: str) -> SseMessage | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the server's keepalive
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        match name:
            case "event":
                self._event = value
            case "data":
                self._data.append(value)
            case "id" if "\0" not in value:
                self._last_id = value
            case "retry" if value.isascii() and value.isdigit():
                self.retry_ms = int(value)
            case _:
                pass  # unknown fields are ignored, as the standard says
        return None

    def _dispatch(self) -> SseMessage | None:
        event, data = self._event or "message", self._data
        self._event, self._data = "", []
        if not data:
            return None
        return SseMessage(event=event, data="\n".join(data), id=self._last_id)


# One event of a watched job and the job as it stood right after it (the stream's `data`).
WatchUpdate = JobWatchMessage


_UPDATE = msgspec.json.Decoder(WatchUpdate)
_END = msgspec.json.Decoder(JobWatchEnd)


class _ResumableSession:
    """A read that spans connections (a watch, a download): its retries of error answers."""

    def __init__(self, core: ClientCore) -> None:
        self._core = core
        self._failures = 0

    def error_delay(self, status: int, headers: Mapping[str, str], body: bytes) -> float:
        """Seconds before trying again after an error answer (429, 5xx); raises it otherwise."""
        delay = self._core.policy.after_status(
            self._failures, status, headers.get("retry-after"), idempotent=True
        )
        if delay is None:
            raise self._core.error(status, headers, body, self._failures + 1)
        self._failures += 1
        return delay


class WatchSession(_ResumableSession):
    """One watch of a job across connections: where to resume, what was seen, when it ended."""

    def __init__(self, core: ClientCore, job_id: str, last_event_id: int | None) -> None:
        if last_event_id is not None and last_event_id < 0:
            raise ValueError("last_event_id must be an integer >= 0")
        super().__init__(core)
        self.path = job_path(job_id, "/watch")
        self.last_event_id = last_event_id
        self.final_status: str | None = None
        self.ended = False
        self._parser = SseParser()
        self._retry_seconds: float | None = None

    def request_headers(self) -> dict[str, str]:
        """Headers for the next connection: resume after the last event seen."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = str(self.last_event_id)
        return headers

    def connected(self) -> None:
        """A new connection starts a new stream."""
        self._parser = SseParser()

    def feed(self, chunk: bytes) -> list[WatchUpdate]:
        """The updates a chunk completes; repeats of what was already seen are dropped."""
        return self._accept(self._parser.feed(chunk))

    def stream_closed(self) -> list[WatchUpdate]:
        """The connection ended: the last complete messages, and whether the watch is over."""
        updates = self._accept(self._parser.close())
        if self.final_status is not None:
            self.ended = True  # the job ended, even if `end` itself was lost
        return updates

    def _accept(self, messages: list[SseMessage]) -> list[WatchUpdate]:
        if self._parser.retry_ms is not None:
            self._retry_seconds = self._parser.retry_ms / 1000
        updates: list[WatchUpdate] = []
        for message in messages:
            if message.event == "end":
                end = self._decode(_END.decode, message.data)
                self.final_status = end.status
                self.ended = True
                break
            if message.event != "job":
                continue  # an event type this client does not know yet
            update = self._decode(_UPDATE.decode, message.data)
            if self.last_event_id is not None and update.sequence <= self.last_event_id:
                continue
            self.last_event_id = update.sequence
            self._failures = 0
            if update.job.status in TERMINAL_STATUSES:
                self.final_status = update.job.status
            updates.append(update)
        return updates

    def _decode(self, decode: Callable[[str], T], data: str) -> T:
        try:
            return decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise errors.InvalidResponse(
                f"the watch stream sent a message this client cannot read: {error}"
            ) from None

    def reconnect_delay(self, error: Exception | None) -> float:
        """Seconds before reconnecting after a dropped or closed stream; raises when out of tries.

        The server's `retry` is the first delay, doubling with each failure in a row (a
        message received resets the count), capped by the retry policy's `backoff_max`.
        """
        policy = self._core.policy
        if self._failures >= policy.max_retries:
            if error is None:
                raise errors.ConnectionFailed(
                    self._core.config.url,
                    "the watch stream kept closing before the job ended",
                    "try again; if it persists check the API's logs",
                )
            raise self._core.connection_failed(error) from error
        first = self._retry_seconds if self._retry_seconds is not None else policy.backoff_first
        delay = min(policy.backoff_max, first * 2.0**self._failures)
        self._failures += 1
        return delay


# ---- downloads --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DownloadResult:
    """A verified download: where it is and what it holds."""

    job_id: str
    path: Path
    size_bytes: int
    sha256: str
    content_type: str | None


def _sha256_of_headers(headers: Mapping[str, str]) -> set[str]:
    """Every sha256 (hex) the answer announces in Repr-Digest, Digest and a digest-shaped ETag."""
    found: set[str] = set()
    for name, pattern in (("repr-digest", r"sha-256=:([^:]*):"), ("digest", r"sha-256=([^,\s]*)")):
        if (value := headers.get(name)) and (match := re.search(pattern, value, re.IGNORECASE)):
            try:
                found.add(base64.b64decode(match.group(1), validate=True).hex())
            except (binascii.Error, ValueError):
                found.add("unreadable " + name)
    etag = (headers.get("etag") or "").removeprefix("W/").strip('"').lower()
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        found.add(etag)
    return found


_FILENAME = re.compile(r"filename\*=UTF-8''([^;]+)|filename=\"([^\"]*)\"", re.IGNORECASE)


def _attachment_name(header: str | None) -> str | None:
    """The plain file name a Content-Disposition suggests, never a path."""
    if not header:
        return None
    names = [unquote(m.group(1)) if m.group(1) else m.group(2) for m in _FILENAME.finditer(header)]
    for name in names:
        base = re.split(r"[/\\]", name)[-1].strip()
        if base not in ("", ".", ".."):
            return base
    return None


class DownloadSession(_ResumableSession):
    """One download across connections: the digest to expect, where to resume, what arrived."""

    def __init__(self, core: ClientCore, job_id: str) -> None:
        super().__init__(core)
        self.job_id = job_id
        self.path = job_path(job_id, "/download")
        self.received = 0
        self.total: int | None = None
        self.expected: str | None = None
        self.etag: str | None = None
        self.content_type: str | None = None
        self.filename: str | None = None
        self._hash = hashlib.sha256()

    def request_headers(self) -> dict[str, str]:
        """The next request's headers: ask for the rest, if this representation is still current."""
        # Identity encoding: the digest and the byte ranges are of the bytes as stored.
        headers = {"Accept": "*/*", "Accept-Encoding": "identity"}
        if self.received and self.etag:
            headers["Range"] = f"bytes={self.received}-"
            headers["If-Range"] = self.etag
        return headers

    def started(self, status: int, headers: Mapping[str, str]) -> bool:
        """Take a 200 or 206 answer's headers; True if the file must start over from byte 0."""
        if status == 206:
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", headers.get("content-range", ""))
            if match is None or int(match.group(1)) != self.received:
                raise errors.InvalidResponse(
                    f"the download of {self.job_id} resumed at the wrong place "
                    f"({headers.get('content-range')!r}, wanted byte {self.received})",
                    "download again",
                )
            return False
        restart = self.received > 0
        announced = _sha256_of_headers(headers)
        if len(announced) > 1:
            raise errors.IntegrityError(
                f"the API announced different sha256 digests for {self.job_id}: "
                + ", ".join(sorted(announced)),
                expected=None,
                actual=None,
            )
        if not announced:
            raise errors.IntegrityError(
                f"the download of {self.job_id} came without a sha256 (ETag, Digest), so it "
                "cannot be verified",
                expected=None,
                actual=None,
            )
        self.expected = announced.pop()
        self.etag = headers.get("etag")
        length = headers.get("content-length", "")
        self.total = int(length) if length.isdigit() else None
        self.content_type = headers.get("content-type")
        self.filename = _attachment_name(headers.get("content-disposition"))
        self.received = 0
        self._hash = hashlib.sha256()
        return restart

    def feed(self, chunk: bytes) -> None:
        """Bytes as they are written: hashed and counted."""
        self._hash.update(chunk)
        self.received += len(chunk)
        self._failures = 0

    def retry_delay(self, error: Exception) -> float:
        """Seconds before resuming after a dropped connection; raises when out of tries."""
        delay = self._core.policy.after_transport_error(self._failures, error, idempotent=True)
        if delay is None:
            raise self._core.connection_failed(error) from error
        self._failures += 1
        return delay

    def verified(self, path: Path) -> DownloadResult:
        """The result once every byte is in, if its sha256 is the one announced."""
        actual = self._hash.hexdigest()
        if self.total is not None and self.received != self.total:
            raise errors.IntegrityError(
                f"the download of {self.job_id} ended at {self.received} of {self.total} bytes",
                self.expected,
                actual,
            )
        if actual != self.expected:
            raise errors.IntegrityError(
                f"the bytes downloaded for {self.job_id} have sha256 {actual}, but the API "
                f"announced {self.expected}",
                self.expected,
                actual,
            )
        return DownloadResult(
            job_id=self.job_id,
            path=path,
            size_bytes=self.received,
            sha256=actual,
            content_type=self.content_type,
        )


def download_target(destination: Path, job_id: str, suggested: str | None) -> Path:
    """Where a download lands: the path given, or inside it when it is a directory."""
    if destination.is_dir():
        return destination / (suggested or f"{job_id}.bin")
    return destination
