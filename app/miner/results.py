"""Packaging an executor's output in the format the job asked for: json, text, binary, archive.

The agent delivers exactly the format of the job's `output_config.format`, so the ledger
(which checks formats too, app/formats.py) never has to refuse what a miner sends. Files
are read and written in chunks, so an output of any size is packaged in bounded memory;
the size and SHA-256 of the packaged result are computed once, in the same pass.
"""

from __future__ import annotations

import codecs
import hashlib
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from app.formats import MEDIA_TYPES
from app.miner.executors import CHUNK_BYTES, ExecutorError, Output, Stopped, run_stoppable

# The media type of each format's packaged result (app/formats.py has the ledger's copy).
# JSON outputs up to this size are parsed to check them; text up to it may become a JSON string.
JSON_CONVERT_LIMIT: Final = 64 * 1024 * 1024
# Results the agent makes (converted JSON) larger than this go to a file instead of memory.
_IN_MEMORY_BYTES: Final = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class PackagedResult:
    """A result in its delivery format: small bytes (`data`) or a file (`path`), measured."""

    content_type: str
    size_bytes: int
    sha256: str
    data: bytes = b""
    path: Path | None = None


async def package(output: Output, output_format: str, directory: Path) -> PackagedResult:
    """The output in `output_format`, checked and measured; files it makes go in `directory`.

    Raises ExecutorError("invalid_output") when the output cannot be in that format.
    The work runs in a thread; cancelling stops it within one chunk.
    """
    return await run_stoppable(
        lambda stop: package_blocking(output, output_format, directory, stop)
    )


def package_blocking(
    output: Output, output_format: str, directory: Path, stop: threading.Event
) -> PackagedResult:
    """`package` for a thread: blocking, and raising Stopped once `stop` is set."""
    match output_format:
        case "binary":
            return _measured(output, "binary", stop)
        case "text":
            return _measured(output, "text", stop, utf8=True)
        case "json":
            return _as_json(output, directory, stop)
        case "archive":
            return _as_archive(output, directory, stop)
    raise ExecutorError(
        "invalid_output",
        f"the job asks for the output format {output_format!r}; this miner makes "
        f"{', '.join(MEDIA_TYPES)}",
    )


def media_kind(content_type: str) -> str:
    """The kind of a media type: json (application/json, */*+json), text (text/*) or other."""
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return "json"
    if media.startswith("text/"):
        return "text"
    return "other"


def _chunks(output: Output, stop: threading.Event) -> Iterator[bytes]:
    """The output's bytes in pieces of at most CHUNK_BYTES, checking `stop` between them."""
    if output.path is None:
        view = memoryview(output.data)
        for start in range(0, len(view), CHUNK_BYTES):
            if stop.is_set():
                raise Stopped
            yield bytes(view[start : start + CHUNK_BYTES])
        return
    with output.path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            if stop.is_set():
                raise Stopped
            yield chunk


def _size(output: Output) -> int:
    """The output's length in bytes, without reading a file output."""
    return len(output.data) if output.path is None else output.path.stat().st_size


def _read_all(output: Output, stop: threading.Event) -> bytes:
    """The whole output in memory; only for outputs known to be at most JSON_CONVERT_LIMIT."""
    if output.path is None:
        return output.data
    return b"".join(_chunks(output, stop))


def _not_utf8(offset: int, output_format: str) -> ExecutorError:
    """The error for a text or json result with bytes that are not UTF-8."""
    return ExecutorError(
        "invalid_output",
        f"the model produced bytes that are not UTF-8 text (byte {offset} is not), but the "
        f"job asks for the {output_format} format; the binary and archive formats take any bytes",
    )


def _measured(
    output: Output, output_format: str, stop: threading.Event, *, utf8: bool = False
) -> PackagedResult:
    """The output as it is, with its size and SHA-256; with `utf8`, checked to be UTF-8 text."""
    digest = hashlib.sha256()
    size = 0
    decoder = codecs.getincrementaldecoder("utf-8")() if utf8 else None
    for chunk in _chunks(output, stop):
        if decoder is not None:
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                raise _not_utf8(size + error.start, output_format) from None
        digest.update(chunk)
        size += len(chunk)
    if decoder is not None:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as error:
            raise _not_utf8(size - len(error.object) + error.start, output_format) from None
    return PackagedResult(
        content_type=MEDIA_TYPES[output_format],
        size_bytes=size,
        sha256=digest.hexdigest(),
        data=output.data,
        path=output.path,
    )


def _as_json(output: Output, directory: Path, stop: threading.Event) -> PackagedResult:
    """JSON output as it is (parsed to check it up to 64 MiB), text as a JSON string."""
    kind = media_kind(output.content_type)
    size = _size(output)
    if kind == "json":
        if size > JSON_CONVERT_LIMIT:
            # Too large to parse here; the ledger still needs UTF-8, which costs nothing.
            return _measured(output, "json", stop, utf8=True)
        data = _read_all(output, stop)
        try:
            data.decode("utf-8")
            # Decoding to Raw checks the syntax without building Python objects.
            msgspec.json.decode(data, type=msgspec.Raw)
        except (UnicodeDecodeError, msgspec.DecodeError) as error:
            raise ExecutorError(
                "invalid_output",
                f"the model's output is labelled JSON but is not valid JSON: {error}",
            ) from None
        return PackagedResult(
            content_type=MEDIA_TYPES["json"],
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            data=output.data,
            path=output.path,
        )
    if kind == "text":
        if size > JSON_CONVERT_LIMIT:
            raise ExecutorError(
                "invalid_output",
                f"the model produced {size} bytes of text, too large to turn into a JSON "
                f"string (at most {JSON_CONVERT_LIMIT} bytes); ask for the text format",
            )
        data = _read_all(output, stop)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _not_utf8(error.start, "json") from None
        return _made(msgspec.json.encode(text), MEDIA_TYPES["json"], directory / "result.json")
    raise ExecutorError(
        "invalid_output",
        f"the model produced {output.content_type} output, which is neither JSON nor text, "
        "but the job asks for the json format; the binary and archive formats take any bytes",
    )


def _made(data: bytes, content_type: str, target: Path) -> PackagedResult:
    """A result the agent made: kept in memory if small, else written to `target`."""
    digest = hashlib.sha256(data).hexdigest()
    if len(data) <= _IN_MEMORY_BYTES:
        return PackagedResult(
            content_type=content_type, size_bytes=len(data), sha256=digest, data=data
        )
    target.write_bytes(data)
    return PackagedResult(
        content_type=content_type, size_bytes=len(data), sha256=digest, path=target
    )


_MEMBER_EXTENSIONS: Final = {"json": "json", "text": "txt", "other": "bin"}


def _as_archive(output: Output, directory: Path, stop: threading.Event) -> PackagedResult:
    """A zip holding the output as one member, `result.<json|txt|bin>`, streamed from the source."""
    target = directory / "result.zip"
    member = zipfile.ZipInfo(
        f"result.{_MEMBER_EXTENSIONS[media_kind(output.content_type)]}",
        date_time=time.localtime()[:6],
    )
    member.compress_type = zipfile.ZIP_DEFLATED
    member.external_attr = 0o644 << 16
    # Knowing the size up front lets zipfile choose ZIP64 for members of 4 GiB and more.
    member.file_size = _size(output)
    with (
        zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive,
        archive.open(member, "w") as writer,
    ):
        for chunk in _chunks(output, stop):
            writer.write(chunk)
    return _measured(Output(path=target), "archive", stop)
