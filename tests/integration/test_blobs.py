"""The blob stores, local and S3 (a real moto server on loopback), behind one interface."""

import asyncio
import hashlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from app.blobs import (
    READ_CHUNK,
    S3_PART_SIZE,
    BlobInfo,
    BlobMissing,
    Blobs,
    BlobTooLarge,
    BlobUnavailable,
    DigestMismatch,
    InvalidLocation,
    Location,
    check_destination,
    check_key,
    file_location,
    result_location,
)
from tests.s3server import DUMMY_CREDENTIALS, S3Server, free_port

MiB = 1024 * 1024
BUCKET = "jobledger-blobs-test"
ALLOWED = frozenset({BUCKET, "results.example", "allowed"})


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials for the moto server; no developer's AWS config leaks in."""
    for name, value in DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture(scope="session")
def bucket(s3_server: S3Server) -> str:
    """The one bucket the S3 tests write to (keys are unique per test)."""
    return s3_server.create_bucket(BUCKET)


@dataclass
class Backend:
    """One blob store under test and how to name fresh locations on it."""

    name: str
    blobs: Blobs
    root: Path
    s3: Any | None

    def location(self, name: str = "blob") -> Location:
        """A location no other test uses."""
        key = f"tests/{uuid.uuid4().hex}/{name}"
        if self.name == "s3":
            return Location("s3", key, BUCKET)
        return Location("local", key)

    def leftovers(self) -> list[str]:
        """Temporary files and unfinished multipart uploads: none once a put has ended."""
        partial = self.root / ".partial"
        left = sorted(p.name for p in partial.iterdir()) if partial.exists() else []
        if self.s3 is not None:
            uploads = self.s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
            left += [upload["Key"] for upload in uploads]
        return left


