"""The agent's HTTP transfers: fetching an attempt's input file, storing its result.

Both talk to routes of the ledger API that answer only the miner holding the attempt
(protocol.INPUT_PATH, protocol.RESULT_PATH). A 404 means the attempt is no longer
ours: stop, and report nothing. 502, 503, 504 and broken connections are retried with
backoff until the attempt's deadline; a fetch resumes with a Range request from what
is already on disk, an upload starts again (storing the same attempt again overwrites).
Bodies stream from and to disk in chunks, read and written in threads.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import IO, Final

import httpx
import msgspec

from app import protocol
from app.miner.executors import CHUNK_BYTES, ExecutorError
from app.miner.results import PackagedResult

log = logging.getLogger("jobledger.miner.transfer")

RETRY_STATUSES: Final = frozenset({502, 503, 504})
FIRST_RETRY_SECONDS: Final = 0.5
MAX_RETRY_SECONDS: Final = 10.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(?:\d+|\*)")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class AttemptGone(Exception):
    """The ledger answered 404: this miner no longer holds the attempt. Stop, report nothing."""


class TransferError(ExecutorError):
    """A transfer failed for good; the attempt fails with this code and sentence."""


def api_client(api_url: str, key: str) -> httpx.AsyncClient:
    """The agent's one HTTP client: its miner key, and timeouts for large transfers (no total)."""
    return httpx.AsyncClient(
        base_url=api_url,
        headers={"X-Api-Key": key},
        timeout=httpx.Timeout(60.0, connect=10.0),
    )


def error_message(response: httpx.Response) -> str:
    """The sentence of the ledger's JSON error body, else the body itself (read already)."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text


def content_digest(sha256_hex: str) -> str:
    """The RFC 9530 Content-Digest header value for a hex SHA-256."""
    return f"sha-256=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode('ascii')}:"


class _Backoff:
    """Waits between tries of one transfer, doubling up to MAX_RETRY_SECONDS."""

    def __init__(self, first_seconds: float) -> None:
        self._next = first_seconds
        # Why the last try failed, for the message when the deadline ends the retries.
        self.last_error = "no answer yet"

    async def wait(self, what: str, error: str) -> None:
        """Log why `what` failed and sleep before the next try."""
        self.last_error = error
        log.warning("%s failed (%s); retrying in %.1f s", what, error, self._next)
        await asyncio.sleep(self._next)
        self._next = min(self._next * 2, MAX_RETRY_SECONDS)


class _Download:
    """The input file being written, and the size and SHA-256 of what it holds so far.

    Its methods block: the fetch calls them in threads.
    """

    def __init__(self, path: Path) -> None:
        self._file: IO[bytes] = path.open("wb")
        self.size = 0
        self.digest = hashlib.sha256()

    def append(self, chunk: bytes) -> None:
        """Write the next piece."""
        self._file.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)

    def restart(self) -> None:
        """Forget what was written: the ledger is sending the file from its first byte."""
        self._file.seek(0)
        self._file.truncate()
        self.size = 0
        self.digest = hashlib.sha256()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


async def fetch_input(
    api: httpx.AsyncClient,
    assignment: protocol.Assignment,
    destination: Path,
    *,
    deadline: float,
    first_retry_seconds: float = FIRST_RETRY_SECONDS,
) -> None:
    """Download the attempt's input file to `destination` and check its size and SHA-256.

    `deadline` is on the event loop's clock. Raises AttemptGone on 404, TransferError
    "input_corrupt" when the bytes are not the job's file, "input_unavailable" when they
    cannot be fetched before the deadline or the ledger refuses.
    """
    url = protocol.INPUT_PATH.format(job_id=assignment.job_id, attempt=assignment.attempt)
    expected_size = assignment.input_size_bytes
    expected_sha256 = assignment.input_sha256
    download = await asyncio.to_thread(_Download, destination)
    backoff = _Backoff(first_retry_seconds)
    try:
        async with asyncio.timeout_at(deadline):
            while expected_size is None or download.size < expected_size:
                failure = await _fetch_once(api, url, download, expected_size, expected_sha256)
                if failure is None:
                    break
                await backoff.wait(f"fetching the input of {assignment.job_id}", failure)
    except TimeoutError:
        raise TransferError(
            "input_unavailable",
            f"the input file could not be fetched before the attempt's deadline "
            f"({download.size} bytes received; last error: {backoff.last_error})",
        ) from None
    finally:
        await asyncio.to_thread(download.close)
    if expected_size is not None and download.size != expected_size:
        raise TransferError(
            "input_corrupt",
            f"the fetched input has {download.size} bytes; the job's file has {expected_size}",
        )
    if expected_sha256 is not None and download.digest.hexdigest() != expected_sha256:
        raise TransferError(
            "input_corrupt",
            f"the fetched input's SHA-256 is {download.digest.hexdigest()}; "
            f"the job's file has {expected_sha256}",
        )


async def _fetch_once(
    api: httpx.AsyncClient,
    url: str,
    download: _Download,
    expected_size: int | None,
    expected_sha256: str | None,
) -> str | None:
    """One request for the rest of the file: None once it has all come, else why not."""
    headers = {"Accept-Encoding": "identity"}
    if download.size:
        headers["Range"] = f"bytes={download.size}-"
    try:
        async with api.stream("GET", url, headers=headers) as response:
            status = response.status_code
            if status == 404:
                raise AttemptGone(f"the ledger no longer gives this miner the input ({url})")
            if status in RETRY_STATUSES:
                return f"the ledger answered {status}"
            if status == 416 and download.size:
                return None  # nothing after what we hold: the size check tells if it is right
            if status not in (200, 206):
                await response.aread()
                raise TransferError(
                    "input_unavailable",
                    f"the ledger answered {status} to the input fetch: {error_message(response)}",
                )
            _check_etag(response, expected_sha256)
            if status == 200 and download.size:
                await asyncio.to_thread(download.restart)  # it ignored the Range: start over
            elif status == 206 and _range_start(response) != download.size:
                await asyncio.to_thread(download.restart)
                return "the ledger answered a range that does not follow what was received"
            async for chunk in response.aiter_bytes(CHUNK_BYTES):
                await asyncio.to_thread(download.append, chunk)
                if expected_size is not None and download.size > expected_size:
                    raise TransferError(
                        "input_corrupt",
                        f"the ledger sent more than the job's {expected_size} input bytes",
                    )
    except httpx.TransportError as error:
        return f"{type(error).__name__}: {error}"
    return None  # a clean end: everything the ledger has


def _check_etag(response: httpx.Response, expected_sha256: str | None) -> None:
    """TransferError("input_corrupt") if the ledger's ETag names another file than the job's."""
    etag = response.headers.get("ETag", "").strip('"')
    if expected_sha256 and _SHA256_HEX.fullmatch(etag) and etag != expected_sha256:
        raise TransferError(
            "input_corrupt",
            f"the ledger serves an input whose SHA-256 is {etag}; the job's file has "
            f"{expected_sha256}",
        )


def _range_start(response: httpx.Response) -> int | None:
    """Where a 206 answer's bytes start in the file, from its Content-Range."""
    found = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    return int(found.group(1)) if found else None


