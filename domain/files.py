"""The File aggregate: an input a client uploaded, named by its owner and its content.

A file's id is derived from (owner, sha256), so uploading the same bytes twice gives
the same file, stored once. Files are kept forever once a job used them: the job's
record names those bytes, and an auditor must be able to fetch what went in.
"""

from __future__ import annotations

import re
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.errors import Conflict, FileInUse, FileNotFound

FILE_ID_PREFIX = "file_"
_FILE_ID = re.compile(r"file_[0-9a-f]{32}")
# Namespace for ids derived from (owner, sha256): equal bytes, equal file.
_FILE_IDS = UUID("0d8e5a52-3f4b-4c8e-9d1a-7b6c5e4f3a21")


def file_id_of(aggregate_id: UUID) -> str:
    """The public id of a file: 'file_' and the aggregate UUID in hex."""
    return FILE_ID_PREFIX + aggregate_id.hex


def is_file_id(text: str) -> bool:
    """True if `text` has the shape of a file id (a job input naming an upload)."""
    return _FILE_ID.fullmatch(text) is not None


def file_aggregate_id_of(file_id: str) -> UUID:
    """The aggregate UUID behind a public file id; malformed ids are simply not found."""
    if not is_file_id(file_id):
        raise FileNotFound(f"file {file_id!r} not found", details={"file_id": file_id})
    return UUID(hex=file_id.removeprefix(FILE_ID_PREFIX))


def file_aggregate_id(owner: str, sha256: str) -> UUID:
    """The one aggregate id an owner's upload of these bytes can have."""
    return uuid5(_FILE_IDS, f"{owner}\x00{sha256}")


class File(Aggregate):
    """An uploaded input: where its bytes are, and whether a job depends on it."""

    class Uploaded(Aggregate.Created):
        owner: str
        sha256: str
        size_bytes: int
        content_type: str
        filename: str | None
        # Where the bytes are (a blob location, e.g. "local:files/ab/<upload id>").
        location: str

    class Event(Aggregate.Event):
        pass

    class Deleted(Event):
        """The owner deleted the file before any job used it; its bytes are removed."""

        def apply(self, aggregate: File) -> None:
            aggregate.deleted = True

    class Restored(Event):
        """The same bytes were uploaded again after a deletion."""

        location: str
        content_type: str
        filename: str | None

        def apply(self, aggregate: File) -> None:
            aggregate.deleted = False
            aggregate.location = self.location
            aggregate.content_type = self.content_type
            aggregate.filename = self.filename

    class Used(Event):
        """The first job to take the file as input; from then on it is kept."""

        job_id: str

        def apply(self, aggregate: File) -> None:
            aggregate.used_by = self.job_id

    def __init__(
        self,
        *,
        owner: str,
        sha256: str,
        size_bytes: int,
        content_type: str,
        filename: str | None,
        location: str,
    ) -> None:
        self.owner = owner
        self.sha256 = sha256
        self.size_bytes = size_bytes
        self.content_type = content_type
        self.filename = filename
        self.location = location
        self.deleted = False
        self.used_by: str | None = None

    @classmethod
    def upload(
        cls,
        *,
        owner: str,
        sha256: str,
        size_bytes: int,
        content_type: str,
        filename: str | None,
        location: str,
    ) -> File:
        """A new file whose bytes are already durable at `location`."""
        return cls._create(
            cls.Uploaded,
            id=file_aggregate_id(owner, sha256),
            owner=owner,
            sha256=sha256,
            size_bytes=size_bytes,
            content_type=content_type,
            filename=filename,
            location=location,
        )

    @property
    def file_id(self) -> str:
        """The public id clients see."""
        return file_id_of(self.id)

    def restore(self, *, location: str, content_type: str, filename: str | None) -> None:
        """Bring a deleted file back with freshly uploaded bytes."""
        if not self.deleted:
            raise Conflict(f"file {self.file_id} exists", details={"file_id": self.file_id})
        self.trigger_event(
            self.Restored, location=location, content_type=content_type, filename=filename
        )

    def use(self, job_id: str) -> None:
        """Note a job taking the file as input; only the first use is recorded."""
        self.require_present()
        if self.used_by is None:
            self.trigger_event(self.Used, job_id=job_id)

    def delete(self) -> None:
        """Delete the file, unless a job uses it."""
        self.require_present()
        if self.used_by is not None:
            raise FileInUse(
                f"file {self.file_id} is the input of job {self.used_by} (and perhaps others), "
                "so it is kept",
                details={"file_id": self.file_id, "used_by": self.used_by},
            )
        self.trigger_event(self.Deleted)

    def require_present(self) -> None:
        """Refuse to act on a deleted file as if it did not exist."""
        if self.deleted:
            raise FileNotFound(
                f"file {self.file_id} was deleted", details={"file_id": self.file_id}
            )
