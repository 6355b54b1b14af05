"""The SDK's sans-IO core: SSE parsing, watch resumption, retries, errors, config, downloads."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import warnings
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import core, errors
from app.client.config import ClientConfig, InsecureConfigWarning, resolve_config
from app.client.core import (
    ClientCore,
    DownloadSession,
    RetryPolicy,
    SseMessage,
    SseParser,
    WatchSession,
)

NO_JITTER = RetryPolicy(jitter=lambda: 0.0)
CORE = ClientCore(
    ClientConfig(url="http://ledger.test", api_key="jl_k", key_source="test"), NO_JITTER
)


def feed_in_pieces(stream: bytes, size: int) -> tuple[list[SseMessage], SseParser]:
    parser = SseParser()
    found: list[SseMessage] = []
    for start in range(0, len(stream), size):
        found += parser.feed(stream[start : start + size])
    return found + parser.close(), parser


# ---- SSE parsing ------------------------------------------------------------------------

STREAM = (
    "\ufeffretry: 2000\n\n"
    ": keepalive\n\n"
    'id: 1\nevent: job\ndata: {"a": "é→"}\n\n'
    "id: 2\r\nevent: job\r\ndata: line one\r\ndata: line two\r\n\r\n"
    "data:no space\rid: 3\r\r"
    "event: end\ndata: {}\n\n"
).encode()


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(STREAM)])
def test_sse_messages_are_the_same_however_the_stream_is_split(size: int) -> None:
    # Size 1 splits every CRLF and the multi-byte characters of the first message too.
    found, parser = feed_in_pieces(STREAM, size)
    assert found == [
        SseMessage(event="job", data='{"a": "é→"}', id="1"),
        SseMessage(event="job", data="line one\nline two", id="2"),
        SseMessage(event="message", data="no space", id="3"),
        SseMessage(event="end", data="{}", id="3"),
    ]
    assert parser.retry_ms == 2000


def test_a_message_cut_off_by_the_end_of_the_stream_is_dropped() -> None:
    found, _ = feed_in_pieces(b"id: 1\nevent: job\ndata: {}\n\nid: 2\nevent: job\ndata: {", 5)
    assert [m.id for m in found] == ["1"]


def test_blocks_without_data_dispatch_nothing_and_unknown_fields_are_ignored() -> None:
    found, parser = feed_in_pieces(b"event: job\n\nfoo: bar\nretry: soon\ndata: x\n\n", 4)
    assert found == [SseMessage(event="message", data="x", id=None)]
    assert parser.retry_ms is None


# ---- watching ---------------------------------------------------------------------------


def job_body(status: str = "running", progress: int = 0) -> dict[str, Any]:
    return {
        "job_id": "job_1",
        "status": status,
        "progress": progress,
        "miner_id": None,
        "created_at": "2026-11-29T10:15:06Z",
        "started_at": None,
        "completed_at": None,
        "result": None,
        "model": "echo",
        "priority": "normal",
        "attempt": 1,
        "estimated_cost": 0.05,
        "cost": None,
        "error": None,
        "a_field_from_the_future": {"ignored": True},
    }


def frame(sequence: int, status: str = "running", progress: int = 0) -> bytes:
    data = {
        "sequence": sequence,
        "type": "JobProgressReported",
        "timestamp": "2026-11-29T10:15:07Z",
        "job": job_body(status, progress),
    }
    return f"id: {sequence}\nevent: job\ndata: {json.dumps(data)}\n\n".encode()


def test_a_watch_resumes_after_the_last_sequence_and_drops_repeats() -> None:
    session = WatchSession(CORE, "job_1", last_event_id=None)
    assert "Last-Event-ID" not in session.request_headers()
    session.connected()
    stream = b"retry: 50\n\n" + frame(1) + frame(2)
    updates = session.feed(stream[:-5]) + session.feed(stream[-5:])
    assert [u.sequence for u in updates] == [1, 2]
    assert updates[1].job.estimated_cost == Decimal("0.05")
    assert session.stream_closed() == [] and not session.ended
    assert session.request_headers()["Last-Event-ID"] == "2"
    assert session.reconnect_delay(httpx.ReadError("dropped")) == 0.05  # the server's retry

    session.connected()  # a server that repeats itself: 2 is dropped, 3 is new
    updates = session.feed(frame(2) + frame(3, "completed", 100))
    assert [u.sequence for u in updates] == [3]
    assert session.final_status == "completed" and not session.ended
    session.feed(b'event: end\ndata: {"status": "completed"}\n\n')
    assert session.ended


def test_a_watch_that_saw_the_job_end_is_over_even_if_end_was_lost() -> None:
    session = WatchSession(CORE, "job_1", last_event_id=4)
    assert session.request_headers()["Last-Event-ID"] == "4"
    session.connected()
    session.feed(frame(5, "failed") + b'event: end\ndata: {"sta')
    session.stream_closed()
    assert session.ended and session.final_status == "failed"


def test_reconnect_delays_grow_capped_and_give_up_after_max_retries() -> None:
    policy = RetryPolicy(max_retries=3, backoff_first=1.0, backoff_max=3.0)
    session = WatchSession(ClientCore(CORE.config, policy), "job_1", None)
    assert [session.reconnect_delay(None) for _ in range(3)] == [1.0, 2.0, 3.0]
    with pytest.raises(errors.ConnectionFailed, match="kept closing"):
        session.reconnect_delay(None)


def test_an_unreadable_watch_message_is_an_invalid_response() -> None:
    session = WatchSession(CORE, "job_1", None)
    with pytest.raises(errors.InvalidResponse):
        session.feed(b'event: job\ndata: {"sequence": "x"}\n\n')
    with pytest.raises(ValueError, match=">= 0"):
        WatchSession(CORE, "job_1", -1)


# ---- retries ----------------------------------------------------------------------------


def test_rate_limits_and_unavailability_are_retried_honouring_retry_after() -> None:
    policy = RetryPolicy(max_retries=3, max_retry_after=30, jitter=lambda: 0.0)
    assert policy.after_status(0, 429, "7", idempotent=False) == 7.0
    assert policy.after_status(0, 503, None, idempotent=False) == 0.25
    assert policy.after_status(0, 429, "120", idempotent=True) is None  # longer than we wait
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    assert 15 < (policy.after_status(1, 429, when, idempotent=True) or 0) <= 20
    assert policy.after_status(3, 429, "1", idempotent=True) is None  # out of retries


def test_gateway_errors_are_retried_only_when_sending_again_is_safe() -> None:
    assert NO_JITTER.after_status(0, 502, None, idempotent=True) == 0.25
    assert NO_JITTER.after_status(0, 504, None, idempotent=False) is None
    for status in (400, 401, 404, 409, 422, 500):
        assert NO_JITTER.after_status(0, status, None, idempotent=True) is None


def test_transport_errors_are_retried_unless_a_non_idempotent_request_may_have_arrived() -> None:
    refused = httpx.ConnectError("refused")
    dropped = httpx.ReadError("reset")
    assert NO_JITTER.after_transport_error(0, refused, idempotent=False) == 0.25
    assert NO_JITTER.after_transport_error(0, dropped, idempotent=False) is None
    assert NO_JITTER.after_transport_error(2, dropped, idempotent=True) == 1.0
    assert NO_JITTER.after_transport_error(3, refused, idempotent=True) is None
    assert NO_JITTER.after_transport_error(0, httpx.UnsupportedProtocol("ftp"), True) is None


def test_backoff_is_exponential_capped_and_jittered_within_bounds() -> None:
    high = RetryPolicy(backoff_first=1.0, backoff_max=5.0, jitter=lambda: 1.0)
    low = RetryPolicy(backoff_first=1.0, backoff_max=5.0, jitter=lambda: 0.0)
    assert [high.backoff(n) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert [low.backoff(n) for n in range(5)] == [0.5, 1.0, 2.0, 2.5, 2.5]


# ---- errors -----------------------------------------------------------------------------


def error_body(status: int, message: str = "nope", details: Any = None) -> bytes:
    return json.dumps(
        {"error": {"status": status, "message": message, "details": details}}
    ).encode()


@pytest.mark.parametrize(
    ("status", "kind", "exit_code"),
    [
        (400, errors.BadRequest, 2),
        (413, errors.BadRequest, 2),
        (422, errors.ValidationError, 2),
        (401, errors.Unauthorized, 4),
        (403, errors.Forbidden, 4),
        (404, errors.NotFound, 5),
        (410, errors.Gone, 5),
        (409, errors.Conflict, 6),
        (429, errors.RateLimited, 7),
        (500, errors.ServerError, 3),
        (503, errors.ServerError, 3),
        (418, errors.ApiError, 2),
    ],
)
def test_each_status_maps_to_its_error_and_exit_code(
    status: int, kind: type[errors.ApiError], exit_code: int
) -> None:
    error = CORE.error(status, {}, error_body(status, "the API says", {"job_id": "job_1"}), 2)
    assert type(error) is kind and error.exit_code == exit_code
    assert (error.status, error.message, error.details, error.attempts) == (
        status,
        "the API says",
        {"job_id": "job_1"},
        2,
    )


def test_error_hints_say_what_to_do() -> None:
    invalid = {"errors": [{"field": "timeout_seconds", "message": "Expected `int` >= 1"}]}
    assert "fix timeout_seconds" in CORE.error(422, {}, error_body(422, details=invalid)).hint
    limited = CORE.error(429, {"retry-after": "42"}, error_body(429))
    assert isinstance(limited, errors.RateLimited) and limited.retry_after == 42.0
    assert "42 s" in limited.hint

    keyless = ClientCore(ClientConfig(url="http://x", api_key=None), NO_JITTER)
    assert "JOBLEDGER_API_KEY" in keyless.error(401, {}, error_body(401)).hint
    assert "refused" in CORE.error(401, {}, error_body(401)).hint
    failed = CORE.connection_failed(httpx.ConnectError("[Errno 111] Connection refused"))
    assert failed.exit_code == 3 and "scripts/serve" in failed.hint
    assert "http://ledger.test" in failed.message and "Connection refused" in failed.message


def test_an_error_without_a_json_body_still_says_what_happened() -> None:
    error = CORE.error(502, {}, b"<html>Bad Gateway</html>")
    assert isinstance(error, errors.ServerError)
    assert error.message == "HTTP 502 Bad Gateway: <html>Bad Gateway</html>"


def test_answers_are_decoded_ignoring_unknown_fields_and_garbage_is_invalid() -> None:
    call = core.status_call("job_1")
    job = CORE.answer(call, 200, {}, json.dumps(job_body()).encode(), 1)
    assert job.job_id == "job_1" and job.estimated_cost == Decimal("0.05")
    with pytest.raises(errors.InvalidResponse, match="cannot read"):
        CORE.answer(call, 200, {}, b"<html>", 1)
    with pytest.raises(errors.NotFound):
        CORE.answer(call, 404, {}, error_body(404), 1)


# ---- requests ---------------------------------------------------------------------------


def submit(**overrides: Any) -> core.Call[Any]:
    arguments: dict[str, Any] = {
        "output_destination": "local",
        "output_format": "json",
        "gpu_type": "v100",
        "gpu_count": 1,
        "min_vram_gb": 16,
        "priority": "normal",
        "timeout_seconds": 3600,
        "idempotency_key": None,
    } | overrides
    return core.submit_call("gpt2", "Hello, GPU", **arguments)


def test_a_submission_always_carries_an_idempotency_key_and_the_seed_body() -> None:
    first, second = submit(), submit()
    assert first.headers["Idempotency-Key"] != second.headers["Idempotency-Key"]
    assert submit(idempotency_key="mine").headers["Idempotency-Key"] == "mine"
    assert json.loads(first.body or b"") == {
        "model": "gpt2",
        "input": "Hello, GPU",
        "requirements": {"gpu_type": "v100", "gpu_count": 1, "min_vram_gb": 16},
        "output_config": {"destination": "local", "format": "json"},
        "priority": "normal",
        "timeout_seconds": 3600,
    }
    assert first.idempotent and not core.upload_call(3, "a.txt", "text/plain").idempotent


def test_job_ids_cannot_escape_their_path_segment() -> None:
    assert core.status_call("../admin/keys").path == "/v1/jobs/..%2Fadmin%2Fkeys"
    with pytest.raises(ValueError, match="job id"):
        core.cancel_call(" ")


# ---- downloads --------------------------------------------------------------------------


def digest_headers(data: bytes, **extra: str) -> dict[str, str]:
    digest = hashlib.sha256(data)
    b64 = base64.b64encode(digest.digest()).decode()
    return {
        "etag": f'"{digest.hexdigest()}"',
        "digest": f"sha-256={b64}",
        "repr-digest": f"sha-256=:{b64}:",
        "content-length": str(len(data)),
        "content-disposition": 'attachment; filename="job_1.json"',
    } | extra


def test_a_download_resumes_with_if_range_and_verifies_the_whole() -> None:
    data = b"0123456789" * 10
    session = DownloadSession(CORE, "job_1")
    assert "Range" not in session.request_headers()
    assert session.started(200, digest_headers(data)) is False
    assert session.filename == "job_1.json"
    session.feed(data[:40])
    resume = session.request_headers()
    assert resume["Range"] == "bytes=40-" and resume["If-Range"] == digest_headers(data)["etag"]
    session.started(206, {"content-range": f"bytes 40-99/{len(data)}"})
    session.feed(data[40:])
    result = session.verified(Path("out"))
    assert (result.size_bytes, result.sha256) == (100, hashlib.sha256(data).hexdigest())


def test_a_changed_resumption_or_changed_bytes_are_refused() -> None:
    data = b"x" * 10
    session = DownloadSession(CORE, "job_1")
    session.started(200, digest_headers(data))
    session.feed(b"x" * 4)
    with pytest.raises(errors.InvalidResponse, match="wrong place"):
        session.started(206, {"content-range": "bytes 5-9/10"})
    assert session.started(200, digest_headers(data)) is True  # the whole body again
    session.feed(b"y" * 10)
    with pytest.raises(errors.IntegrityError) as mismatch:
        session.verified(Path("out"))
    assert mismatch.value.exit_code == 8 and mismatch.value.expected != mismatch.value.actual


def test_a_download_without_or_with_disagreeing_digests_cannot_be_verified() -> None:
    session = DownloadSession(CORE, "job_1")
    with pytest.raises(errors.IntegrityError, match="without a sha256"):
        session.started(200, {"content-length": "3"})
    other = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    with pytest.raises(errors.IntegrityError, match="different sha256"):
        session.started(200, digest_headers(b"abc", digest=f"sha-256={other}"))


# ---- configuration ----------------------------------------------------------------------


def write_profiles(path: Path, mode: int = 0o600) -> Path:
    path.write_text(
        '[profiles.default]\nurl = "http://default:1"\napi_key = "jl_default"\n\n'
        '[profiles.staging]\nurl = "http://staging:2"\napi_key = "jl_staging"\n'
    )
    path.chmod(mode)
    return path


def test_arguments_beat_the_environment_which_beats_the_profile(tmp_path: Path) -> None:
    env = {"JOBLEDGER_CONFIG": str(write_profiles(tmp_path / "c.toml"))}
    assert resolve_config(env).url == "http://default:1"
    assert resolve_config(env).api_key == "jl_default"
    env |= {"JOBLEDGER_URL": "http://env:3/", "JOBLEDGER_API_KEY": "jl_env"}
    from_env = resolve_config(env)
    assert (from_env.url, from_env.api_key, from_env.key_source) == (
        "http://env:3",
        "jl_env",
        "JOBLEDGER_API_KEY",
    )
    explicit = resolve_config(env, url="http://arg:4", api_key="jl_arg", profile="staging")
    assert (explicit.url, explicit.api_key) == ("http://arg:4", "jl_arg")
    assert resolve_config({**env, "JOBLEDGER_API_KEY": ""}, profile="staging").api_key == (
        "jl_staging"
    )


def test_the_profile_comes_from_the_argument_then_jobledger_profile_then_default(
    tmp_path: Path,
) -> None:
    env = {"JOBLEDGER_CONFIG": str(write_profiles(tmp_path / "c.toml"))}
    assert resolve_config(env | {"JOBLEDGER_PROFILE": "staging"}).url == "http://staging:2"
    assert resolve_config(env | {"JOBLEDGER_PROFILE": "staging"}, profile="default").url == (
        "http://default:1"
    )
    with pytest.raises(errors.ConfigError, match=r"no profile 'prod'.*default, staging"):
        resolve_config(env, profile="prod")


def test_without_a_config_file_the_defaults_apply(tmp_path: Path) -> None:
    config = resolve_config({"XDG_CONFIG_HOME": str(tmp_path)})
    assert (config.url, config.api_key, config.key_source) == ("http://127.0.0.1:8000", None, None)
    (tmp_path / "jobledger").mkdir()
    write_profiles(tmp_path / "jobledger" / "config.toml")
    assert resolve_config({}, home=tmp_path.parent / "nowhere").api_key is None
    assert resolve_config({"XDG_CONFIG_HOME": str(tmp_path)}).api_key == "jl_default"


def test_a_readable_key_file_is_warned_about_and_bad_toml_is_an_error(tmp_path: Path) -> None:
    env = {"JOBLEDGER_CONFIG": str(write_profiles(tmp_path / "c.toml", mode=0o644))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolve_config(env)
    assert [w.category for w in caught] == [InsecureConfigWarning]
    assert "chmod 600" in str(caught[0].message)
    os.chmod(env["JOBLEDGER_CONFIG"], 0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_config(env)
    (tmp_path / "c.toml").write_text("[profiles.default\n")
    with pytest.raises(errors.ConfigError, match="not valid TOML"):
        resolve_config(env)


def test_a_url_that_is_not_http_is_refused_where_it_was_given(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="JOBLEDGER_URL must be an http"):
        resolve_config({"JOBLEDGER_URL": "localhost:8000", "XDG_CONFIG_HOME": str(tmp_path)})
    with pytest.raises(errors.ConfigError, match="--url"):
        resolve_config({}, url="ftp://ledger", home=tmp_path)
