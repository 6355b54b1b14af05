"""Streamed transfers: ranges, digests, conditional downloads and multipart uploads."""

from __future__ import annotations

import base64
import hashlib
import tracemalloc
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import pytest
from litestar import HttpMethod, Litestar, Request, Response, post, route
from litestar.datastructures import Headers
from litestar.exceptions import LitestarException
from litestar.testing import AsyncTestClient

from app.api.errors import error_response
from app.api.transfer import (
    FIELD_LIMIT,
    ByteRange,
    MultipartError,
    RangeNotSatisfiable,
    digest_headers,
    multipart_file,
    parse_content_digest,
    parse_range,
    stream_response,
)

KIB = 1024
MIB = 1024 * KIB
BLOB = bytes(range(256)) * 40  # 10 240 bytes
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()
ETAG = f'"{BLOB_SHA}"'
BOUNDARY = "jobledger-test-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
# File content that looks like a boundary without being one, to trip a sloppy parser.
TRICKY = (
    b"line one\r\n--"
    + BOUNDARY[:-3].encode()
    + b"\r\n--not-it\r\r\n\r\n"
    + bytes(range(256))
    + b"\r\n-"
)


# --- parse_range --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-99", 1000, (0, 100)),
        ("bytes=100-199", 1000, (100, 200)),
        ("bytes=999-999", 1000, (999, 1000)),
        ("bytes=500-", 1000, (500, 1000)),
        ("bytes=-100", 1000, (900, 1000)),
        ("bytes=-5000", 1000, (0, 1000)),
        ("bytes=900-5000", 1000, (900, 1000)),
        (" Bytes = 10 - 19 ", 1000, (10, 20)),
        ("bytes=0-9,", 1000, (0, 10)),
        ("bytes=0-0", 1, (0, 1)),
        (None, 1000, None),
        ("bytes=0-9,20-29", 1000, None),
        ("bytes=0-9, -5", 1000, None),
        ("bytes=-", 1000, None),
        ("bytes=", 1000, None),
        ("bytes=abc", 1000, None),
        ("bytes=5-2", 1000, None),
        ("bytes=0-9-", 1000, None),
        ("bytes=+1-2", 1000, None),
        ("bytes=\u0661-\u0662", 1000, None),  # Arabic-Indic digits are not DIGIT
        ("bytes 0-9", 1000, None),
        ("items=0-9", 1000, None),
        ("", 1000, None),
        (None, 0, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    parsed = parse_range(header, size)
    assert parsed == (None if expected is None else ByteRange(*expected))


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=1000-", 1000),
        ("bytes=1000-1000", 1000),
        ("bytes=5000-6000", 1000),
        ("bytes=-0", 1000),
        ("bytes=0-", 0),
        ("bytes=0-0", 0),
        ("bytes=-5", 0),
    ],
)
def test_unsatisfiable_ranges_raise_with_the_size(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as raised:
        parse_range(header, size)
    assert raised.value.size == size


def test_byte_range_length() -> None:
    assert ByteRange(10, 20).length == 10


# --- digests --------------------------------------------------------------------------


def b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_digest_headers() -> None:
    digest = b64_sha256(b"hello")
    assert digest_headers(hashlib.sha256(b"hello").hexdigest()) == {
        "ETag": f'"{hashlib.sha256(b"hello").hexdigest()}"',
        "Digest": f"sha-256={digest}",
        "Repr-Digest": f"sha-256=:{digest}:",
    }


def test_parse_content_digest_reads_sha256() -> None:
    expected = hashlib.sha256(b"data").hexdigest()
    assert parse_content_digest(f"sha-256=:{b64_sha256(b'data')}:") == expected


def test_parse_content_digest_picks_sha256_among_several() -> None:
    sha512 = base64.b64encode(hashlib.sha512(b"data").digest()).decode()
    header = f"sha-512=:{sha512}:,  sha-256=:{b64_sha256(b'data')}:;note=1, md5=:AAAA:"
    assert parse_content_digest(header) == hashlib.sha256(b"data").hexdigest()


@pytest.mark.parametrize("header", [None, "", "sha-512=:AAAA:", "unixsum=:MTIz:"])
def test_parse_content_digest_without_sha256_is_none(header: str | None) -> None:
    assert parse_content_digest(header) is None


@pytest.mark.parametrize(
    "header",
    [
        f"sha-256={b64_sha256(b'x')}",  # legacy Digest syntax, not a byte sequence
        "sha-256=:not base64!:",
        "sha-256=:" + base64.b64encode(b"x" * 16).decode() + ":",  # 16 bytes, not 32
        "sha-256",
        "sha-256=",
    ],
)
def test_parse_content_digest_rejects_malformed_sha256(header: str) -> None:
    with pytest.raises(ValueError, match="sha-256"):
        parse_content_digest(header)


# --- stream_response through a tiny app ------------------------------------------------


class BlobSource:
    """The bytes of BLOB in 1000-byte pieces, remembering which ranges were read."""

    def __init__(self, data: bytes = BLOB) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []

    async def chunks(self, start: int, end: int) -> AsyncIterator[bytes]:
        self.reads.append((start, end))
        for offset in range(start, end, 1000):
            yield self.data[offset : min(offset + 1000, end)]


def download_app(source: BlobSource, filename: str | None = "report.bin") -> Litestar:
    @route("/blob", http_method=[HttpMethod.GET, HttpMethod.HEAD])
    async def download(request: Request[Any, Any, Any]) -> Response[Any]:
        return stream_response(
            request_headers=request.headers,
            size=len(BLOB),
            sha256=BLOB_SHA,
            media_type="application/x-test",
            filename=filename,
            chunks=source.chunks,
            extra_headers={"Cache-Control": "private"},
            head=request.method == HttpMethod.HEAD,
        )

    return Litestar([download])


async def test_whole_body_with_headers() -> None:
    source = BlobSource()
    async with AsyncTestClient(download_app(source)) as client:
        response = await client.get("/blob")
    assert response.status_code == 200
    assert response.content == BLOB
    assert response.headers["content-length"] == str(len(BLOB))
    assert response.headers["content-type"] == "application/x-test"
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["etag"] == ETAG
    assert response.headers["digest"] == f"sha-256={b64_sha256(BLOB)}"
    assert response.headers["repr-digest"] == f"sha-256=:{b64_sha256(BLOB)}:"
    assert response.headers["content-disposition"] == 'attachment; filename="report.bin"'
    assert response.headers["cache-control"] == "private"
    assert "content-range" not in response.headers
    assert source.reads == [(0, len(BLOB))]


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [("bytes=1000-2999", 1000, 3000), ("bytes=-300", len(BLOB) - 300, len(BLOB))],
)
async def test_partial_content(range_header: str, start: int, end: int) -> None:
    source = BlobSource()
    async with AsyncTestClient(download_app(source)) as client:
        response = await client.get("/blob", headers={"Range": range_header})
    assert response.status_code == 206
    assert response.content == BLOB[start:end]
    assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{len(BLOB)}"
    assert response.headers["content-length"] == str(end - start)
    # The digests describe the whole representation, not the part.
    assert response.headers["etag"] == ETAG
    assert response.headers["repr-digest"] == f"sha-256=:{b64_sha256(BLOB)}:"
    assert source.reads == [(start, end)]


