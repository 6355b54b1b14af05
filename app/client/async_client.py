"""`AsyncClient`: the jobledger API over httpx.AsyncClient; decisions live in app.client.core.

File reads, writes and hashing run in threads, so the event loop never waits on a disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Mapping
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
from app.client.files import PartialFile, Progress, byte_chunks, guess_content_type
from domain.pricing import Priority

T = TypeVar("T")


class AsyncClient:
    """The jobledger API for one key, for asyncio; the same methods as `Client`, awaited."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        retry_policy: core.RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        options = core.ClientOptions(timeout, max_retries, retry_policy)
        self._core = options.core(config or core.explicit_config(url, api_key))
        self._options = options
        self._http = httpx.AsyncClient(
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
    ) -> AsyncClient:
        """A client set up by arguments, then JOBLEDGER_URL / JOBLEDGER_API_KEY, then a profile."""
        config = resolve_config(
            os.environ if environ is None else environ, url=url, api_key=api_key, profile=profile
        )
        return cls(config=config, **options)

    @property
    def url(self) -> str:
        """The API this client talks to."""
        return self._core.config.url

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ---- one request, retried as the policy says ------------------------------------------

    async def _send(
        self, call: core.Call[T], content: Callable[[], AsyncIterable[bytes]] | None = None
    ) -> T:
        retries = 0
        policy = self._core.policy
        while True:
            try:
                response = await self._http.request(
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
            await asyncio.sleep(delay)
            retries += 1

    # ---- jobs -----------------------------------------------------------------------------

    async def submit(
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
        return await self._send(call)

    async def get(self, job_id: str) -> JobStatusResponse:
        """The job's current status."""
        return await self._send(core.status_call(job_id))

    async def list(
        self, status: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> JobListResponse:
        """One page of your jobs, newest first; pass `next_cursor` back as `cursor`."""
        return await self._send(core.list_call(status, limit, cursor))

    async def iter_jobs(self, status: str | None = None) -> AsyncIterator[JobStatusResponse]:
        """Every job (of one status), newest first, fetching pages as it goes."""
        cursor = None
        while True:
            page = await self.list(status, core.MAX_PAGE, cursor)
            for job in page.jobs:
                yield job
            if not page.has_more or page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, job_id: str) -> JobStatusResponse:
        """Cancel a job: pending ones at once, running ones once their miner stops (canceling)."""
        try:
            return await self._send(core.cancel_call(job_id))
        except errors.Conflict as conflict:
            # A retry after a lost answer finds the job canceled by the first try.
            if conflict.attempts > 1 and core.canceled_by_us(conflict):
                return await self.get(job_id)
            raise

    async def history(
        self,
        from_: date | datetime | str,
        to: date | datetime | str,
        *,
        limit: int = 100,
        cursor: str | None = None,
    ) -> HistoryResponse:
        """Jobs created in the inclusive window, one page, with totals over the whole window."""
        return await self._send(core.history_call(from_, to, limit, cursor))

    async def events(self, job_id: str) -> JobEventsResponse:
        """The job's stored events, in order."""
        return await self._send(core.events_call(job_id))

    # ---- files ----------------------------------------------------------------------------

    async def upload(
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

            async def content() -> AsyncIterator[bytes]:
                for chunk in byte_chunks(data, core.CHUNK_BYTES, progress):
                    yield chunk

            size = len(data)
        else:
            path = Path(source)
            size = (await asyncio.to_thread(path.stat)).st_size
            filename = filename or path.name

            def content() -> AsyncIterator[bytes]:
                return _file_chunks(path, size, progress)

        call = core.upload_call(size, filename, content_type or guess_content_type(filename))
        return (await self._send(call, content)).file_id

    # ---- streams --------------------------------------------------------------------------

    async def watch(
        self, job_id: str, last_event_id: int | None = None
    ) -> AsyncGenerator[core.WatchUpdate, None]:
        """The job's updates as they happen, until it ends; reconnects resume where it left off.

        Without `last_event_id` the first update is the job's current state. Close it
        early with `contextlib.aclosing` if you stop before the job ends.
        """
        session = core.WatchSession(self._core, job_id, last_event_id)
        while not session.ended:
            error: Exception | None = None
            try:
                async with self._http.stream(
                    "GET",
                    session.path,
                    headers=session.request_headers(),
                    timeout=self._options.watch_timeout(None),
                ) as response:
                    if response.status_code != 200:
                        body = await response.aread()
                        delay = session.error_delay(response.status_code, response.headers, body)
                        await asyncio.sleep(delay)
                        continue
                    session.connected()
                    async for chunk in response.aiter_bytes():
                        for update in session.feed(chunk):
                            yield update
                        if session.ended:
                            return
            except httpx.TransportError as dropped:
                error = dropped
            for update in session.stream_closed():
                yield update
            if not session.ended:
                await asyncio.sleep(session.reconnect_delay(error))

    async def wait(self, job_id: str, timeout: float | None = None) -> JobStatusResponse:
        """The job's final status once it ends; WaitTimeout after `timeout` seconds."""
        final = None
        try:
            async with asyncio.timeout(timeout):
                async with contextlib.aclosing(self.watch(job_id)) as updates:
                    async for update in updates:
                        final = update.job
        except TimeoutError:
            raise errors.WaitTimeout(
                "the job did not end in time; it goes on (watch it, or wait again)"
            ) from None
        if final is None or final.status not in core.TERMINAL_STATUSES:
            return await self.get(job_id)
        return final

    async def download(
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
                    async with self._http.stream(
                        "GET", session.path, headers=session.request_headers()
                    ) as response:
                        if response.status_code not in (200, 206):
                            body = await response.aread()
                            delay = session.error_delay(
                                response.status_code, response.headers, body
                            )
                            await asyncio.sleep(delay)
                            continue
                        restart = session.started(response.status_code, response.headers)
                        if partial is None:
                            target = core.download_target(
                                Path(destination), job_id, session.filename
                            )
                            partial = await asyncio.to_thread(PartialFile, target)
                        elif restart:
                            await asyncio.to_thread(partial.restart)
                        await self._receive(response, partial, session, progress)
                    break
                except httpx.TransportError as error:
                    await asyncio.sleep(session.retry_delay(error))
            result = session.verified(partial.target)
            await asyncio.to_thread(partial.commit)
            return result
        finally:
            if partial is not None:
                await asyncio.to_thread(partial.discard)

    async def _receive(
        self,
        response: httpx.Response,
        partial: PartialFile,
        session: core.DownloadSession,
        progress: Progress | None,
    ) -> None:
        """Write the body in batches of about a chunk, each written and hashed in a thread."""

        def keep(data: bytes) -> None:
            partial.write(data)
            session.feed(data)

        pending = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                pending += chunk
                if len(pending) >= core.CHUNK_BYTES:
                    await asyncio.to_thread(keep, bytes(pending))
                    pending.clear()
                if progress is not None:
                    progress(session.received + len(pending), session.total)
        finally:
            # What arrived before a drop is kept too, so the resume asks for the rest.
            if pending:
                await asyncio.to_thread(keep, bytes(pending))


async def _file_chunks(path: Path, size: int, progress: Progress | None) -> AsyncIterator[bytes]:
    """A file's bytes in chunks read in a thread, reporting progress as each is handed over."""
    file = await asyncio.to_thread(path.open, "rb")
    try:
        sent = 0
        while chunk := await asyncio.to_thread(file.read, core.CHUNK_BYTES):
            sent += len(chunk)
            yield chunk
            if progress is not None:
                progress(sent, size)
    finally:
        await asyncio.to_thread(file.close)
