"""Log lines: one JSON object each, with the request, job and miner ids of their context."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest

from app.config import ConfigError, Settings
from app.logs import (
    ContextIds,
    JsonFormatter,
    TextFormatter,
    bind_log_ids,
    configure_logging,
    current_ids,
    log_context,
)


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    """A record as `logger.info(message, *args, extra=extra)` makes it, stamped with the ids."""
    made = logging.getLogger("jobledger.test").makeRecord(
        "jobledger.test", logging.INFO, __file__, 1, message, args, None, extra=extra or None
    )
    ContextIds().filter(made)
    return made


def test_a_line_is_one_json_object_with_time_level_logger_and_message() -> None:
    line = JsonFormatter().format(record("job %s done\nsecond line", "job_1"))
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed == {
        "time": parsed["time"],
        "level": "INFO",
        "logger": "jobledger.test",
        "message": "job job_1 done\nsecond line",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", parsed["time"])


def test_ids_come_from_the_context_and_from_extra() -> None:
    with log_context(request_id="req-1", miner_id="miner_a"):
        assert current_ids() == {"request_id": "req-1", "miner_id": "miner_a"}
        parsed = json.loads(JsonFormatter().format(record("hello", job_id="job_9")))
        with log_context(miner_id="miner_b"):
            inner = json.loads(JsonFormatter().format(record("inner")))
    assert (parsed["request_id"], parsed["job_id"], parsed["miner_id"]) == (
        "req-1",
        "job_9",
        "miner_a",
    )
    assert inner["miner_id"] == "miner_b"
    assert current_ids() == {}  # restored on the way out
    assert "request_id" not in json.loads(JsonFormatter().format(record("after")))


def test_an_exception_is_one_string_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        made = logging.getLogger("t").makeRecord(
            "t", logging.ERROR, __file__, 1, "failed", (), __import__("sys").exc_info()
        )
    parsed = json.loads(JsonFormatter().format(made))
    assert parsed["level"] == "ERROR"
    assert parsed["exc_info"].startswith("Traceback (most recent call last):")
    assert parsed["exc_info"].endswith("ValueError: boom")


async def test_ids_bound_in_a_task_stay_in_that_task() -> None:
    async def request(request_id: str) -> dict[str, str]:
        bind_log_ids(request_id=request_id, job_id=f"job_{request_id}")
        await asyncio.sleep(0)
        return current_ids()

    first, second = await asyncio.gather(request("a"), request("b"))
    assert first == {"request_id": "a", "job_id": "job_a"}
    assert second == {"request_id": "b", "job_id": "job_b"}
    assert current_ids() == {}


def test_the_text_format_appends_the_ids() -> None:
    with log_context(request_id="req-2"):
        line = TextFormatter().format(record("submitted", job_id="job_3"))
    assert line.endswith("INFO jobledger.test: submitted [request_id=req-2 job_id=job_3]")


def test_configure_logging_routes_everything_through_one_handler(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("json", logging.WARNING)
        assert len(root.handlers) == 1 and root.level == logging.WARNING
        logging.getLogger("uvicorn.error").warning("from uvicorn")
        logging.getLogger("jobledger.x").info("quiet for terminal commands")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        assert [(line["logger"], line["message"]) for line in lines] == [
            ("uvicorn.error", "from uvicorn")
        ]
    finally:
        root.handlers[:], root.level = saved[0], saved[1]


def test_the_log_format_setting() -> None:
    assert Settings.from_env({}).log_format == "json"
    assert Settings.from_env({"JOBLEDGER_LOG_FORMAT": "TEXT"}).log_format == "text"
    with pytest.raises(ConfigError, match="JOBLEDGER_LOG_FORMAT"):
        Settings.from_env({"JOBLEDGER_LOG_FORMAT": "xml"})