async def test_unsatisfiable_range_is_416_in_the_house_shape() -> None:
    source = BlobSource()
    async with AsyncTestClient(download_app(source)) as client:
        response = await client.get("/blob", headers={"Range": f"bytes={len(BLOB)}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(BLOB)}"
    error = response.json()["error"]
    assert error["status"] == 416
    assert error["details"] == {"size": len(BLOB)}
    assert str(len(BLOB)) in error["message"]
    assert source.reads == []


@pytest.mark.parametrize("if_none_match", [ETAG, f'"other", W/{ETAG}', "*"])
async def test_if_none_match_is_304(if_none_match: str) -> None:
    source = BlobSource()
    async with AsyncTestClient(download_app(source)) as client:
        response = await client.get(
            "/blob", headers={"If-None-Match": if_none_match, "Range": "bytes=0-9"}
        )
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == ETAG
    assert response.headers["cache-control"] == "private"
    assert source.reads == []


async def test_other_if_none_match_sends_the_body() -> None:
    async with AsyncTestClient(download_app(BlobSource())) as client:
        response = await client.get("/blob", headers={"If-None-Match": '"stale"'})
    assert response.status_code == 200
    assert response.content == BLOB


async def test_if_range_matching_the_etag_keeps_the_range() -> None:
    async with AsyncTestClient(download_app(BlobSource())) as client:
        response = await client.get("/blob", headers={"Range": "bytes=0-9", "If-Range": ETAG})
    assert response.status_code == 206
    assert response.content == BLOB[:10]


@pytest.mark.parametrize("if_range", ['"stale"', f"W/{ETAG}", "Wed, 21 Oct 2015 07:28:00 GMT"])
async def test_if_range_mismatch_sends_the_whole_body(if_range: str) -> None:
    async with AsyncTestClient(download_app(BlobSource())) as client:
        response = await client.get("/blob", headers={"Range": "bytes=0-9", "If-Range": if_range})
    assert response.status_code == 200
    assert response.content == BLOB
    assert "content-range" not in response.headers


async def test_head_sends_the_headers_and_reads_nothing() -> None:
    source = BlobSource()
    async with AsyncTestClient(download_app(source)) as client:
        whole = await client.head("/blob")
        part = await client.head("/blob", headers={"Range": "bytes=10-19"})
    assert whole.status_code == 200
    assert whole.content == b""
    assert whole.headers["content-length"] == str(len(BLOB))
    assert whole.headers["etag"] == ETAG
    assert whole.headers["accept-ranges"] == "bytes"
    assert part.status_code == 206
    assert part.headers["content-length"] == "10"
    assert part.headers["content-range"] == f"bytes 10-19/{len(BLOB)}"
    assert source.reads == []


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        (
            "résumé.bin",
            "attachment; filename=\"resume.bin\"; filename*=UTF-8''r%C3%A9sum%C3%A9.bin",
        ),
        (
            '../../etc/evil"\r\nX-Injected: 1.txt',
            'attachment; filename="evil_X-Injected: 1.txt"; '
            "filename*=UTF-8''evil%22X-Injected%3A%201.txt",
        ),
        ("C:\\Users\\me\\plan.txt", 'attachment; filename="plan.txt"'),
        ("..", 'attachment; filename="download"'),
        ("模型.bin", "attachment; filename=\".bin\"; filename*=UTF-8''%E6%A8%A1%E5%9E%8B.bin"),
    ],
)
async def test_content_disposition_is_ascii_safe(filename: str, expected: str) -> None:
    async with AsyncTestClient(download_app(BlobSource(), filename)) as client:
        response = await client.head("/blob")
    assert response.headers["content-disposition"] == expected


