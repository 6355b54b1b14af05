"""What the SDK raises: API answers by status, plus unreachable APIs and corrupted downloads.

Every error has a `hint` saying what to do about it and the `exit_code` the
`jobledger jobs` command line exits with (docs/clients.md has the table).
"""

from __future__ import annotations

from typing import Any


class JobledgerError(Exception):
    """Anything the jobledger SDK raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.message = message
        self.hint = hint


class ConfigError(JobledgerError):
    """The client's configuration (arguments, environment, profile file) is unusable."""

    exit_code = 2


class ApiError(JobledgerError):
    """The API answered with an error: its status and the `{"error": {...}}` body it sent."""

    exit_code = 2

    def __init__(
        self, status: int, message: str, details: Any = None, hint: str = "", attempts: int = 1
    ) -> None:
        super().__init__(message, hint)
        self.status = status
        self.details = details
        # How many times the request was sent: > 1 when an earlier try was retried.
        self.attempts = attempts


class BadRequest(ApiError):
    """400 or 413: the request is malformed or too large."""


class ValidationError(BadRequest):
    """422: the request is well-formed but a field is invalid (`details.errors` names it)."""


class Unauthorized(ApiError):
    """401: no API key, or one the API does not know (mistyped or revoked)."""

    exit_code = 4


class Forbidden(ApiError):
    """403: the key is valid but its role may not do this."""

    exit_code = 4


class NotFound(ApiError):
    """404: no such job or file, or it belongs to another client."""

    exit_code = 5


class Gone(NotFound):
    """410: the stored bytes were removed since the ledger recorded them."""


class Conflict(ApiError):
    """409: the job's state forbids it (cancel a finished job, download before a result)."""

    exit_code = 6


class RateLimited(ApiError):
    """429 after the retries allowed: `retry_after` says how many seconds to wait."""

    exit_code = 7

    def __init__(
        self,
        status: int,
        message: str,
        details: Any = None,
        hint: str = "",
        attempts: int = 1,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, message, details, hint, attempts)
        self.retry_after = retry_after


class ServerError(ApiError):
    """5xx after the retries allowed: the API (or a proxy before it) could not answer."""

    exit_code = 3


class ConnectionFailed(JobledgerError):
    """The API could not be reached (refused, timed out, dropped) after the retries allowed."""

    exit_code = 3

    def __init__(self, url: str, reason: str, hint: str = "") -> None:
        super().__init__(f"cannot reach the jobledger API at {url}: {reason}", hint)
        self.url = url
        self.reason = reason


class InvalidResponse(JobledgerError):
    """The API answered 2xx with a body this client cannot read (a proxy, or another server)."""

    exit_code = 3


class IntegrityError(JobledgerError):
    """Downloaded bytes do not match the sha256 the API announced; nothing was kept."""

    exit_code = 8

    def __init__(self, message: str, expected: str | None, actual: str | None) -> None:
        super().__init__(
            message, "nothing was saved; download again, and if it persists tell the operator"
        )
        self.expected = expected
        self.actual = actual


class WaitTimeout(JobledgerError, TimeoutError):
    """`wait` gave up before the job ended; the job itself goes on."""

    exit_code = 1
