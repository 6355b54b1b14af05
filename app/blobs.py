"""Blob storage behind one interface: the local directory and, if configured, S3.

Locations are strings the ledger records in events ("local:<key>", "s3://<bucket>/<key>"),
so every key is checked (`check_key`) before any I/O and every S3 bucket must be one the
operator allowed (JOBLEDGER_S3_ALLOWED_BUCKETS).

Writes are atomic and durable: a reader sees the old blob or the whole new one, never a
part, and a failed write leaves nothing behind.

What each backend remembers besides the bytes (`BlobInfo`):
- local: a sidecar `root/.meta/<key>~meta.json` holds the sha256 and content type, with the
  inode of the blob it describes. It is replaced just before the blob, so a crash between
  the two renames leaves a sidecar naming another inode, which `stat` then ignores
  (sha256 and content type None) rather than trust.
- S3: the content type, and the sha256 as user metadata "sha256" for objects stored with one
  put_object (below `S3_PART_SIZE`). A multipart upload must name its metadata before the
  first part, when the digest is not known yet, and S3 has no full-object SHA-256 for
  multipart uploads; so large objects have no recorded sha256 (None). The ledger's events
  (`StoredBlob.sha256`) stay the authoritative digest either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import aioboto3
import aiohttp
import anyio
import anyio.to_thread
import msgspec
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Local writes go to the disk in batches of about this size: few thread hops per upload.
LOCAL_WRITE_BATCH = 1024 * 1024
# Reads yield chunks of at most this size.
READ_CHUNK = 256 * 1024
# Local reads fetch this many chunks per thread hop.
_LOCAL_READ_CHUNKS_PER_HOP = 4
# S3 objects smaller than this go up in one put_object; larger ones as parts of this size
# (so at most 10,000 parts: about 80 GiB per object).
S3_PART_SIZE = 8 * 1024 * 1024
# Temporary files of a crashed writer are removed once they have not changed for this long.
STALE_PARTIAL_SECONDS = 24 * 3600
# A destination prefix leaves room for "/<job id>/attempt-<n>/result.<ext>" under 900.
MAX_PREFIX_LENGTH = 512
MAX_KEY_LENGTH = 900

RESULT_EXTENSIONS = {"json": "json", "text": "txt", "binary": "bin", "archive": "zip"}

_KEY_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", re.ASCII)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}", re.ASCII)
_PARTIAL_DIR = ".partial"
_META_DIR = ".meta"
# "~" never appears in a key, so a sidecar's name cannot be a key's directory.
_SIDECAR_SUFFIX = "~meta.json"


class BlobError(Exception):
    """Base class of the errors blob storage raises."""


class BlobTooLarge(BlobError):
    """The stream passed max_bytes; nothing was stored."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the blob is larger than the limit of {limit} bytes")
        self.limit = limit


class BlobUnavailable(BlobError):
    """The backend could not be reached or failed; answer 503 or retry later."""


class DigestMismatch(BlobError):
    """The stream's sha256 is not the one the caller expected; nothing was stored."""

    def __init__(self, expected: str, received: str) -> None:
        super().__init__(f"the bytes have sha256 {received}, not the announced {expected}")
        self.expected = expected
        self.received = received


class BlobMissing(BlobError):
    """The blob does not exist."""


class InvalidLocation(BlobError):
    """A location the ledger would never build, or an S3 bucket that is not allowed."""


