"""Local files for the SDK: upload sources read in chunks, downloads kept aside until verified."""

from __future__ import annotations

import mimetypes
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# (bytes done, total bytes or None when unknown)
Progress = Callable[[int, int | None], None]


def guess_content_type(name: str | None) -> str:
    """The media type a file name suggests; application/octet-stream when it says nothing."""
    guessed = mimetypes.guess_type(name)[0] if name else None
    return guessed or "application/octet-stream"


def byte_chunks(data: bytes, chunk_bytes: int, progress: Progress | None) -> Iterator[bytes]:
    """`data` in chunks, reporting progress as each is handed over."""
    view = memoryview(data)
    for start in range(0, len(data), chunk_bytes):
        chunk = bytes(view[start : start + chunk_bytes])
        yield chunk
        if progress is not None:
            progress(start + len(chunk), len(data))


def file_chunks(
    path: Path, size: int, chunk_bytes: int, progress: Progress | None
) -> Iterator[bytes]:
    """A file's bytes in chunks, never all in memory, reporting progress as each is handed over."""
    sent = 0
    with path.open("rb") as file:
        while chunk := file.read(chunk_bytes):
            sent += len(chunk)
            yield chunk
            if progress is not None:
                progress(sent, size)


class PartialFile:
    """A download in progress: a hidden temp file beside its target, renamed in only when done."""

    def __init__(self, target: Path) -> None:
        self.target = target
        descriptor, name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".part"
        )
        self.path = Path(name)
        self._file = os.fdopen(descriptor, "wb")
        self._done = False

    def write(self, data: bytes) -> None:
        """Append bytes."""
        self._file.write(data)

    def restart(self) -> None:
        """Drop what was written: the server sends the whole body again."""
        self._file.seek(0)
        self._file.truncate()

    def commit(self) -> None:
        """Make the bytes durable and move them to the target in one step."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.path, self.target)
        self._done = True

    def discard(self) -> None:
        """Remove the temp file unless it was committed; safe to call more than once."""
        if self._done:
            return
        self._file.close()
        self.path.unlink(missing_ok=True)
        self._done = True