async def upload_result(
    api: httpx.AsyncClient,
    job_id: str,
    attempt: int,
    result: PackagedResult,
    *,
    deadline: float,
    first_retry_seconds: float = FIRST_RETRY_SECONDS,
) -> protocol.UploadAnswer:
    """Store the result through the ledger, streaming a file result from disk; its answer.

    `deadline` is on the event loop's clock. Raises AttemptGone on 404, TransferError
    "result_rejected" when the ledger refuses the content (413, 422), "timed_out" when it
    cannot be stored before the deadline, "upload_failed" for any other answer.
    """
    url = protocol.RESULT_PATH.format(job_id=job_id, attempt=attempt)
    headers = {
        "Content-Type": result.content_type,
        "Content-Length": str(result.size_bytes),
        "Content-Digest": content_digest(result.sha256),
    }
    backoff = _Backoff(first_retry_seconds)
    try:
        async with asyncio.timeout_at(deadline):
            while True:
                outcome = await _upload_once(api, url, headers, result)
                if isinstance(outcome, protocol.UploadAnswer):
                    return outcome
                await backoff.wait(f"storing the result of {job_id}", outcome)
    except TimeoutError:
        raise TransferError(
            "timed_out",
            "the result could not be stored before the attempt's deadline "
            f"(last error: {backoff.last_error})",
        ) from None


async def _upload_once(
    api: httpx.AsyncClient, url: str, headers: dict[str, str], result: PackagedResult
) -> protocol.UploadAnswer | str:
    """One PUT of the whole result: the ledger's answer, or why to try again."""
    body = None if result.path is None else _file_chunks(result.path)
    try:
        response = await api.put(
            url, content=result.data if body is None else body, headers=headers
        )
    except httpx.TransportError as error:
        return f"{type(error).__name__}: {error}"
    finally:
        if body is not None:
            await body.aclose()
    status = response.status_code
    if status in (200, 201):
        return _checked_answer(response, result)
    if status == 404:
        raise AttemptGone(f"the ledger no longer takes this miner's result ({url})")
    if status in (413, 422):
        raise TransferError("result_rejected", error_message(response))
    if status in RETRY_STATUSES:
        return f"the ledger answered {status}"
    raise TransferError(
        "upload_failed", f"the ledger answered {status} to the upload: {error_message(response)}"
    )


def _checked_answer(response: httpx.Response, result: PackagedResult) -> protocol.UploadAnswer:
    """The upload's answer, checked to describe the bytes that were sent."""
    try:
        answer = msgspec.json.decode(response.content, type=protocol.UploadAnswer)
    except msgspec.DecodeError as error:
        raise TransferError(
            "upload_failed", f"the ledger's answer to the upload is unreadable: {error}"
        ) from None
    if (answer.size_bytes, answer.sha256) != (result.size_bytes, result.sha256):
        raise TransferError(
            "upload_failed",
            f"the ledger stored {answer.size_bytes} bytes with SHA-256 {answer.sha256}; the "
            f"miner sent {result.size_bytes} bytes with SHA-256 {result.sha256}",
        )
    return answer


async def _file_chunks(path: Path) -> AsyncGenerator[bytes, None]:
    """A file's bytes, read in a thread one chunk at a time (never the whole file in memory)."""
    file = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(file.read, CHUNK_BYTES):
            yield chunk
    finally:
        await asyncio.to_thread(file.close)
