"""Result formats (json, text, binary, archive): their media types and content checks.

The ledger checks that stored and inline results are what the client asked for
while the bytes stream past, in bounded memory: text and json must be UTF-8, json
must parse (fully up to JSON_PARSE_LIMIT bytes; beyond that only its first
character is checked), an archive must start with a zip signature.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterable, AsyncIterator
from typing import Final

import msgspec

MEDIA_TYPES: Final = {
    "json": "application/json",
    "text": "text/plain; charset=utf-8",
    "binary": "application/octet-stream",
    "archive": "application/zip",
}
EXTENSIONS: Final = {"json": "json", "text": "txt", "binary": "bin", "archive": "zip"}
# JSON results up to this size are parsed in full; larger ones are checked for UTF-8 only.
JSON_PARSE_LIMIT: Final = 16 * 1024 * 1024
# A zip starts with a local file header, or is empty (just the end of central directory).
_ZIP_SIGNATURES: Final = (b"PK\x03\x04", b"PK\x05\x06")
_JSON_STARTS: Final = frozenset(b'{["-0123456789tfn')
_JSON_WHITESPACE: Final = frozenset(b" \t\r\n")


class FormatMismatch(ValueError):
    """The bytes are not in the format the job asked for."""


class FormatCheck:
    """Feed a result's bytes in order; raises FormatMismatch as soon as they cannot fit."""

    def __init__(self, output_format: str) -> None:
        if output_format not in MEDIA_TYPES:
            raise ValueError(f"unknown output format {output_format!r}")
        self._format = output_format
        self._utf8 = (
            codecs.getincrementaldecoder("utf-8")() if output_format in ("json", "text") else None
        )
        self._head = b""
        self._json: bytearray | None = bytearray() if output_format == "json" else None
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        """Check the next piece of the result."""
        self._size += len(chunk)
        if self._utf8 is not None:
            try:
                self._utf8.decode(chunk)
            except UnicodeDecodeError as error:
                raise FormatMismatch(
                    f"a {self._format} result must be UTF-8 text; byte "
                    f"{self._size - len(chunk) + error.start} is not"
                ) from None
        if len(self._head) < 4:
            self._head += chunk[: 4 - len(self._head)]
        if self._json is not None:
            if len(self._json) + len(chunk) <= JSON_PARSE_LIMIT:
                self._json += chunk
            else:
                self._check_json_start(bytes(self._json) + chunk)
                self._json = None  # too large to parse whole: checked for UTF-8 only

    def finish(self) -> None:
        """Check what can only be checked at the end."""
        if self._utf8 is not None:
            try:
                self._utf8.decode(b"", final=True)
            except UnicodeDecodeError:
                raise FormatMismatch(
                    f"a {self._format} result must be UTF-8 text; it ends mid-character"
                ) from None
        if self._format == "archive" and self._head not in _ZIP_SIGNATURES:
            raise FormatMismatch("an archive result must be a zip file; this one is not")
        if self._format == "json" and self._json is not None:
            try:
                msgspec.json.decode(bytes(self._json))
            except msgspec.DecodeError as error:
                raise FormatMismatch(f"a json result must be valid JSON: {error}") from None

    def _check_json_start(self, data: bytes) -> None:
        first = next((byte for byte in data if byte not in _JSON_WHITESPACE), None)
        if first is not None and first not in _JSON_STARTS:
            raise FormatMismatch("a json result must be valid JSON; this one does not start so")


def check_bytes(data: bytes, output_format: str) -> None:
    """Check a whole result held in memory (an inline one)."""
    check = FormatCheck(output_format)
    check.feed(data)
    check.finish()


async def checked(chunks: AsyncIterable[bytes], output_format: str) -> AsyncIterator[bytes]:
    """Pass chunks through, raising FormatMismatch (which aborts the store) on bad content."""
    check = FormatCheck(output_format)
    async for chunk in chunks:
        check.feed(chunk)
        yield chunk
    check.finish()
