"""`Client`: the jobledger API over a blocking httpx.Client; decisions live in app.client.core."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from app.api.schemas import (
    FileInput,
    HistoryResponse,
    JobEventsResponse,
    JobListResponse,
    JobStatusResponse,
    OutputFormat,
    SubmitJobResponse,
)
from app.client import core, errors
from app.client.config import ClientConfig, resolve_config
from app.client.files import PartialFile, Progress, byte_chunks, file_chunks, guess_content_type
from domain.pricing import Priority

T = TypeVar("T")


class Client:
    """The jobledger API for one key, synchronously; every method is one API call or stream."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        retry_policy: core.RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        options = core.ClientOptions(timeout, max_retries, retry_policy)
        self._core = options.core(config or core.explicit_config(url, api_key))
        self._options = options
        self._http = httpx.Client(
            base_url=self._core.config.url,
            headers=self._core.headers,
            timeout=options.http_timeout(),
            transport=transport,
        )

    @classmethod
    def from_env(
        cls,
        profile: str | None = None,
        *,
        url: str | None = None,
        api_key: str | None = None,
        environ: Mapping[str, str] | None = None,
        **options: Any,
    ) -> Client:
        """A client set up by arguments, then JOBLEDGER_URL / JOBLEDGER_API_KEY, then a profile."""
        config = resolve_config(
            os.environ if environ is None else environ, url=url, api_key=api_key, profile=profile
        )
        return cls(config=config, **options)

    @property
    def url(self) -> str:
        """The API this client talks to."""
        return self._core.config.url

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ---- one request, retried as the policy says ------------------------------------------

    def _send(self, call: core.Call[T], content: Callable[[], Iterable[bytes]] | None = None) -> T:
        retries = 0
        policy = self._core.policy
        while True:
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    headers=call.headers,
                    content=content() if content is not None else call.body,
                )
            except httpx.TransportError as error:
                delay = policy.after_transport_error(retries, error, call.idempotent)
                if delay is None:
                    raise self._core.connection_failed(error) from error
            else:
                retry_after = response.headers.get("retry-after")
                delay = policy.after_status(
                    retries, response.status_code, retry_after, call.idempotent
                )
                if delay is None:
                    return self._core.answer(
                        call, response.status_code, response.headers, response.content, retries + 1
                    )
            time.sleep(delay)
            retries += 1

    # ---- jobs -----------------------------------------------------------------------------

    def submit(
        self,
        model: str,
        input: str | FileInput,
        *,
        gpu_type: str,
        gpu_count: int = 1,
        min_vram_gb: int = 0,
        output_destination: str = "local",
        output_format: OutputFormat = "json",
        priority: Priority | str = Priority.NORMAL,
        timeout_seconds: int = 3600,
        idempotency_key: str | None = None,
    ) -> SubmitJobResponse:
        """Submit a job; retries carry the same Idempotency-Key, so there is never a second job."""
        call = core.submit_call(
            model,
            input,
            output_destination=output_destination,
            output_format=output_format,
            gpu_type=gpu_type,
            gpu_count=gpu_count,
            min_vram_gb=min_vram_gb,
            priority=priority,
            timeout_seconds=timeout_seconds,
            idempotency_key=idempotency_key,
        )
        return self._send(call)

    def get(self, job_id: str) -> JobStatusResponse:
        """The job's current status."""
        return self._send(core.status_call(job_id))

    def list(
        self, status: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> JobListResponse:
        """One page of your jobs, newest first; pass `next_cursor` back as `cursor`."""
        return self._send(core.list_call(status, limit, cursor))

    def iter_jobs(self, status: str | None = None) -> Iterator[JobStatusResponse]:
        """Every job (of one status), newest first, fetching pages as it goes."""
        cursor = None
        while True:
            page = self.list(status, core.MAX_PAGE, cursor)
            yield from page.jobs
            if not page.has_more or page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str) -> JobStatusResponse:
        """Cancel a job: pending ones at once, running ones once their miner stops (canceling)."""
        try:
            return self._send(core.cancel_call(job_id))
        except errors.Conflict as conflict:
            # A retry after a lost answer finds the job canceled by the first try.
            if conflict.attempts > 1 and core.canceled_by_us(conflict):
                return self.get(job_id)
            raise

    def history(
        self,
        from_: date | datetime | str,
        to: date | datetime | str,
        *,
        limit: int = 100,
        cursor: str | None = None,
    ) -> HistoryResponse:
        """Jobs created in the inclusive window, one page, with totals over the whole window."""
        return self._send(core.history_call(from_, to, limit, cursor))

    def events(self, job_id: str) -> JobEventsResponse:
        """The job's stored events, in order."""
        return self._send(core.events_call(job_id))

    # ---- files ----------------------------------------------------------------------------

    def upload(
        self,
        source: str | os.PathLike[str] | bytes,
        *,
        filename: str | None = None,
        content_type: str | None = None,
        progress: Progress | None = None,
    ) -> str:
        """Upload an input file (streamed from disk) or bytes; returns its file id."""
        if isinstance(source, bytes):
            data = source

            def content() -> Iterable[bytes]:
                return byte_chunks(data, core.CHUNK_BYTES, progress)

            size = len(data)
        else:
            path = Path(source)
            size = path.stat().st_size
            filename = filename or path.name

            def content() -> Iterable[bytes]:
                return file_chunks(path, size, core.CHUNK_BYTES, progress)

        call = core.upload_call(size, filename, content_type or guess_content_type(filename))
        return self._send(call, content).file_id

    # ---- streams --------------------------------------------------------------------------

    def watch(self, job_id: str, last_event_id: int | None = None) -> Iterator[core.WatchUpdate]:
        """The job's updates as they happen, until it ends; reconnects resume where it left off.

        Without `last_event_id` the first update is the job's current state.
        """
        return self._watch(core.WatchSession(self._core, job_id, last_event_id), None)

    def _watch(
        self, session: core.WatchSession, deadline: float | None
    ) -> Iterator[core.WatchUpdate]:
        while not session.ended:
            error: Exception | None = None
            try:
                with self._http.stream(
                    "GET",
                    session.path,
                    headers=session.request_headers(),
                    timeout=self._options.watch_timeout(deadline),
                ) as response:
                    if response.status_code != 200:
                        body = response.read()
                        time.sleep(
                            session.error_delay(response.status_code, response.headers, body)
                        )
                        continue
                    session.connected()
                    for chunk in response.iter_bytes():
                        yield from session.feed(chunk)
                        if session.ended:
                            return
                        _check_deadline(deadline)
            except httpx.TransportError as dropped:
                _check_deadline(deadline)
                error = dropped
            yield from session.stream_closed()
            if not session.ended:
                time.sleep(session.reconnect_delay(error))

    def wait(self, job_id: str, timeout: float | None = None) -> JobStatusResponse:
        """Block until the job ends and return its final status; WaitTimeout after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        final = None
        for update in self._watch(core.WatchSession(self._core, job_id, None), deadline):
            final = update.job
        if final is None or final.status not in core.TERMINAL_STATUSES:
            return self.get(job_id)
        return final

    def download(
        self,
        job_id: str,
        destination: str | os.PathLike[str],
        *,
        progress: Progress | None = None,
    ) -> core.DownloadResult:
        """Save the job's result, sha256-verified; resumes after drops; nothing kept on mismatch.

        A directory as `destination` keeps the API's file name (`job_….json`).
        """
        session = core.DownloadSession(self._core, job_id)
        partial: PartialFile | None = None
        try:
            while True:
                try:
                    with self._http.stream(
                        "GET", session.path, headers=session.request_headers()
                    ) as response:
                        if response.status_code not in (200, 206):
                            body = response.read()
                            time.sleep(
                                session.error_delay(response.status_code, response.headers, body)
                            )
                            continue
                        restart = session.started(response.status_code, response.headers)
                        if partial is None:
                            target = core.download_target(
                                Path(destination), job_id, session.filename
                            )
                            partial = PartialFile(target)
                        elif restart:
                            partial.restart()
                        for chunk in response.iter_bytes():
                            partial.write(chunk)
                            session.feed(chunk)
                            if progress is not None:
                                progress(session.received, session.total)
                    break
                except httpx.TransportError as error:
                    time.sleep(session.retry_delay(error))
            result = session.verified(partial.target)
            partial.commit()
            return result
        finally:
            if partial is not None:
                partial.discard()


def _check_deadline(deadline: float | None) -> None:
    """Raise WaitTimeout once the deadline has passed."""
    if deadline is not None and time.monotonic() >= deadline:
        raise errors.WaitTimeout(
            "the job did not end in time; it goes on (watch it, or wait again)"
        )