@dataclass(frozen=True, slots=True)
class Location:
    """Where one blob lives: the local store (under JOBLEDGER_HOME/blobs) or an S3 bucket."""

    store: Literal["local", "s3"]
    key: str
    bucket: str | None = None

    def __post_init__(self) -> None:
        """Refuse shapes no backend has: a bucket on a local blob, an S3 blob without one."""
        if self.store not in ("local", "s3"):
            raise InvalidLocation(f"unknown blob store {self.store!r}")
        if (self.bucket is not None) != (self.store == "s3"):
            raise InvalidLocation("an S3 location needs a bucket and a local one has none")

    def __str__(self) -> str:
        """The form recorded in events: "local:<key>" or "s3://<bucket>/<key>"."""
        if self.store == "s3":
            return f"s3://{self.bucket}/{self.key}"
        return f"local:{self.key}"

    @classmethod
    def parse(cls, text: str, allowed_buckets: frozenset[str]) -> Location:
        """The location `str()` gave; InvalidLocation for anything else."""
        if text.startswith("local:"):
            return cls("local", check_key(text.removeprefix("local:")))
        if text.startswith("s3://"):
            bucket, slash, key = text.removeprefix("s3://").partition("/")
            if not slash:
                raise InvalidLocation(f"{text!r} names no key after the bucket")
            _check_bucket_name(bucket)
            if bucket not in allowed_buckets:
                raise InvalidLocation(
                    f"S3 bucket {bucket!r} is not allowed (JOBLEDGER_S3_ALLOWED_BUCKETS)"
                )
            return cls("s3", check_key(key), bucket)
        raise InvalidLocation(f"{text!r} is not a blob location (local:<key> or s3://bucket/key)")


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """What a finished write stored: where, how many bytes, which digest."""

    location: Location
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What the backend knows of a stored blob; sha256 None where it was not recorded."""

    size_bytes: int
    sha256: str | None
    content_type: str | None


def check_key(key: str) -> str:
    """The key itself if it is safe on every backend, else InvalidLocation."""
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidLocation(f"a blob key is at most {MAX_KEY_LENGTH} characters")
    for segment in key.split("/"):
        if _KEY_SEGMENT.fullmatch(segment) is None:
            raise InvalidLocation(
                f"unsafe blob key {key!r}: each '/'-separated part must start with a letter "
                "or digit and hold only letters, digits, '.', '_' and '-' (128 at most)"
            )
    return key


def check_destination(destination: str, allowed_buckets: frozenset[str]) -> None:
    """Accept "local" or an allowed "s3://bucket[/prefix]"; never contacts anything."""
    if destination == "local":
        return
    bucket, _ = _split_destination(destination)
    if bucket not in allowed_buckets:
        allowed = ", ".join(sorted(allowed_buckets)) or "none"
        raise InvalidLocation(
            f"S3 bucket {bucket!r} is not allowed; the buckets allowed by "
            f"JOBLEDGER_S3_ALLOWED_BUCKETS are: {allowed}"
        )


def result_location(destination: str, job_id: str, attempt: int, output_format: str) -> Location:
    """Where one attempt's result goes; the bucket is checked against the allowed ones at I/O."""
    extension = RESULT_EXTENSIONS.get(output_format)
    if extension is None:
        raise ValueError(f"unknown output format {output_format!r}")
    if attempt < 1:
        raise ValueError(f"attempts count from 1, got {attempt}")
    tail = f"{job_id}/attempt-{attempt}/result.{extension}"
    if destination == "local":
        return Location("local", check_key(f"results/{tail}"))
    bucket, prefix = _split_destination(destination)
    return Location("s3", check_key(f"{prefix}/{tail}" if prefix else tail), bucket)


def file_location(upload_id: str) -> Location:
    """Where the bytes of one upload live (always the local store), fanned out by id."""
    return Location("local", check_key(f"files/{upload_id[:2]}/{upload_id}"))


def _split_destination(destination: str) -> tuple[str, str]:
    """The bucket and prefix ("" for none) of a well-formed "s3://bucket[/prefix]"."""
    if not destination.startswith("s3://"):
        raise InvalidLocation(
            f'output destination {destination!r} must be "local" or "s3://bucket/prefix" '
            '(lowercase "s3://")'
        )
    bucket, _, prefix = destination.removeprefix("s3://").partition("/")
    _check_bucket_name(bucket)
    prefix = prefix.removesuffix("/")
    if prefix:
        if len(prefix) > MAX_PREFIX_LENGTH:
            raise InvalidLocation(
                f"the S3 prefix in {destination!r} is longer than {MAX_PREFIX_LENGTH} characters"
            )
        try:
            check_key(prefix)
        except InvalidLocation:
            raise InvalidLocation(
                f"the S3 prefix in {destination!r} is not allowed: each '/'-separated part must "
                "start with a letter or digit and hold only letters, digits, '.', '_' and '-' "
                "(no empty parts, no '.' or '..')"
            ) from None
    return bucket, prefix