@pytest.fixture(params=["local", "s3"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each test runs once on the local store and once on S3."""
    root = tmp_path / "home" / "blobs"
    if request.param == "local":
        async with Blobs.open(root, s3_endpoint_url=None, allowed_buckets=frozenset()) as blobs:
            yield Backend("local", blobs, root, None)
        return
    server: S3Server = request.getfixturevalue("s3_server")
    request.getfixturevalue("bucket")
    request.getfixturevalue("aws_env")
    async with Blobs.open(
        root, s3_endpoint_url=server.endpoint_url, allowed_buckets=ALLOWED
    ) as blobs:
        yield Backend("s3", blobs, root, server.client())


def pattern(size: int) -> bytes:
    """`size` bytes that differ from position to position (so ranges are checkable)."""
    block = hashlib.sha256(str(size).encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


async def chunks_of(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """The data as a stream of chunks."""
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


async def read_all(
    blobs: Blobs, location: Location, start: int = 0, end: int | None = None
) -> bytes:
    """All bytes a read yields, checking that no chunk is over READ_CHUNK."""
    parts = []
    async for chunk in blobs.read(location, start, end):
        assert 0 < len(chunk) <= READ_CHUNK
        parts.append(chunk)
    return b"".join(parts)


class Counted:
    """A chunk stream that counts how many chunks were taken from it."""

    def __init__(self, chunk: bytes, count: int, fail_after: int | None = None) -> None:
        self.chunk = chunk
        self.count = count
        self.fail_after = fail_after
        self.taken = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            if self.fail_after is not None and self.taken == self.fail_after:
                raise ConnectionResetError("the client went away")
            self.taken += 1
            yield self.chunk


# -- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 20 * MiB], ids=["0B", "1B", "1000B", "20MiB"])
async def test_put_stat_read_round_trip(backend: Backend, size: int) -> None:
    data = pattern(size)
    location = backend.location("result.bin")

    stored = await backend.blobs.put(
        location, chunks_of(data), content_type="application/octet-stream"
    )

    digest = hashlib.sha256(data).hexdigest()
    assert (stored.location, stored.size_bytes, stored.sha256) == (location, size, digest)
    info = await backend.blobs.stat(location)
    # S3 records the digest only for objects stored in one put_object (see app/blobs.py).
    recorded = digest if backend.name == "local" or size < S3_PART_SIZE else None
    assert info == BlobInfo(size, recorded, "application/octet-stream")
    assert await read_all(backend.blobs, location) == data
    assert backend.leftovers() == []


async def test_put_accepts_uneven_and_empty_chunks(backend: Backend) -> None:
    data = pattern(3 * MiB + 17)
    location = backend.location()

    async def uneven() -> AsyncIterator[bytes]:
        offset = 0
        for size in [0, 1, 7, 2 * MiB + 3, 0, 5000]:
            yield data[offset : offset + size]
            offset += size
        yield data[offset:]

    stored = await backend.blobs.put(location, uneven(), content_type="text/plain")

    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert await read_all(backend.blobs, location) == data


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, None),
        (100, None),
        (0, 100),
        (100, 300),
        (READ_CHUNK - 1, READ_CHUNK + 2),
        (5, 5),
        (0, 0),
        (600_000 - 1, None),
        (0, 600_000),
        (500_000, 10_000_000),
        (600_000, None),
        (700_000, None),
        (700_000, 800_000),
    ],
)
async def test_read_ranges(backend: Backend, start: int, end: int | None) -> None:
    data = pattern(600_000)
    location = backend.location()
    await backend.blobs.put(location, chunks_of(data), content_type="application/octet-stream")

    assert await read_all(backend.blobs, location, start, end) == data[start:end]


async def test_read_refuses_backwards_ranges(backend: Backend) -> None:
    location = backend.location()
    await backend.blobs.put(location, chunks_of(b"abc"), content_type="text/plain")

    with pytest.raises(ValueError, match="not a byte range"):
        await read_all(backend.blobs, location, 2, 1)
    with pytest.raises(ValueError, match="not a byte range"):
        await read_all(backend.blobs, location, -1)


async def test_reading_part_of_a_blob_and_stopping_early(backend: Backend) -> None:
    data = pattern(2 * MiB)
    location = backend.location()
    await backend.blobs.put(location, chunks_of(data), content_type="application/octet-stream")

    stream = backend.blobs.read(location)
    first = await anext(stream)
    await stream.aclose()

    assert first == data[: len(first)]
    assert await read_all(backend.blobs, location) == data  # nothing held on to


async def test_overwrite_replaces_the_blob(backend: Backend) -> None:
    location = backend.location()
    await backend.blobs.put(location, chunks_of(b"first version"), content_type="text/plain")

    stored = await backend.blobs.put(location, chunks_of(b"second"), content_type="text/csv")

    assert stored.sha256 == hashlib.sha256(b"second").hexdigest()
    assert await backend.blobs.stat(location) == BlobInfo(6, stored.sha256, "text/csv")
    assert await read_all(backend.blobs, location) == b"second"


async def test_delete_then_missing(backend: Backend) -> None:
    location = backend.location()
    await backend.blobs.put(location, chunks_of(b"bytes"), content_type="text/plain")

    await backend.blobs.delete(location)

    assert await backend.blobs.stat(location) is None
    with pytest.raises(BlobMissing):
        await read_all(backend.blobs, location)
    await backend.blobs.delete(location)  # deleting again is fine


@pytest.mark.parametrize(("start", "end"), [(0, None), (10, 20), (0, 0)])
async def test_read_missing_raises_blob_missing(
    backend: Backend, start: int, end: int | None
) -> None:
    location = backend.location()

    assert await backend.blobs.stat(location) is None
    with pytest.raises(BlobMissing):
        await read_all(backend.blobs, location, start, end)


async def test_a_key_that_is_a_directory_of_other_keys_is_no_blob(backend: Backend) -> None:
    inner = backend.location("inner")
    await backend.blobs.put(inner, chunks_of(b"x"), content_type="text/plain")
    directory = Location(inner.store, inner.key.rsplit("/", 1)[0], inner.bucket)

    assert await backend.blobs.stat(directory) is None
    with pytest.raises(BlobMissing):
        await read_all(backend.blobs, directory)
    await backend.blobs.delete(directory)
    assert await read_all(backend.blobs, inner) == b"x"


# -- failures leave nothing --------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk_size", "limit"), [(64, 100), (1 * MiB, 12 * MiB)], ids=["small", "multipart"]
)
async def test_too_large_stops_reading_and_stores_nothing(
    backend: Backend, chunk_size: int, limit: int
) -> None:
    location = backend.location()
    stream = Counted(b"x" * chunk_size, count=100)

    with pytest.raises(BlobTooLarge) as raised:
        await backend.blobs.put(location, stream, content_type="text/plain", max_bytes=limit)

    assert raised.value.limit == limit
    assert stream.taken == limit // chunk_size + 1  # the chunk that passed the limit, no more
    assert await backend.blobs.stat(location) is None
    assert backend.leftovers() == []


async def test_exactly_max_bytes_is_stored(backend: Backend) -> None:
    location = backend.location()

    stored = await backend.blobs.put(
        location, chunks_of(b"y" * 100), content_type="text/plain", max_bytes=100
    )

    assert stored.size_bytes == 100


@pytest.mark.parametrize("fail_after", [0, 3, 10], ids=["at-once", "small", "multipart"])
async def test_a_failing_stream_stores_nothing_and_its_error_goes_on(
    backend: Backend, fail_after: int
) -> None:
    location = backend.location()
    stream = Counted(b"z" * MiB, count=20, fail_after=fail_after)

    with pytest.raises(ConnectionResetError, match="the client went away"):
        await backend.blobs.put(location, stream, content_type="text/plain")

    assert await backend.blobs.stat(location) is None
    assert backend.leftovers() == []


async def test_a_failed_overwrite_keeps_the_old_blob(backend: Backend) -> None:
    location = backend.location()
    old = await backend.blobs.put(location, chunks_of(b"old bytes"), content_type="text/plain")

    with pytest.raises(ConnectionResetError):
        await backend.blobs.put(location, Counted(b"n" * MiB, 20, fail_after=9), content_type="x/y")
    with pytest.raises(BlobTooLarge):
        await backend.blobs.put(location, chunks_of(b"n" * 200), content_type="x/y", max_bytes=10)

    assert await backend.blobs.stat(location) == BlobInfo(9, old.sha256, "text/plain")
    assert await read_all(backend.blobs, location) == b"old bytes"


async def test_a_cancelled_put_stores_nothing(backend: Backend) -> None:
    location = backend.location()
    sent_a_part = anyio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield b"s" * (S3_PART_SIZE + 1)
        yield b"s"  # the part above is uploaded while this one is taken
        sent_a_part.set()
        await anyio.sleep_forever()
        yield b"never"

    async with anyio.create_task_group() as group:

        async def put() -> None:
            await backend.blobs.put(location, stalls(), content_type="text/plain")

        group.start_soon(put)
        await sent_a_part.wait()
        group.cancel_scope.cancel()

    assert await backend.blobs.stat(location) is None
    assert backend.leftovers() == []


async def test_digest_mismatch_stores_nothing(backend: Backend) -> None:
    location = backend.location()
    data = pattern(10 * MiB)
    wrong = hashlib.sha256(b"other bytes").hexdigest()

    with pytest.raises(DigestMismatch) as raised:
        await backend.blobs.put(
            location, chunks_of(data), content_type="text/plain", expected_sha256=wrong
        )

    assert raised.value.expected == wrong
    assert raised.value.received == hashlib.sha256(data).hexdigest()
    assert await backend.blobs.stat(location) is None
    assert backend.leftovers() == []


async def test_the_expected_digest_is_accepted_in_either_case(backend: Backend) -> None:
    location = backend.location()
    digest = hashlib.sha256(b"fine").hexdigest()

    stored = await backend.blobs.put(
        location, chunks_of(b"fine"), content_type="text/plain", expected_sha256=digest.upper()
    )

    assert stored.sha256 == digest


# -- keys and locations ------------------------------------------------------------------

UNSAFE_KEYS = [
    "",
    "/",
    "../x",
    "..",
    ".",
    "a/../../x",
    "a/..",
    "/abs",
    "/etc/passwd",
    "a//b",
    "a/",
    ".hidden",
    "a/.hidden",
    ".partial/x",
    ".meta/x",
    "a\\b",
    "..\\x",
    "a\x00b",
    "a\nb",
    "a b",
    "%2e%2e/x",
    "a%2fb",
    "a/./b",
    "~/x",
    "-rf",
    "a:b",
    "\uff41/b",  # fullwidth a
    "a\u2215b",  # division slash
    "a\uff0fb",  # fullwidth solidus
    "\u2025/x",  # two dot leader
    "a\u2024\u2024/x",  # one dot leaders
    "caf\u00e9",
    "x" * 129,
    "/".join(["a" * 100] * 10),  # segments fine, 1009 characters in all
]


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_check_key_refuses_unsafe_keys(key: str) -> None:
    with pytest.raises(InvalidLocation):
        check_key(key)


@pytest.mark.parametrize(
    "key",
    ["a", "results/job_1/attempt-1/result.json", "A.b_c-d/9", "x" * 128, "a..b", "a/b."],
)
def test_check_key_accepts_safe_keys(key: str) -> None:
    assert check_key(key) == key


def tree(base: Path) -> dict[str, bytes | None]:
    """Every path under `base` with its contents (None for directories)."""
    return {
        str(path.relative_to(base)): None if path.is_dir() else path.read_bytes()
        for path in sorted(base.rglob("*"))
    }


@pytest.mark.parametrize("key", UNSAFE_KEYS)
async def test_every_method_refuses_unsafe_keys_before_any_io(
    backend: Backend, tmp_path: Path, key: str
) -> None:
    location = Location(backend.name, key, BUCKET if backend.name == "s3" else None)  # type: ignore[arg-type]
    before = tree(tmp_path)
    stream = Counted(b"evil", 3)

    with pytest.raises(InvalidLocation):
        await backend.blobs.put(location, stream, content_type="text/plain")
    with pytest.raises(InvalidLocation):
        await backend.blobs.stat(location)
    with pytest.raises(InvalidLocation):
        await read_all(backend.blobs, location)
    with pytest.raises(InvalidLocation):
        await backend.blobs.delete(location)

    assert stream.taken == 0
    assert tree(tmp_path) == before


async def test_local_store_never_writes_outside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "home" / "blobs"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"keep me")
    async with Blobs.open(root, s3_endpoint_url=None, allowed_buckets=frozenset()) as blobs:
        # Symlinks planted inside the root must not lead writes or reads out of it.
        (root / "results").symlink_to(outside, target_is_directory=True)
        (root / "files").mkdir()
        (root / "files" / "link").symlink_to(outside / "secret")
        before = tree(outside)

        for key in UNSAFE_KEYS:
            with pytest.raises(InvalidLocation):
                await blobs.put(Location("local", key), chunks_of(b"x"), content_type="a/b")
        for key in ["results/x", "results/secret", "files/link"]:
            location = Location("local", key)
            with pytest.raises(InvalidLocation):
                await blobs.put(location, chunks_of(b"x"), content_type="a/b")
            with pytest.raises(InvalidLocation):
                await blobs.stat(location)
            with pytest.raises(InvalidLocation):
                await read_all(blobs, location)
            with pytest.raises(InvalidLocation):
                await blobs.delete(location)
        stored = await blobs.put(
            Location("local", "fine/blob"), chunks_of(b"ok"), content_type="a/b"
        )
        await blobs.delete(stored.location)

    assert tree(outside) == before
    assert {path.parent for path in tmp_path.iterdir()} == {tmp_path}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "outside"]
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["blobs"]


async def test_local_store_creates_its_root_and_keeps_files_inside(tmp_path: Path) -> None:
    root = tmp_path / "new" / "blobs"
    async with Blobs.open(root, s3_endpoint_url=None, allowed_buckets=frozenset()) as blobs:
        location = result_location("local", "job_" + "a" * 32, 1, "json")
        await blobs.put(location, chunks_of(b"{}"), content_type="application/json")

    assert (root / location.key).read_bytes() == b"{}"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.is_relative_to(root) for p in written)


async def test_local_stat_ignores_metadata_of_another_blob(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    async with Blobs.open(root, s3_endpoint_url=None, allowed_buckets=frozenset()) as blobs:
        location = Location("local", "files/f/u")
        await blobs.put(location, chunks_of(b"before"), content_type="text/plain")
        # As if a writer crashed between renaming the sidecar and the blob.
        replacement = root / "replacement"
        replacement.write_bytes(b"after!")
        os.replace(replacement, root / location.key)

        assert await blobs.stat(location) == BlobInfo(6, None, None)


async def test_stale_temp_files_are_removed_when_the_store_opens(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    (root / ".partial").mkdir(parents=True)
    stale = root / ".partial" / "crashed"
    fresh = root / ".partial" / "in-flight"
    stale.write_bytes(b"old")
    fresh.write_bytes(b"new")
    long_ago = time.time() - 3 * 24 * 3600
    os.utime(stale, (long_ago, long_ago))

    async with Blobs.open(root, s3_endpoint_url=None, allowed_buckets=frozenset()):
        pass

    assert sorted(p.name for p in (root / ".partial").iterdir()) == ["in-flight"]


@pytest.mark.parametrize(
    "location",
    [
        Location("local", "results/job_1/attempt-1/result.json"),
        Location("s3", "a/b/c.bin", "allowed"),
        Location("s3", "x", "results.example"),
    ],
)
def test_location_parse_round_trips(location: Location) -> None:
    assert Location.parse(str(location), ALLOWED) == location


def test_location_text_forms() -> None:
    assert str(Location("local", "files/f/u")) == "local:files/f/u"
    assert str(Location("s3", "k/e/y", "allowed")) == "s3://allowed/k/e/y"


@pytest.mark.parametrize(
    "text",
    [
        "s3://evil-bucket/x",
        "s3://",
        "s3:///x",
        "s3://allowed",
        "s3://allowed/",
        "s3://allowed/../x",
        "s3://allowed//x",
        "s3://allowed@evil/x",
        "S3://allowed/x",
        "file:///etc/passwd",
        "local:../x",
        "local:/etc/passwd",
        "local:",
        "LOCAL:x",
        "local",
        "http://allowed/x",
        "https://169.254.169.254/latest/meta-data",
        "",
        " local:x",
    ],
)
def test_location_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidLocation):
        Location.parse(text, ALLOWED)


def test_location_shape_is_checked() -> None:
    with pytest.raises(InvalidLocation):
        Location("s3", "x")
    with pytest.raises(InvalidLocation):
        Location("local", "x", "allowed")


@pytest.mark.parametrize(
    "destination",
    [
        "local",
        "s3://allowed",
        "s3://allowed/",
        "s3://allowed/prefix",
        "s3://allowed/prefix/parts/",
        "s3://results.example/a-b_c.d/e",
    ],
)
def test_check_destination_accepts(destination: str) -> None:
    check_destination(destination, ALLOWED)


@pytest.mark.parametrize(
    ("destination", "message"),
    [
        ("s3://evil-bucket/x", "JOBLEDGER_S3_ALLOWED_BUCKETS"),
        ("s3://evil-bucket", "JOBLEDGER_S3_ALLOWED_BUCKETS"),
        ("s3://allowed/../x", "prefix"),
        ("s3://allowed/a b", "prefix"),
        ("s3://allowed//x", "prefix"),
        ("s3://allowed/x//", "prefix"),
        ("s3://allowed/.hidden", "prefix"),
        ("s3://allowed/%2e%2e/x", "prefix"),
        ("s3://allowed/" + "p" * 600, "longer than"),
        ("s3://127.0.0.1/x", "not an S3 bucket name"),
        ("s3://allowed@evil/x", "not an S3 bucket name"),
        ("s3://allowed:9000/x", "not an S3 bucket name"),
        ("s3://Allowed/x", "not an S3 bucket name"),
        ("s3://a..b/x", "not an S3 bucket name"),
        ("s3://ab/x", "not an S3 bucket name"),
        ("s3:///x", "not an S3 bucket name"),
        ("s3://", "not an S3 bucket name"),
        ("S3://allowed", 'must be "local" or "s3://bucket/prefix"'),
        ("Local", 'must be "local"'),
        ("local:x", 'must be "local"'),
        ("", 'must be "local"'),
        ("file:///etc/passwd", 'must be "local"'),
        ("http://allowed/x", 'must be "local"'),
        ("https://169.254.169.254/latest", 'must be "local"'),
    ],
)
def test_check_destination_refuses(destination: str, message: str) -> None:
    with pytest.raises(InvalidLocation, match=message):
        check_destination(destination, ALLOWED)


def test_check_destination_names_the_allowed_buckets() -> None:
    with pytest.raises(InvalidLocation, match=re.escape("allowed, results.example")):
        check_destination("s3://other/x", frozenset({"allowed", "results.example"}))
    with pytest.raises(InvalidLocation, match="are: none"):
        check_destination("s3://other/x", frozenset())


JOB = "job_" + "0" * 32


@pytest.mark.parametrize(
    ("destination", "attempt", "output_format", "expected"),
    [
        ("local", 1, "json", Location("local", f"results/{JOB}/attempt-1/result.json")),
        ("local", 3, "text", Location("local", f"results/{JOB}/attempt-3/result.txt")),
        ("s3://allowed", 1, "binary", Location("s3", f"{JOB}/attempt-1/result.bin", "allowed")),
        ("s3://allowed/", 2, "archive", Location("s3", f"{JOB}/attempt-2/result.zip", "allowed")),
        (
            "s3://allowed/a/b/",
            1,
            "json",
            Location("s3", f"a/b/{JOB}/attempt-1/result.json", "allowed"),
        ),
    ],
)
def test_result_location(
    destination: str, attempt: int, output_format: str, expected: Location
) -> None:
    location = result_location(destination, JOB, attempt, output_format)

    assert location == expected
    assert check_key(location.key) == location.key


def test_result_location_refuses_what_was_never_submitted() -> None:
    with pytest.raises(InvalidLocation):
        result_location("s3://allowed/../x", JOB, 1, "json")
    with pytest.raises(InvalidLocation):
        result_location("local", "../job", 1, "json")
    with pytest.raises(ValueError, match="format"):
        result_location("local", JOB, 1, "yaml")
    with pytest.raises(ValueError, match="attempts"):
        result_location("local", JOB, 0, "json")


def test_file_location() -> None:
    assert file_location("u1abc") == Location("local", "files/u1/u1abc")
    with pytest.raises(InvalidLocation):
        file_location("../u1")


# -- S3 configuration and outages --------------------------------------------------------


async def test_s3_locations_need_s3_configured_and_the_bucket_allowed(tmp_path: Path) -> None:
    async with Blobs.open(tmp_path, s3_endpoint_url=None, allowed_buckets=frozenset()) as blobs:
        with pytest.raises(InvalidLocation, match="not configured"):
            await blobs.stat(Location("s3", "x", "allowed"))
    local_only = Blobs(tmp_path, None, frozenset({"allowed"}))
    with pytest.raises(InvalidLocation, match="not configured"):
        await local_only.put(Location("s3", "x", "allowed"), chunks_of(b""), content_type="a/b")


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
async def test_a_bucket_not_allowed_is_refused_before_any_request(backend: Backend) -> None:
    location = Location("s3", "x", "not-allowed-bucket")
    stream = Counted(b"x", 3)

    with pytest.raises(InvalidLocation, match="not allowed"):
        await backend.blobs.put(location, stream, content_type="a/b")
    with pytest.raises(InvalidLocation, match="not allowed"):
        await backend.blobs.stat(location)
    with pytest.raises(InvalidLocation, match="not allowed"):
        await read_all(backend.blobs, location)
    with pytest.raises(InvalidLocation, match="not allowed"):
        await backend.blobs.delete(location)
    assert stream.taken == 0


def test_invalid_allowed_buckets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidLocation, match="not an S3 bucket name"):
        Blobs(tmp_path, None, frozenset({"Bad_Bucket"}))


@pytest.mark.usefixtures("aws_env")
async def test_a_missing_bucket_is_unavailable_and_named(
    s3_server: S3Server,
    tmp_path: Path,
) -> None:
    missing = "jobledger-never-created"
    location = Location("s3", "x/y", missing)
    async with Blobs.open(
        tmp_path, s3_endpoint_url=s3_server.endpoint_url, allowed_buckets=frozenset({missing})
    ) as blobs:
        with pytest.raises(BlobUnavailable, match=missing):
            await blobs.stat(location)
        with pytest.raises(BlobUnavailable, match=missing):
            await blobs.put(location, chunks_of(b"data"), content_type="a/b")
        with pytest.raises(BlobUnavailable, match=missing):
            await read_all(blobs, location)
        with pytest.raises(BlobUnavailable, match=missing):
            await blobs.delete(location)


@pytest.mark.usefixtures("aws_env")
async def test_unreachable_s3_is_unavailable_quickly(tmp_path: Path) -> None:
    location = Location("s3", "x/y", "allowed")
    closed = f"http://127.0.0.1:{free_port()}"
    operations: list[Callable[[Blobs], Any]] = [
        lambda blobs: blobs.stat(location),
        lambda blobs: blobs.put(location, chunks_of(b"data"), content_type="a/b"),
        lambda blobs: blobs.put(location, chunks_of(pattern(9 * MiB)), content_type="a/b"),
        lambda blobs: read_all(blobs, location),
        lambda blobs: read_all(blobs, location, 3, 3),
        lambda blobs: blobs.delete(location),
    ]

    async def attempt(blobs: Blobs, operation: Callable[[Blobs], Any]) -> None:
        started = time.monotonic()
        with pytest.raises(BlobUnavailable, match="unreachable") as raised:
            await operation(blobs)
        assert time.monotonic() - started < 30
        assert "botocore" not in type(raised.value).__module__

    async with Blobs.open(
        tmp_path, s3_endpoint_url=closed, allowed_buckets=frozenset({"allowed"})
    ) as blobs:
        # Side by side: each spends a few seconds in the client's retries.
        await asyncio.gather(*(attempt(blobs, operation) for operation in operations))


@pytest.mark.usefixtures("aws_env")
async def test_missing_credentials_are_unavailable(
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    async with Blobs.open(
        tmp_path, s3_endpoint_url=s3_server.endpoint_url, allowed_buckets=frozenset({BUCKET})
    ) as blobs:
        with pytest.raises(BlobUnavailable, match="credentials"):
            await blobs.stat(Location("s3", "x", BUCKET))
