"""Packaging executor outputs in the job's format: json, text, binary, archive."""

from __future__ import annotations

import hashlib
import io
import json
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from app.miner import results
from app.miner.executors import ExecutorError, Output
from app.miner.results import PackagedResult, media_kind, package

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
BINARY = "application/octet-stream"

SAMPLES = {
    JSON: '{"answer": 42, "name": "héllo"}'.encode(),
    TEXT: "héllo wörld\nsecond line\n".encode(),
    BINARY: bytes(range(256)) * 4,
}
MEDIA = {
    "json": "application/json",
    "text": "text/plain; charset=utf-8",
    "binary": "application/octet-stream",
    "archive": "application/zip",
}
MEMBER = {JSON: "result.json", TEXT: "result.txt", BINARY: "result.bin"}


def output_of(data: bytes, content_type: str, kind: str, directory: Path) -> Output:
    if kind == "bytes":
        return Output(data, content_type)
    path = directory / "executor-output"
    path.write_bytes(data)
    return Output(path=path, content_type=content_type)


def content(packaged: PackagedResult) -> bytes:
    return packaged.data if packaged.path is None else packaged.path.read_bytes()


def assert_measured(packaged: PackagedResult) -> bytes:
    data = content(packaged)
    assert packaged.size_bytes == len(data)
    assert packaged.sha256 == hashlib.sha256(data).hexdigest()
    return data


async def failure(output: Output, output_format: str, directory: Path) -> ExecutorError:
    with pytest.raises(ExecutorError) as raised:
        await package(output, output_format, directory)
    return raised.value


# ---- every format x output kind x content type ----------------------------------


@pytest.mark.parametrize("kind", ["bytes", "path"])
@pytest.mark.parametrize("content_type", [JSON, TEXT, BINARY])
async def test_binary_takes_any_output_as_it_is(
    kind: str, content_type: str, tmp_path: Path
) -> None:
    data = SAMPLES[content_type]
    packaged = await package(output_of(data, content_type, kind, tmp_path), "binary", tmp_path)
    assert packaged.content_type == MEDIA["binary"]
    assert assert_measured(packaged) == data
    if kind == "path":
        assert packaged.path == tmp_path / "executor-output", "a file output is not copied"


@pytest.mark.parametrize("kind", ["bytes", "path"])
@pytest.mark.parametrize("content_type", [JSON, TEXT])
async def test_text_takes_utf8_output_as_it_is(
    kind: str, content_type: str, tmp_path: Path
) -> None:
    data = SAMPLES[content_type]
    packaged = await package(output_of(data, content_type, kind, tmp_path), "text", tmp_path)
    assert packaged.content_type == MEDIA["text"]
    assert assert_measured(packaged) == data


@pytest.mark.parametrize("kind", ["bytes", "path"])
async def test_text_refuses_bytes_that_are_not_utf8(kind: str, tmp_path: Path) -> None:
    output = output_of(SAMPLES[BINARY], BINARY, kind, tmp_path)
    error = await failure(output, "text", tmp_path)
    assert error.code == "invalid_output"
    assert "not UTF-8" in error.message
    assert "binary and archive formats take any bytes" in error.message
    assert "byte 128" in error.message  # the first byte that is not UTF-8


@pytest.mark.parametrize("kind", ["bytes", "path"])
async def test_text_refuses_output_that_ends_mid_character(kind: str, tmp_path: Path) -> None:
    output = output_of("abcé".encode()[:-1], TEXT, kind, tmp_path)
    error = await failure(output, "text", tmp_path)
    assert error.code == "invalid_output"
    assert "byte 3" in error.message


async def test_text_accepts_a_character_split_across_read_chunks(tmp_path: Path) -> None:
    data = b"a" * (results.CHUNK_BYTES - 1) + "€".encode() + b"z" * 10
    packaged = await package(output_of(data, TEXT, "path", tmp_path), "text", tmp_path)
    assert packaged.size_bytes == len(data)


@pytest.mark.parametrize("kind", ["bytes", "path"])
@pytest.mark.parametrize("content_type", [JSON, "application/ld+json", "Application/JSON; x=1"])
async def test_json_takes_json_output_as_it_is(
    kind: str, content_type: str, tmp_path: Path
) -> None:
    data = SAMPLES[JSON]
    packaged = await package(output_of(data, content_type, kind, tmp_path), "json", tmp_path)
    assert packaged.content_type == MEDIA["json"]
    assert assert_measured(packaged) == data


@pytest.mark.parametrize("kind", ["bytes", "path"])
async def test_json_turns_text_output_into_a_json_string(kind: str, tmp_path: Path) -> None:
    data = SAMPLES[TEXT]
    packaged = await package(output_of(data, TEXT, kind, tmp_path), "json", tmp_path)
    assert packaged.content_type == MEDIA["json"]
    assert json.loads(assert_measured(packaged)) == data.decode()


async def test_a_large_text_converted_to_json_goes_to_a_file(tmp_path: Path) -> None:
    text = 'line "quoted" \\ é\n' * 200_000  # about 4 MiB, escapes included
    packaged = await package(Output(text.encode(), "text/csv"), "json", tmp_path)
    assert packaged.path is not None
    assert packaged.data == b""
    assert json.loads(assert_measured(packaged)) == text


@pytest.mark.parametrize("kind", ["bytes", "path"])
async def test_json_refuses_binary_output(kind: str, tmp_path: Path) -> None:
    error = await failure(output_of(SAMPLES[BINARY], "image/png", kind, tmp_path), "json", tmp_path)
    assert error.code == "invalid_output"
    assert "image/png" in error.message
    assert "binary and archive" in error.message


