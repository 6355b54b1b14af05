"""The domain's error hierarchy; app/api/errors.py maps each class to one HTTP status."""

from __future__ import annotations


class DomainError(Exception):
    """Base class: a command the domain refuses, with a message a user can act on."""

    def __init__(self, message: str, *, details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidJobRequest(DomainError):
    """A submission names something the ledger cannot price or run (HTTP 422)."""


class NotFound(DomainError):
    """The thing named does not exist, or not for this caller (HTTP 404)."""


class JobNotFound(NotFound):
    """No job with that id exists for the caller."""


class MinerNotFound(NotFound):
    """No miner with that id exists."""


class ReceiptKeyNotFound(NotFound):
    """The miner never registered a receipt key with that id."""


class Conflict(DomainError):
    """The command is well formed but clashes with the current state (HTTP 409)."""


class InvalidTransition(Conflict):
    """The job's state machine does not allow this command in the job's current status."""

    def __init__(self, job_id: str, status: str, command: str) -> None:
        super().__init__(
            f"cannot {command} job {job_id}: it is {status}",
            details={"job_id": job_id, "status": status, "command": command},
        )
        self.status = status
        self.command = command


class ConcurrentChange(Conflict):
    """Other writers kept changing the aggregate while the command retried; try again later."""


class StaleAttempt(Conflict):
    """A report or command names an attempt that is no longer the job's current one."""


class IdempotencyConflict(Conflict):
    """An Idempotency-Key was reused with a different request body."""


class FileNotFound(NotFound):
    """No uploaded file with that id exists for the caller."""


class FileInUse(Conflict):
    """The file is the input of a job, so it is kept."""
