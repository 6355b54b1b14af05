"""Streamed transfers over HTTP: ranged, digest-tagged downloads and multipart or raw uploads."""

from __future__ import annotations

import base64
import binascii
import math
import re
import unicodedata
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import multipart  # type: ignore[import-untyped]
from litestar import Request, Response
from litestar.response import Stream
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_206_PARTIAL_CONTENT,
    HTTP_304_NOT_MODIFIED,
    HTTP_416_REQUESTED_RANGE_NOT_SATISFIABLE,
)

from app.api.errors import error_response

# A form field other than the file is metadata, never content: small, and held in memory.
FIELD_LIMIT = 64 * 1024
# Everything but the file's content (preamble, fields, boundaries, epilogue) before the file
# part, and again after it: without this a client could stream an endless preamble or epilogue.
FORM_OVERHEAD_LIMIT = 1024 * 1024
_HOW_TO_SEND = "send exactly one file as the form field `file`, e.g. curl -F file=@path"
_FALLBACK_FILENAME = "download"

_RANGE_SPEC = re.compile(r"([0-9]*)[ \t]*-[ \t]*([0-9]*)")
_SHA256_MEMBER = re.compile(r":([A-Za-z0-9+/=]*):")
_PATH_SEPARATORS = re.compile(r"[/\\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Outside printable ASCII, or a character that would end or escape the quoted string.
_UNSAFE_IN_QUOTED = re.compile(r'[^\x20-\x7e]|["\\]')


class RangeNotSatisfiable(Exception):
    """A byte range that selects nothing of a `size`-byte body: the answer is 416."""

    def __init__(self, size: int) -> None:
        super().__init__(f"no byte of the requested range lies within the {size}-byte body")
        self.size = size


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes `start` (inclusive) to `end` (exclusive) of a body."""

    start: int
    end: int

    @property
    def length(self) -> int:
        """How many bytes the range holds."""
        return self.end - self.start


def _range_spec(header: str) -> tuple[str, str] | None:
    """The first and last positions of a lone, well-formed byte-range-spec; None otherwise."""
    unit, equals, range_set = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    # RFC 9110 5.6.1: recipients accept and ignore empty list elements ("bytes=0-9,").
    specs = [spec.strip() for spec in range_set.split(",") if spec.strip()]
    if len(specs) != 1:
        return None  # no range, or several: the RFC lets us ignore the header
    match = _RANGE_SPEC.fullmatch(specs[0])
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None  # "bytes=-"
    if first and last and int(last) < int(first):
        return None  # RFC 9110 14.1.1: last-pos < first-pos makes the range-spec invalid
    return first, last


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range a Range header asks for; None means send the whole body."""
    spec = None if header is None else _range_spec(header)
    if spec is None:
        return None
    first, last = spec
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return ByteRange(max(size - suffix, 0), size)
    start = int(first)
    if start >= size:
        raise RangeNotSatisfiable(size)
    return ByteRange(start, min(int(last) + 1, size) if last else size)


def digest_headers(sha256_hex: str) -> dict[str, str]:
    """The entity tag and the whole representation's digest, legacy (RFC 3230) and RFC 9530."""
    digest = base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")
    return {
        "ETag": f'"{sha256_hex.lower()}"',
        "Digest": f"sha-256={digest}",
        "Repr-Digest": f"sha-256=:{digest}:",
    }


def parse_content_digest(header: str | None) -> str | None:
    """The lowercase hex SHA-256 a Content-Digest header (RFC 9530) announces, if it has one."""
    if header is None:
        return None
    value: str | None = None
    for member in header.split(","):
        key, _, rest = member.partition("=")
        if key.strip().lower() == "sha-256":
            value = rest.split(";", 1)[0].strip()  # a later duplicate wins, as in RFC 8941
    if value is None:
        return None
    how = "send Content-Digest: sha-256=:<base64 of the 32-byte SHA-256 digest>:"
    match = _SHA256_MEMBER.fullmatch(value)
    if match is None:
        raise ValueError(f"Content-Digest sha-256 is not a byte sequence between colons; {how}")
    try:
        digest = base64.b64decode(match.group(1), validate=True)
    except binascii.Error:
        raise ValueError(f"Content-Digest sha-256 is not valid base64; {how}") from None
    if len(digest) != 32:
        raise ValueError(
            f"Content-Digest sha-256 holds {len(digest)} bytes, a SHA-256 digest has 32; {how}"
        )
    return digest.hex()


def content_disposition(filename: str) -> str:
    """An attachment header whose quoted filename is plain ASCII; filename* keeps the real name."""
    name = _CONTROL.sub("", _PATH_SEPARATORS.split(filename)[-1]).strip()
    if name in {"", ".", ".."}:
        name = _FALLBACK_FILENAME
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    ascii_name = _UNSAFE_IN_QUOTED.sub("_", ascii_name).strip() or _FALLBACK_FILENAME
    header = f'attachment; filename="{ascii_name}"'
    if ascii_name != name:
        header += f"; filename*=UTF-8''{quote(name, safe='')}"
    return header


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A request header by its lowercase name, from Litestar's headers or a plain mapping."""
    value = headers.get(name)
    if value is not None:
        return value
    return next((v for k, v in headers.items() if k.lower() == name), None)


def _opaque_tags(header: str) -> set[str]:
    """The entity tags an If-None-Match lists, weak or not (RFC 9110 13.1.2 compares weakly)."""
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def _not_modified(if_none_match: str | None, etag: str) -> bool:
    """Whether the client's copy is current: If-None-Match names our tag, or is "*"."""
    if if_none_match is None:
        return False
    tags = _opaque_tags(if_none_match)
    return "*" in tags or etag in tags


async def _no_body() -> AsyncIterator[bytes]:
    """The body of a HEAD answer: nothing at all."""
    return
    yield b""  # never reached; the yield makes this an async generator


async def _exactly(chunks: AsyncIterator[bytes], length: int) -> AsyncIterator[bytes]:
    """The source's chunks, checked to add up to the Content-Length already sent."""
    sent = 0
    async for chunk in chunks:
        if not chunk:
            continue
        sent += len(chunk)
        if sent > length:
            raise RuntimeError(f"the body source gave more than the {length} bytes announced")
        yield chunk
    if sent != length:
        raise RuntimeError(f"the body source gave {sent} of the {length} bytes announced")


def stream_response(
    *,
    request_headers: Mapping[str, str],
    size: int,
    sha256: str,
    media_type: str,
    filename: str | None,
    chunks: Callable[[int, int], AsyncIterator[bytes]],
    extra_headers: Mapping[str, str] | None = None,
    head: bool = False,
) -> Response[Any]:
    """A 200, 206, 304 or 416 answer for a stored body, streamed as the client reads it."""
    digests = digest_headers(sha256)
    etag = digests["ETag"]
    extra = dict(extra_headers or {})
    if _not_modified(_header(request_headers, "if-none-match"), etag):
        return Response(
            content=b"", status_code=HTTP_304_NOT_MODIFIED, headers={**extra, "ETag": etag}
        )

    byte_range: ByteRange | None = None
    range_header = _header(request_headers, "range")
    if_range = _header(request_headers, "if-range")
    # If-Range compares strongly; a date never matches since we send no Last-Modified.
    if range_header is not None and (if_range is None or if_range.strip() == etag):
        try:
            byte_range = parse_range(range_header, size)
        except RangeNotSatisfiable:
            return error_response(
                HTTP_416_REQUESTED_RANGE_NOT_SATISFIABLE,
                f"range {range_header.strip()!r} is outside the body of {size} bytes: "
                f"ask for bytes 0-{max(size - 1, 0)}, or send no Range header",
                {"size": size},
                headers={"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"},
            )

    headers = {**extra, **digests, "Accept-Ranges": "bytes", "Content-Type": media_type}
    if filename is not None:
        headers["Content-Disposition"] = content_disposition(filename)
    if byte_range is None:
        status, byte_range = HTTP_200_OK, ByteRange(0, size)
    else:
        status = HTTP_206_PARTIAL_CONTENT
        headers["Content-Range"] = f"bytes {byte_range.start}-{byte_range.end - 1}/{size}"
    headers["Content-Length"] = str(byte_range.length)
    body = (
        _no_body()
        if head
        else _exactly(chunks(byte_range.start, byte_range.end), byte_range.length)
    )
    return Stream(body, status_code=status, headers=headers, media_type=media_type)


async def body_chunks(request: Request[Any, Any, Any]) -> AsyncIterator[bytes]:
    """The raw request body as it arrives, without empty chunks and without a size limit."""
    async for chunk in request.stream():
        if chunk:
            yield chunk


class MultipartError(ValueError):
    """A multipart upload we cannot take; the message says what is wrong and how to send it."""


@dataclass(frozen=True, slots=True)
class UploadPart:
    """The file part of a multipart upload; `chunks` streams its content as it arrives."""

    filename: str | None
    content_type: str | None
    chunks: AsyncIterator[bytes]


def _is_file_part(segment: Any) -> bool:
    """The part named file, or any part with a filename (an empty one is an unused file input)."""
    return segment.name == "file" or bool(segment.filename)


class _FormReader:
    """One multipart/form-data body, read front to back: small fields, the file, the rest."""

    def __init__(self, parser: Any, body: AsyncIterator[bytes]) -> None:
        self._parser = parser
        self._body = body
        self._received = 0
        self._limit: float = FORM_OVERHEAD_LIMIT
        self._limit_message = f"more than 1 MiB of form data before the file; {_HOW_TO_SEND}"
        self._events = self._parse()

    async def _parse(self) -> AsyncIterator[Any]:
        """The parser's events (segment, bytes, None), fed one network chunk at a time."""
        try:
            async for chunk in self._body:
                self._received += len(chunk)
                # A chunk's events all go out before the next read: a chunk holding the end
                # of the file part's headers and the start of its content loses nothing.
                for event in self._parser.parse(chunk):
                    yield event
                if self._received > self._limit:
                    raise MultipartError(self._limit_message)
        except multipart.MultipartError as error:
            raise MultipartError(f"malformed multipart body: {error}; {_HOW_TO_SEND}") from error
        try:
            self._parser.close()
        except multipart.MultipartError as error:
            raise MultipartError(
                "the multipart body ended before its closing boundary (an interrupted upload?); "
                "nothing was kept, send the file again"
            ) from error

    async def next_file_part(self) -> Any | None:
        """Skip small fields up to the next file part; None when the body ends without one."""
        field_name = ""
        field_size = 0
        async for event in self._events:
            if isinstance(event, multipart.MultipartSegment):
                if _is_file_part(event):
                    self._limit = math.inf  # the file's size is the blob store's to limit
                    return event
                field_name, field_size = event.name, 0
            elif isinstance(event, bytes):
                field_size += len(event)
                if field_size > FIELD_LIMIT:
                    raise MultipartError(
                        f"form field {field_name!r} is over 64 KiB; only the file may be large: "
                        f"{_HOW_TO_SEND}"
                    )
        return None

    async def file_content(self) -> AsyncIterator[bytes]:
        """The file part's content as it arrives, then the rest of the body checked."""
        async for event in self._events:
            if event is None:
                break
            yield event
        else:
            raise MultipartError("the multipart body ended inside the file part; send it again")
        self._limit = self._received + FORM_OVERHEAD_LIMIT
        self._limit_message = f"more than 1 MiB of form data after the file; {_HOW_TO_SEND}"
        extra = await self.next_file_part()
        if extra is not None:
            raise MultipartError(
                f"a second file part {extra.name!r} follows the file; {_HOW_TO_SEND}"
            )


def _boundary(content_type: str | None) -> str:
    """The boundary of a multipart/form-data Content-Type."""
    mime, options = multipart.parse_options_header(content_type or "")
    if mime != "multipart/form-data":
        raise MultipartError(
            f"Content-Type must be multipart/form-data, got {mime or 'none'!r}; {_HOW_TO_SEND}"
        )
    boundary: str | None = options.get("boundary")
    if not boundary:
        raise MultipartError(
            "Content-Type multipart/form-data has no boundary parameter; let the client build "
            f"the header (do not set it by hand): {_HOW_TO_SEND}"
        )
    return boundary


async def multipart_file(request: Request[Any, Any, Any]) -> UploadPart:
    """The one file of a multipart/form-data upload, its content left streaming."""
    boundary = _boundary(request.headers.get("content-type"))
    try:
        parser = multipart.PushMultipartParser(boundary)
    except multipart.MultipartError as error:
        raise MultipartError(f"unusable multipart boundary: {error}; {_HOW_TO_SEND}") from error
    reader = _FormReader(parser, body_chunks(request))
    segment = await reader.next_file_part()
    if segment is None:
        raise MultipartError(f"the form holds no file part; {_HOW_TO_SEND}")
    return UploadPart(
        filename=segment.filename or None,
        content_type=segment.content_type,
        chunks=reader.file_content(),
    )
