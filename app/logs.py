"""Process logging: one JSON object per line (or plain text), carrying request, job and miner ids.

The ids come from context variables: the HTTP layer binds `request_id` for each request
(app/api/observability.py), and the code working on one job or miner binds `job_id` /
`miner_id` (`log_context`, `bind_log_ids`). A record's own `extra={"job_id": ...}` wins
over the context. Context variables follow asyncio tasks and anyio worker threads, so a
ledger call made for a request logs with that request's id.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["json", "text"]
LOG_FORMATS: tuple[str, ...] = ("json", "text")
# The ids a log line may carry, in the order they are written.
ID_FIELDS = ("request_id", "job_id", "miner_id")

_request_id: ContextVar[str | None] = ContextVar("jobledger_request_id", default=None)
_job_id: ContextVar[str | None] = ContextVar("jobledger_job_id", default=None)
_miner_id: ContextVar[str | None] = ContextVar("jobledger_miner_id", default=None)
_VARS = {"request_id": _request_id, "job_id": _job_id, "miner_id": _miner_id}


def current_ids() -> dict[str, str]:
    """The ids bound in the current context (only those that are set)."""
    return {name: value for name, var in _VARS.items() if (value := var.get()) is not None}


def bind_log_ids(
    *, request_id: str | None = None, job_id: str | None = None, miner_id: str | None = None
) -> None:
    """Bind ids for the rest of the current task (a request's, or a job's own task).

    Each asyncio task has its own copy of the context, so this never leaks into other
    requests; None leaves an id as it is.
    """
    for name, value in (("request_id", request_id), ("job_id", job_id), ("miner_id", miner_id)):
        if value is not None:
            _VARS[name].set(value)


@contextlib.contextmanager
def log_context(
    *, request_id: str | None = None, job_id: str | None = None, miner_id: str | None = None
) -> Iterator[None]:
    """Bind ids for the lines logged inside the block, then restore the previous ones."""
    tokens = [
        (_VARS[name], _VARS[name].set(value))
        for name, value in (("request_id", request_id), ("job_id", job_id), ("miner_id", miner_id))
        if value is not None
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextIds(logging.Filter):
    """Stamps each record with the ids of the context it was logged in (unless it has its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Add request_id, job_id and miner_id attributes where the record lacks them."""
        for name, var in _VARS.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        return True


def rfc3339(created: float) -> str:
    """A record's time as RFC 3339 UTC with milliseconds: 2026-11-29T10:14:53.067Z."""
    seconds = int(created)
    return f"{_second(seconds)}.{int((created - seconds) * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    """The date and time of a whole second (records come many per second: formatted once)."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the ids, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as a single line of JSON (newlines inside values are escaped)."""
        line: dict[str, str] = {
            "time": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ID_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = str(value)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic `time LEVEL logger: message` line, with the ids appended when known."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The message line, then ` [request_id=… job_id=…]` for the ids the record carries."""
        text = super().formatMessage(record)
        ids = [f"{name}={value}" for name in ID_FIELDS if (value := getattr(record, name, None))]
        return f"{text} [{' '.join(ids)}]" if ids else text


def configure_logging(log_format: LogFormat, level: int = logging.INFO) -> None:
    """Send every logger (uvicorn's too) to stderr in `log_format`; called once per process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(ContextIds())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn's loggers (started with log_config=None) propagate here instead of printing.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # One line per HTTP request of the miner agent (and the client CLI) is noise.
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