def _check_bucket_name(bucket: str) -> None:
    """Refuse what S3 would not accept as a bucket name, and IP addresses."""
    valid = _BUCKET_NAME.fullmatch(bucket) is not None and ".." not in bucket
    if valid:
        with contextlib.suppress(ValueError):  # not an IP address: that is the good case
            ipaddress.ip_address(bucket)
            valid = False
    if not valid:
        raise InvalidLocation(
            f"{bucket!r} is not an S3 bucket name: 3 to 63 lowercase letters, digits, '.' "
            "and '-', starting and ending with a letter or digit, not an IP address"
        )


@dataclass(frozen=True, slots=True)
class _Writing:
    """What one put was asked to enforce on its stream."""

    content_type: str
    max_bytes: int | None
    expected_sha256: str | None

    def check_size(self, total: int) -> None:
        """BlobTooLarge as soon as the running count passes max_bytes."""
        if self.max_bytes is not None and total > self.max_bytes:
            raise BlobTooLarge(self.max_bytes)

    def check_digest(self, sha256: str) -> None:
        """DigestMismatch unless the finished stream hashes to what was expected."""
        if self.expected_sha256 is not None and sha256 != self.expected_sha256.lower():
            raise DigestMismatch(self.expected_sha256, sha256)


class _Sidecar(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the local store records next to a blob (see the module docstring)."""

    inode: int
    size_bytes: int
    sha256: str
    content_type: str


_SIDECAR_DECODER = msgspec.json.Decoder(_Sidecar)


class Blobs:
    """The ledger's blob stores: the local directory and, if configured, S3."""

    def __init__(self, root: Path, s3_client: Any | None, allowed_buckets: frozenset[str]) -> None:
        for bucket in allowed_buckets:
            _check_bucket_name(bucket)
        self._root = root
        self._s3: Any | None = s3_client
        self._allowed_buckets = allowed_buckets

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, root: Path, *, s3_endpoint_url: str | None, allowed_buckets: frozenset[str]
    ) -> AsyncIterator[Blobs]:
        """Blob stores under `root`, with an S3 client only if some bucket is allowed."""
        for bucket in allowed_buckets:
            _check_bucket_name(bucket)
        await _local_io(_prepare_root, root)
        async with contextlib.AsyncExitStack() as stack:
            client = None
            if allowed_buckets:
                client = await stack.enter_async_context(await _s3_client(s3_endpoint_url))
            yield cls(root, client, allowed_buckets)

    async def put(
        self,
        location: Location,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str,
        max_bytes: int | None = None,
        expected_sha256: str | None = None,
    ) -> StoredBlob:
        """Store the stream atomically and durably.

        BlobTooLarge past max_bytes, DigestMismatch if its sha256 is not expected_sha256
        (lowercase hex); either way, and on any other failure, nothing is stored.
        """
        self._check(location)
        writing = _Writing(content_type, max_bytes, expected_sha256)
        if location.store == "local":
            return await self._put_local(location, chunks, writing)
        return await self._put_s3(location, chunks, writing)

    @property
    def allowed_buckets(self) -> frozenset[str]:
        """The S3 buckets locations may name (JOBLEDGER_S3_ALLOWED_BUCKETS)."""
        return self._allowed_buckets

    async def stat(self, location: Location) -> BlobInfo | None:
        """Size, digest and content type of a blob; None if it does not exist."""
        self._check(location)
        if location.store == "local":
            return await _local_io(_stat_local, self._root, location.key)
        return await self._stat_s3(location)

    async def read(
        self, location: Location, start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Bytes [start, end) in chunks of at most READ_CHUNK; BlobMissing if absent.

        An end past the blob's size stops at its end. Being a generator, it checks the
        location and raises BlobMissing at the first iteration, not at the call.
        """
        self._check(location)
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"not a byte range: start={start}, end={end}")
        if location.store == "local":
            stream = self._read_local(location, start, end)
        else:
            stream = self._read_s3(location, start, end)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                yield chunk

    async def delete(self, location: Location) -> None:
        """Remove a blob; one that does not exist is not an error."""
        self._check(location)
        if location.store == "local":
            await _local_io(_delete_local, self._root, location.key)
            return
        with _s3_errors(location):
            await self._client().delete_object(Bucket=location.bucket, Key=location.key)

    def _check(self, location: Location) -> None:
        """InvalidLocation unless the key is safe and, for S3, the bucket usable."""
        check_key(location.key)
        if location.store == "s3":
            if self._s3 is None:
                raise InvalidLocation(
                    f"{location} is on S3 but S3 is not configured "
                    "(JOBLEDGER_S3_ALLOWED_BUCKETS is empty)"
                )
            if location.bucket not in self._allowed_buckets:
                raise InvalidLocation(
                    f"S3 bucket {location.bucket!r} is not allowed (JOBLEDGER_S3_ALLOWED_BUCKETS)"
                )

    def _client(self) -> Any:
        """The S3 client; `_check` made sure there is one."""
        assert self._s3 is not None
        return self._s3

    # -- local -------------------------------------------------------------------------

    async def _put_local(
        self, location: Location, chunks: AsyncIterable[bytes], writing: _Writing
    ) -> StoredBlob:
        """Write into root/.partial, fsync, then rename into place (see _LocalWriter)."""
        writer = await _local_io(_LocalWriter.create, self._root, location.key)
        try:
            batch: list[bytes] = []
            batch_size = 0
            total = 0
            async for chunk in chunks:
                total += len(chunk)
                writing.check_size(total)
                batch.append(chunk)
                batch_size += len(chunk)
                if batch_size >= LOCAL_WRITE_BATCH:
                    await _local_io(writer.write, batch)
                    batch, batch_size = [], 0
            if batch:
                await _local_io(writer.write, batch)
            size, digest = await _local_io(writer.commit, writing)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(writer.discard)
            raise
        return StoredBlob(location, size, digest)

    async def _read_local(
        self, location: Location, start: int, end: int | None
    ) -> AsyncGenerator[bytes, None]:
        """Read a local blob in worker threads, a few chunks per hop."""
        file = await _local_io(_open_local, self._root, location.key, start)
        try:
            remaining = None if end is None else end - start
            while remaining is None or remaining > 0:
                chunks = await _local_io(_read_chunks, file, remaining)
                if not chunks:
                    return
                for chunk in chunks:
                    yield chunk
                if remaining is not None:
                    remaining -= sum(len(chunk) for chunk in chunks)
        finally:
            # Closing a file opened for reading does not block.
            file.close()

    # -- S3 ----------------------------------------------------------------------------

    async def _put_s3(
        self, location: Location, chunks: AsyncIterable[bytes], writing: _Writing
    ) -> StoredBlob:
        """One put_object below S3_PART_SIZE, else a multipart upload aborted on failure."""
        client = self._client()
        hasher = hashlib.sha256()
        buffer: list[bytes] = []
        buffered = 0
        total = 0
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            async for chunk in chunks:
                total += len(chunk)
                writing.check_size(total)
                buffer.append(chunk)
                buffered += len(chunk)
                if buffered >= S3_PART_SIZE:
                    if upload_id is None:
                        with _s3_errors(location):
                            created = await client.create_multipart_upload(
                                Bucket=location.bucket,
                                Key=location.key,
                                ContentType=writing.content_type,
                            )
                        upload_id = str(created["UploadId"])
                    part = await _joined_and_hashed(buffer, hasher)
                    buffer, buffered = [], 0
                    parts.append(await self._upload_part(location, upload_id, len(parts) + 1, part))
            last = await _joined_and_hashed(buffer, hasher)
            digest = hasher.hexdigest()
            writing.check_digest(digest)
            if upload_id is None:
                with _s3_errors(location):
                    await client.put_object(
                        Bucket=location.bucket,
                        Key=location.key,
                        Body=last,
                        ContentType=writing.content_type,
                        Metadata={"sha256": digest},
                    )
            else:
                if last:
                    parts.append(await self._upload_part(location, upload_id, len(parts) + 1, last))
                with _s3_errors(location):
                    await client.complete_multipart_upload(
                        Bucket=location.bucket,
                        Key=location.key,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                    )
        except BaseException:
            if upload_id is not None:
                with anyio.CancelScope(shield=True):
                    await self._abort_upload(location, upload_id)
            raise
        return StoredBlob(location, total, digest)

    async def _upload_part(
        self, location: Location, upload_id: str, number: int, body: bytes
    ) -> dict[str, Any]:
        """Upload one part; its number and ETag for complete_multipart_upload."""
        with _s3_errors(location):
            uploaded = await self._client().upload_part(
                Bucket=location.bucket,
                Key=location.key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
            )
        return {"PartNumber": number, "ETag": uploaded["ETag"]}

    async def _abort_upload(self, location: Location, upload_id: str) -> None:
        """Abort a multipart upload; a failure is logged, the original error goes on."""
        try:
            with anyio.fail_after(60), _s3_errors(location):
                await self._client().abort_multipart_upload(
                    Bucket=location.bucket, Key=location.key, UploadId=upload_id
                )
        except (BlobError, TimeoutError):
            # The caller re-raises the error that made us abort; a bucket lifecycle rule
            # (AbortIncompleteMultipartUpload) removes what this could not.
            logger.warning(
                "could not abort multipart upload %s of %s", upload_id, location, exc_info=True
            )

    async def _stat_s3(self, location: Location) -> BlobInfo | None:
        """head_object; a 404 is None once head_bucket shows the bucket exists."""
        client = self._client()
        try:
            with _s3_errors(location):
                head = await client.head_object(Bucket=location.bucket, Key=location.key)
        except BlobMissing:
            # HEAD answers a bare 404 for a missing key and a missing bucket alike.
            with _s3_errors(location, missing_means_bucket=True):
                await client.head_bucket(Bucket=location.bucket)
            return None
        sha256 = head.get("Metadata", {}).get("sha256")
        return BlobInfo(
            size_bytes=int(head["ContentLength"]),
            sha256=sha256 if isinstance(sha256, str) and _SHA256_HEX.fullmatch(sha256) else None,
            content_type=head.get("ContentType"),
        )

    async def _read_s3(
        self, location: Location, start: int, end: int | None
    ) -> AsyncGenerator[bytes, None]:
        """Stream get_object's body (ranged) without holding it in memory."""
        client = self._client()
        if end is not None and end == start:
            if await self._stat_s3(location) is None:
                raise BlobMissing(f"{location} does not exist")
            return
        arguments: dict[str, Any] = {"Bucket": location.bucket, "Key": location.key}
        if start > 0 or end is not None:
            arguments["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        with _s3_errors(location):
            try:
                response = await client.get_object(**arguments)
            except ClientError as error:
                if _error_code(error) == "InvalidRange":
                    return  # the range starts at or past the end of an existing object
                raise
        body = response["Body"]
        try:
            while True:
                with _s3_errors(location):
                    chunk = await body.read(READ_CHUNK)
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()


# -- local helpers (run in worker threads) ---------------------------------------------


async def _local_io(function: Callable[..., T], *args: Any) -> T:
    """Run blocking file work in a thread; OSError becomes BlobUnavailable."""
    try:
        return await anyio.to_thread.run_sync(function, *args)
    except OSError as error:
        raise BlobUnavailable(f"local blob store failed: {error}") from error


def _prepare_root(root: Path) -> None:
    """Create root and its temp directory; remove temp files of writers that crashed."""
    partial = root / _PARTIAL_DIR
    partial.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - STALE_PARTIAL_SECONDS
    for leftover in partial.iterdir():
        with contextlib.suppress(FileNotFoundError):  # another process removed it first
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()


def _inside(root: Path, relative: str) -> Path:
    """root/relative with symlinks resolved, refused unless it stays strictly inside root."""
    base = root.resolve()
    path = (base / relative).resolve()
    if path == base or not path.is_relative_to(base):
        raise InvalidLocation(f"blob key {relative!r} leads outside the blob store")
    return path


def _blob_path(root: Path, key: str) -> Path:
    """The file of a local blob."""
    return _inside(root, check_key(key))


def _sidecar_path(root: Path, key: str) -> Path:
    """The metadata file of a local blob."""
    return _inside(root / _META_DIR, check_key(key) + _SIDECAR_SUFFIX)


def _fsync_directory(path: Path) -> None:
    """Make a rename or creation inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_parents(path: Path) -> None:
    """Create path's missing parent directories, each made durable in its own parent."""
    missing: list[Path] = []
    parent = path.parent
    while not parent.is_dir():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            if not directory.is_dir():
                raise
        _fsync_directory(directory.parent)


class _LocalWriter:
    """A blob being written into root/.partial, then renamed over its key."""

    def __init__(self, root: Path, key: str, temp: Path, file: IO[bytes]) -> None:
        self._root = root
        self._key = key
        self._temp = temp
        self._meta_temp = temp.with_name(temp.name + ".meta")
        self._file = file
        self._hasher = hashlib.sha256()
        self._size = 0

    @classmethod
    def create(cls, root: Path, key: str) -> _LocalWriter:
        """Check the key's paths and open a fresh temp file on root's filesystem."""
        _blob_path(root, key)
        _sidecar_path(root, key)
        temp = _inside(root / _PARTIAL_DIR, secrets.token_hex(16))
        return cls(root, key, temp, temp.open("xb"))

    def write(self, chunks: list[bytes]) -> None:
        """Append and hash a batch of chunks."""
        for chunk in chunks:
            self._hasher.update(chunk)
            self._file.write(chunk)
            self._size += len(chunk)

    def commit(self, writing: _Writing) -> tuple[int, str]:
        """fsync, then rename the sidecar and the blob into place; their size and sha256."""
        digest = self._hasher.hexdigest()
        writing.check_digest(digest)
        self._file.flush()
        os.fsync(self._file.fileno())
        inode = os.fstat(self._file.fileno()).st_ino
        self._file.close()
        sidecar = _Sidecar(inode, self._size, digest, writing.content_type)
        with self._meta_temp.open("xb") as meta:
            meta.write(msgspec.json.encode(sidecar))
            meta.flush()
            os.fsync(meta.fileno())
        # Paths again, now that the directories may have changed since create().
        target = _blob_path(self._root, self._key)
        meta_target = _sidecar_path(self._root, self._key)
        try:
            _make_parents(target)
            _make_parents(meta_target)
            # Sidecar first: if the blob's rename fails, the old blob stays with a sidecar
            # naming another inode, which stat ignores.
            os.replace(self._meta_temp, meta_target)
            os.replace(self._temp, target)
        except (IsADirectoryError, NotADirectoryError, FileExistsError) as error:
            raise InvalidLocation(
                f"blob key {self._key!r} clashes with another blob's path: {error}"
            ) from error
        _fsync_directory(meta_target.parent)
        _fsync_directory(target.parent)
        return self._size, digest

    def discard(self) -> None:
        """Close and remove the temp files; a failure is logged, the caller's error goes on."""
        try:
            self._file.close()  # flushes what is buffered, which can fail (ENOSPC)
        except OSError:
            logger.warning("could not close temporary blob file %s", self._temp, exc_info=True)
        for path in (self._temp, self._meta_temp):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                logger.warning("could not remove temporary blob file %s", path, exc_info=True)


def _stat_local(root: Path, key: str) -> BlobInfo | None:
    """The blob's size, with digest and content type from a sidecar that matches it."""
    try:
        status = _blob_path(root, key).stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(status.st_mode):
        return None  # a directory holding other blobs' keys
    sidecar = _read_sidecar(_sidecar_path(root, key))
    if sidecar is None or sidecar.inode != status.st_ino or sidecar.size_bytes != status.st_size:
        return BlobInfo(size_bytes=status.st_size, sha256=None, content_type=None)
    return BlobInfo(status.st_size, sidecar.sha256, sidecar.content_type)


def _read_sidecar(path: Path) -> _Sidecar | None:
    """The sidecar at `path`; None if there is none or it cannot be decoded."""
    try:
        return _SIDECAR_DECODER.decode(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except msgspec.DecodeError:
        # Written atomically, so only a hand edit gets here; the blob stays readable.
        logger.warning("ignoring unreadable blob metadata %s", path, exc_info=True)
        return None


def _open_local(root: Path, key: str, start: int) -> IO[bytes]:
    """The blob opened for reading at `start`; BlobMissing if there is none."""
    path = _blob_path(root, key)
    try:
        file = path.open("rb")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise BlobMissing(f"local:{key} does not exist") from None
    try:
        file.seek(start)
    except BaseException:
        file.close()
        raise
    return file


def _read_chunks(file: IO[bytes], remaining: int | None) -> list[bytes]:
    """Up to a few READ_CHUNK chunks, no more than `remaining` bytes; [] at the end."""
    chunks: list[bytes] = []
    for _ in range(_LOCAL_READ_CHUNKS_PER_HOP):
        size = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
        if size == 0:
            break
        chunk = file.read(size)
        if not chunk:
            break
        chunks.append(chunk)
        if remaining is not None:
            remaining -= len(chunk)
    return chunks


def _delete_local(root: Path, key: str) -> None:
    """Remove the sidecar, then the blob (a crash between leaves a blob without digest)."""
    for path in (_sidecar_path(root, key), _blob_path(root, key)):
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            continue  # already gone: deleting is idempotent
        except IsADirectoryError:
            continue  # a directory of other blobs' keys, not a blob
        _fsync_directory(path.parent)


# -- S3 helpers --------------------------------------------------------------------------


async def _s3_client(endpoint_url: str | None) -> contextlib.AbstractAsyncContextManager[Any]:
    """An aioboto3 S3 client (to enter): credentials the usual way, short timeouts."""
    # Creating a session reads the AWS config files.
    session = await anyio.to_thread.run_sync(aioboto3.Session)
    region = await anyio.to_thread.run_sync(lambda: session.region_name)
    config = AioConfig(
        region_name=region or os.environ.get("AWS_REGION") or "us-east-1",
        connect_timeout=5,
        read_timeout=30,
        retries={"mode": "standard", "max_attempts": 3},
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    client: contextlib.AbstractAsyncContextManager[Any] = session.client(
        "s3", endpoint_url=endpoint_url, config=config
    )
    return client


async def _joined_and_hashed(chunks: list[bytes], hasher: Any) -> bytes:
    """The chunks as one body, added to the digest in a worker thread."""

    def work() -> bytes:
        body = b"".join(chunks)
        hasher.update(body)
        return body

    return await anyio.to_thread.run_sync(work)


def _error_code(error: ClientError) -> str:
    """The S3 error code of a client error ("NoSuchKey", "404", ...)."""
    return str(error.response.get("Error", {}).get("Code", ""))


_ACCESS_DENIED = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidToken",
        "AccountProblem",
    }
)
_TRANSIENT = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed"}
)


@contextlib.contextmanager
def _s3_errors(location: Location, *, missing_means_bucket: bool = False) -> Iterator[None]:
    """Turn botocore and aiohttp errors into BlobErrors; nothing raw gets out."""
    bucket = location.bucket
    try:
        yield
    except ClientError as error:
        code = _error_code(error)
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code == "NoSuchBucket" or (missing_means_bucket and code in ("404", "NotFound")):
            raise BlobUnavailable(
                f"S3 bucket {bucket!r} does not exist; create it or remove it from "
                "JOBLEDGER_S3_ALLOWED_BUCKETS"
            ) from error
        if code in ("NoSuchKey", "404", "NotFound"):
            raise BlobMissing(f"{location} does not exist") from error
        if code in _ACCESS_DENIED or status == 403:
            raise BlobUnavailable(
                f"S3 denied access to bucket {bucket!r} ({code}); check the ledger's AWS "
                "credentials and the bucket's policy"
            ) from error
        if status >= 500 or code in _TRANSIENT:
            raise BlobUnavailable(f"S3 failed on {location}: {code} (HTTP {status})") from error
        raise BlobError(f"S3 refused the request for {location}: {code} (HTTP {status})") from error
    except NoCredentialsError as error:
        raise BlobUnavailable(
            "no AWS credentials for S3 (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or a profile)"
        ) from error
    except (BotoCoreError, aiohttp.ClientError, OSError) as error:  # OSError: TimeoutError too
        raise BlobUnavailable(f"S3 is unreachable for {location}: {error}") from error