@pytest.mark.parametrize("kind", ["bytes", "path"])
@pytest.mark.parametrize("data", [b'{"a": 1', b'{"a": 1} trailing', b"", b'"\xff"', b"nul"])
async def test_json_refuses_invalid_json(kind: str, data: bytes, tmp_path: Path) -> None:
    error = await failure(output_of(data, JSON, kind, tmp_path), "json", tmp_path)
    assert error.code == "invalid_output"
    assert "not valid JSON" in error.message


async def test_json_refuses_text_not_utf8_to_convert(tmp_path: Path) -> None:
    error = await failure(Output(b"ok \xff", TEXT), "json", tmp_path)
    assert error.code == "invalid_output"
    assert "not UTF-8" in error.message


async def test_json_refuses_text_too_large_to_convert(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    with path.open("wb") as file:
        file.truncate(results.JSON_CONVERT_LIMIT + 1)  # sparse: nothing is written or read
    error = await failure(Output(path=path, content_type=TEXT), "json", tmp_path)
    assert error.code == "invalid_output"
    assert "too large" in error.message
    assert "text format" in error.message


async def test_json_larger_than_the_parse_limit_is_checked_for_utf8_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(results, "JSON_CONVERT_LIMIT", 16)
    unparsed = b'["this is longer than 16 bytes", '  # not parsed: too large
    packaged = await package(output_of(unparsed, JSON, "path", tmp_path), "json", tmp_path)
    assert assert_measured(packaged) == unparsed
    error = await failure(Output(b'["not utf-8 \xff at all"]', JSON), "json", tmp_path)
    assert error.code == "invalid_output"


@pytest.mark.parametrize("kind", ["bytes", "path"])
@pytest.mark.parametrize("content_type", [JSON, TEXT, BINARY])
async def test_archive_is_a_zip_with_the_output_as_its_one_member(
    kind: str, content_type: str, tmp_path: Path
) -> None:
    data = SAMPLES[content_type]
    packaged = await package(output_of(data, content_type, kind, tmp_path), "archive", tmp_path)
    assert packaged.content_type == MEDIA["archive"]
    assert packaged.path is not None
    with zipfile.ZipFile(io.BytesIO(assert_measured(packaged))) as archive:
        assert archive.namelist() == [MEMBER[content_type]]
        assert archive.infolist()[0].compress_type == zipfile.ZIP_DEFLATED
        assert archive.read(MEMBER[content_type]) == data
        assert archive.testzip() is None


async def test_an_empty_output_packages_in_every_format_that_allows_it(tmp_path: Path) -> None:
    empty = hashlib.sha256(b"").hexdigest()
    for output_format in ("binary", "text"):
        packaged = await package(Output(b"", TEXT), output_format, tmp_path)
        assert (packaged.size_bytes, packaged.sha256) == (0, empty)
    converted = await package(Output(b"", TEXT), "json", tmp_path)
    assert content(converted) == b'""'
    archived = await package(Output(b"", BINARY), "archive", tmp_path)
    with zipfile.ZipFile(io.BytesIO(assert_measured(archived))) as archive:
        assert archive.read("result.bin") == b""


async def test_an_unknown_format_is_invalid_output(tmp_path: Path) -> None:
    error = await failure(Output(b"x"), "parquet", tmp_path)
    assert error.code == "invalid_output"
    assert "'parquet'" in error.message


def test_media_kinds() -> None:
    assert media_kind("application/json") == "json"
    assert media_kind("application/problem+json; charset=utf-8") == "json"
    assert media_kind("TEXT/CSV") == "text"
    assert media_kind("application/octet-stream") == "other"
    assert media_kind("application/jsonl") == "other"


# ---- large outputs stream from disk ---------------------------------------------------


def write_large_text(path: Path, size: int) -> str:
    """A file of `size` bytes of UTF-8 text, written in pieces; its SHA-256."""
    line = b"row,%d,ok,somewhat compressible text\n"
    digest = hashlib.sha256()
    written = 0
    with path.open("wb") as file:
        number = 0
        while written < size:
            piece = b"".join(line % (number + i) for i in range(10_000))[: size - written]
            file.write(piece)
            digest.update(piece)
            written += len(piece)
            number += 10_000
    return digest.hexdigest()


@pytest.mark.parametrize("output_format", ["binary", "text", "archive"])
async def test_a_large_file_output_is_packaged_without_loading_it(
    output_format: str, tmp_path: Path
) -> None:
    size = 30 * 1024 * 1024
    source = tmp_path / "large.csv"
    source_sha256 = write_large_text(source, size)
    tracemalloc.start()
    try:
        packaged = await package(
            Output(path=source, content_type="text/csv"), output_format, tmp_path
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"packaging used {peak} bytes at its peak"
    assert packaged.path is not None
    if output_format == "archive":
        digest = hashlib.sha256()
        with packaged.path.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
        assert packaged.sha256 == digest.hexdigest()
        assert packaged.size_bytes == packaged.path.stat().st_size
        with zipfile.ZipFile(packaged.path) as archive, archive.open("result.txt") as member:
            unpacked = hashlib.sha256()
            while chunk := member.read(1 << 20):
                unpacked.update(chunk)
        assert unpacked.hexdigest() == source_sha256
    else:
        assert packaged.path == source
        assert (packaged.size_bytes, packaged.sha256) == (size, source_sha256)