async def test_no_filename_no_content_disposition() -> None:
    async with AsyncTestClient(download_app(BlobSource(), None)) as client:
        response = await client.head("/blob")
    assert "content-disposition" not in response.headers


async def test_a_short_body_source_fails_loudly() -> None:
    source = BlobSource(BLOB[:5000])  # claims len(BLOB), holds half
    with pytest.raises(LitestarException) as raised:
        async with AsyncTestClient(download_app(source)) as client:
            await client.get("/blob")
    # Headers are out by then: the error ends the connection instead of sending a short body.
    assert "gave 5000 of the 10240 bytes announced" in repr(raised.value.__cause__)


def test_stream_response_accepts_a_plain_mapping() -> None:
    response = stream_response(
        request_headers={"Range": "bytes=0-9"},
        size=len(BLOB),
        sha256=BLOB_SHA,
        media_type="application/x-test",
        filename=None,
        chunks=BlobSource().chunks,
    )
    assert response.status_code == 206


# --- multipart_file ---------------------------------------------------------------------


def form(
    *parts: tuple[str, str | None, bytes],
    boundary: str = BOUNDARY,
    close: bool = True,
    epilogue: bytes = b"",
) -> bytes:
    """A multipart/form-data body; a part is (name, filename or None, content)."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename:
            body += b"Content-Type: application/x-test\r\n"
        body += b"\r\n" + content + b"\r\n"
    if close:
        body += f"--{boundary}--\r\n".encode() + epilogue
    return body


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


class FakeRequest:
    """Just what multipart_file reads: headers, and a body stream in chosen network chunks."""

    def __init__(self, chunks: Iterable[bytes], content_type: str = MULTIPART) -> None:
        self.headers = Headers({"content-type": content_type})
        self.chunks = chunks
        self.pulled_bytes = 0

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.pulled_bytes += len(chunk)
            yield chunk
        yield b""  # Litestar ends its stream with an empty chunk


async def upload_of(body: bytes, chunk_size: int) -> tuple[Any, bytes]:
    part = await multipart_file(FakeRequest(pieces(body, chunk_size)))  # type: ignore[arg-type]
    content = b"".join([chunk async for chunk in part.chunks])
    return part, content


async def test_file_part_between_fields_in_any_network_chunking() -> None:
    body = form(
        ("note", None, b"hello"),
        ("file", "model.bin", TRICKY),
        ("tag", None, b"after"),
        ("empty-input", "", b""),
    )
    # Size 1 splits every boundary; len(body) puts headers and content in one chunk.
    for chunk_size in [*range(1, 80), 127, 1000, len(body)]:
        part, content = await upload_of(body, chunk_size)
        assert content == TRICKY, chunk_size
        assert (part.filename, part.content_type) == ("model.bin", "application/x-test")


async def test_the_part_named_file_needs_no_filename() -> None:
    part, content = await upload_of(form(("file", None, b"inline")), 3)
    assert (part.filename, part.content_type, content) == (None, None, b"inline")


async def test_a_part_with_a_filename_is_the_file_when_none_is_named_file() -> None:
    part, content = await upload_of(form(("a", None, b"x"), ("upload", "u.txt", b"data")), 1)
    assert (part.filename, content) == ("u.txt", b"data")


async def test_an_empty_file_part() -> None:
    part, content = await upload_of(form(("file", "empty.bin", b"")), 1)
    assert (part.filename, content) == ("empty.bin", b"")


async def test_a_20_mib_part_streams_in_bounded_memory() -> None:
    piece = 64 * KIB
    count = 20 * MIB // piece
    head = (
        form(("note", None, b"big one"), close=False)
        + (
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; "
            'name="file"; filename="big.bin"\r\n\r\n'
        ).encode()
    )
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()

    def network() -> Iterator[bytes]:
        yield head
        for index in range(count):
            yield bytes([index % 251]) * piece
        yield tail

    expected = hashlib.sha256()
    for index in range(count):
        expected.update(bytes([index % 251]) * piece)

    request = FakeRequest(network())
    tracemalloc.start()
    try:
        part = await multipart_file(request)  # type: ignore[arg-type]
        received = hashlib.sha256()
        size = largest = lag = 0
        async for chunk in part.chunks:
            received.update(chunk)
            size += len(chunk)
            largest = max(largest, len(chunk))
            # Bytes taken from the network but not yet handed on: at most about a chunk.
            lag = max(lag, request.pulled_bytes - len(head) - size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == 20 * MIB
    assert received.hexdigest() == expected.hexdigest()
    assert largest <= piece + len(tail)  # a held-back "\r" may join the next chunk
    assert lag <= piece + len(tail)
    assert peak < 2 * MIB


async def test_a_truncated_body_raises_from_the_chunks() -> None:
    for body in [
        form(("file", "f.bin", TRICKY), close=False),
        form(("file", "f.bin", TRICKY * 50))[:-500],  # cut inside the content
    ]:
        for chunk_size in (1, 64, len(body)):
            part = await multipart_file(FakeRequest(pieces(body, chunk_size)))  # type: ignore[arg-type]
            streamed = 0
            with pytest.raises(MultipartError, match="ended before its closing boundary"):
                async for chunk in part.chunks:
                    streamed += len(chunk)
            assert streamed > 0  # the content streamed before the truncation showed


@pytest.mark.parametrize(
    "body",
    [
        form(("file", "a.bin", b"one"), ("file", "b.bin", b"two")),
        form(("file", "a.bin", b"one"), ("note", None, b"x"), ("other", "b.bin", b"two")),
        form(("upload", "a.bin", b"one"), ("file", None, b"two")),
    ],
)
async def test_a_second_file_part_raises(body: bytes) -> None:
    part = await multipart_file(FakeRequest(pieces(body, 7)))  # type: ignore[arg-type]
    with pytest.raises(MultipartError, match="send exactly one file"):
        async for _ in part.chunks:
            pass


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        ("multipart/form-data", "no boundary"),
        ('multipart/form-data; boundary=""', "no boundary"),
        ("application/json", "must be multipart/form-data"),
    ],
)
async def test_an_unusable_content_type_raises(content_type: str, message: str) -> None:
    request = FakeRequest([form(("file", "a.bin", b"x"))], content_type)
    with pytest.raises(MultipartError, match=message) as raised:
        await multipart_file(request)  # type: ignore[arg-type]
    assert "-F file=@path" in str(raised.value)
    assert request.pulled_bytes == 0


async def test_a_form_without_a_file_raises() -> None:
    with pytest.raises(MultipartError, match="no file part"):
        await upload_of(form(("note", None, b"x")), 5)


async def test_a_body_that_is_not_multipart_raises() -> None:
    with pytest.raises(MultipartError, match="closing boundary"):
        await upload_of(b"just some bytes, no boundary anywhere", 5)


async def test_a_large_field_before_the_file_raises() -> None:
    body = form(("note", None, b"x" * (FIELD_LIMIT + 1)), ("file", "a.bin", b"x"))
    with pytest.raises(MultipartError, match="'note' is over 64 KiB"):
        await upload_of(body, 4096)


async def test_a_large_field_after_the_file_raises_from_the_chunks() -> None:
    body = form(("file", "a.bin", b"x"), ("note", None, b"x" * (FIELD_LIMIT + 1)))
    part = await multipart_file(FakeRequest(pieces(body, 4096)))  # type: ignore[arg-type]
    with pytest.raises(MultipartError, match="'note' is over 64 KiB"):
        async for _ in part.chunks:
            pass


async def test_an_endless_preamble_or_epilogue_raises() -> None:
    preamble = b"p" * (2 * MIB) + b"\r\n" + form(("file", "a.bin", b"x"))
    with pytest.raises(MultipartError, match="before the file"):
        await upload_of(preamble, 64 * KIB)
    epilogue = form(("file", "a.bin", b"x"), epilogue=b"e" * (2 * MIB))
    with pytest.raises(MultipartError, match="after the file"):
        await upload_of(epilogue, 64 * KIB)


async def test_a_short_epilogue_is_ignored() -> None:
    _, content = await upload_of(form(("file", "a.bin", b"x"), epilogue=b"bye\r\n"), 2)
    assert content == b"x"


# --- multipart_file through a tiny app ---------------------------------------------------


def upload_app() -> Litestar:
    @post("/upload", request_max_body_size=None)
    async def upload(request: Request[Any, Any, Any]) -> Response[Any]:
        try:
            part = await multipart_file(request)
            digest = hashlib.sha256()
            size = 0
            async for chunk in part.chunks:
                digest.update(chunk)
                size += len(chunk)
        except MultipartError as error:
            return error_response(400, str(error))
        summary = {
            "filename": part.filename,
            "content_type": part.content_type,
            "size": size,
            "sha256": digest.hexdigest(),
        }
        return Response(summary, status_code=201)

    return Litestar([upload])


async def test_upload_through_litestar_with_fields_around_the_file() -> None:
    data = TRICKY * 1000
    async with AsyncTestClient(upload_app()) as client:
        response = await client.post(
            "/upload",
            data={"note": "first", "tag": "second"},
            files={"file": ("model.bin", data, "application/x-test")},
        )
        built = await client.post(
            "/upload",
            content=form(("a", None, b"1"), ("file", "f.bin", data), ("b", None, b"2")),
            headers={"Content-Type": MULTIPART},
        )
    assert response.status_code == 201, response.text
    assert response.json() == {
        "filename": "model.bin",
        "content_type": "application/x-test",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert built.status_code == 201, built.text
    assert built.json()["sha256"] == hashlib.sha256(data).hexdigest()


async def test_upload_errors_through_litestar_are_400() -> None:
    async with AsyncTestClient(upload_app()) as client:
        no_boundary = await client.post(
            "/upload", content=b"x", headers={"Content-Type": "multipart/form-data"}
        )
        two_files = await client.post(
            "/upload",
            files=[("file", ("a.bin", b"1")), ("file", ("b.bin", b"2"))],
        )
    assert no_boundary.status_code == 400
    assert "-F file=@path" in no_boundary.json()["error"]["message"]
    assert two_files.status_code == 400
    assert "send exactly one file" in two_files.json()["error"]["message"]
