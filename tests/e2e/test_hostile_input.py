"""Hostile input against a served ledger: a prompt 4xx with the error body, never a 500.

Oversize bodies on every JSON route, absurd paging values, deeply nested JSON,
injection-shaped and control characters (kept verbatim or refused, never mangled),
SSRF-shaped output destinations, and path traversal in every id of every route.
It extends test_errors.py, test_files.py and test_paging_and_history.py where they stop.
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import psycopg
import pytest

from app.api import openapi
from app.receipts import decode_public_key, key_id_of
from tests.e2e.conftest import SEED_JOB, Served
from tests.e2e.dispatch import register_miner, submit
from tests.e2e.fake_miner import hold
from tests.e2e.test_errors import assert_error

pytestmark = pytest.mark.e2e

ONE_MIB = 1024 * 1024
JSON = {"content-type": "application/json"}
# No miner offers this GPU type, so the test holds such jobs itself.
FAKE_GPU = "h100"
ALLOWED_BUCKET = "allowed-bucket"
SMALL_UPLOAD = 64 * 1024
RIG = {"gpu_type": "a100", "gpu_count": 1, "location": "test", "price_per_hour": 0.5}


@pytest.fixture(scope="module")
def client(served: Served) -> httpx.Client:
    return served.client(served.new_key("client"))


@pytest.fixture(scope="module")
def admin(served: Served) -> httpx.Client:
    return served.client(served.admin_key)


@pytest.fixture(scope="module")
def auditor(served: Served) -> httpx.Client:
    return served.client(served.new_key("auditor"))


@pytest.fixture(scope="module")
def miner(served: Served) -> tuple[str, str]:
    """A registered miner the test plays itself: (miner_id, key)."""
    return register_miner(served, FAKE_GPU)


@pytest.fixture(scope="module")
def limited(serve_factory: Callable[..., Served]) -> Served:
    """A ledger that takes uploads of at most SMALL_UPLOAD bytes."""
    return serve_factory(env={"JOBLEDGER_MAX_UPLOAD_BYTES": str(SMALL_UPLOAD)})


@dataclass
class Listener:
    """A TCP port that records every connection made to it (it never answers)."""

    port: int
    connections: list[tuple[str, int]]


@pytest.fixture(scope="module")
def s3_trap() -> Iterator[Listener]:
    """Where the bucketed ledger's S3 client would connect: any connection is recorded."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    listener = Listener(port=server.getsockname()[1], connections=[])
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, peer = server.accept()
            except TimeoutError:
                continue
            listener.connections.append(peer)
            connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener
    stop.set()
    thread.join()
    server.close()


@pytest.fixture(scope="module")
def bucketed(serve_factory: Callable[..., Served], s3_trap: Listener) -> Served:
    """A ledger allowed exactly one S3 bucket, whose S3 endpoint is the trap."""
    return serve_factory(
        env={
            "JOBLEDGER_S3_ALLOWED_BUCKETS": ALLOWED_BUCKET,
            "JOBLEDGER_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_trap.port}",
            "AWS_ACCESS_KEY_ID": "hostile-input-test",
            "AWS_SECRET_ACCESS_KEY": "hostile-input-test",
        }
    )


def raw_request(
    served: Served,
    method: str,
    target: str,
    *,
    key: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> httpx.Response:
    """Send `target` exactly as written: no dot-segment removal, no re-encoding."""
    url = urlsplit(served.url)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
    try:
        sent = dict(headers or {})
        if key is not None:
            sent["X-Api-Key"] = key
        connection.request(method, target, body=body, headers=sent)
        answer = connection.getresponse()
        return httpx.Response(answer.status, headers=answer.getheaders(), content=answer.read())
    finally:
        connection.close()


def assert_refused(answer: httpx.Response) -> None:
    """A 4xx; with the standard error body whenever the answer is JSON (it is from the app)."""
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:500])
    if answer.headers.get("content-type", "").startswith("application/json"):
        assert_error(answer, answer.status_code)


def healthy(served: Served) -> bool:
    return httpx.get(served.url + "/healthz", timeout=10).status_code == 200


# ---- oversize bodies ----------------------------------------------------------------
# POST /v1/jobs over the JSON limit (announced and chunked) is in test_errors.py and raw
# /v1/files uploads over the upload limit in test_files.py; these are the other routes.

JSON_ROUTES = {
    "register-miner": ("POST", "/v1/miners"),
    "update-miner": ("PUT", "/v1/miners/{miner}"),
    "register-receipt-key": ("POST", "/v1/miners/{miner}/keys"),
    "create-key": ("POST", "/v1/admin/keys"),
}


def oversize_chunks() -> Iterator[bytes]:
    """A JSON object of just over 1 MiB, streamed without a Content-Length."""
    yield b'{"role": "client", "gpu_type": "a100", "price_per_hour": 1, "name": "'
    for _ in range(11):
        yield b"x" * 100_000
    yield b'"}'


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_json_bodies_over_the_limit_are_413_and_change_nothing(
    admin: httpx.Client, miner: tuple[str, str], route: str, framing: str
) -> None:
    method, template = JSON_ROUTES[route]
    path = template.format(miner=miner[0])
    before = admin.get("/v1/miners", params={"limit": 1}).json()["total"]
    content: bytes | Iterator[bytes] = (
        b"".join(oversize_chunks()) if framing == "content-length" else oversize_chunks()
    )
    assert len(b"".join(oversize_chunks())) > ONE_MIB
    answer = admin.request(method, path, content=content, headers=JSON)
    assert_error(answer, 413)
    assert admin.get("/v1/miners", params={"limit": 1}).json()["total"] == before
    assert admin.get(f"/v1/miners/{miner[0]}/keys").json()["keys"] == []


@pytest.mark.parametrize(
    ("route", "path"),
    [("submit", "/v1/jobs"), ("create-key", "/v1/admin/keys"), ("upload", "/v1/files")],
)
def test_an_announced_terabyte_is_refused_before_any_byte_is_read(
    served: Served, limited: Served, route: str, path: str
) -> None:
    """Content-Length: 1 TB and a few bytes sent: the 413 comes at once, not after a wait."""
    target = limited if route == "upload" else served
    key = target.new_key("client") if route != "create-key" else target.admin_key
    started = time.monotonic()
    answer = raw_request(
        target,
        "POST",
        path,
        key=key,
        body=b'{"model": ',
        headers={"Content-Type": "application/json", "Content-Length": str(10**12)},
        timeout=10,
    )
    assert time.monotonic() - started < 10
    assert_error(answer, 413)
    assert healthy(target)


def test_a_multipart_upload_over_the_limit_is_413_and_keeps_nothing(limited: Served) -> None:
    client = limited.client(limited.new_key("client"))
    data = secrets.token_bytes(SMALL_UPLOAD + 1)
    answer = client.post("/v1/files", files={"file": ("big.bin", data, "application/octet-stream")})
    assert assert_error(answer, 413)["details"]["limit_bytes"] == SMALL_UPLOAD
    blobs = limited.log_path.parent / "home" / "blobs"
    assert [p for p in blobs.rglob("*") if p.is_file()] == []


def test_a_chunked_result_upload_over_the_limit_is_413_and_keeps_nothing(limited: Served) -> None:
    client = limited.client(limited.new_key("client"))
    miner_id, miner_key = register_miner(limited, FAKE_GPU)
    job_id = submit(
        client,
        "echo",
        "x",
        gpu_type=FAKE_GPU,
        output_config={"destination": "local", "format": "binary"},
    )
    attempt = hold(limited, job_id, miner_id)

    def chunks() -> Iterator[bytes]:
        for _ in range(4):
            yield b"r" * (SMALL_UPLOAD // 2)

    answer = httpx.put(
        f"{limited.url}/v1/jobs/{job_id}/attempts/{attempt}/result",
        content=chunks(),
        headers={"X-Api-Key": miner_key},
        timeout=30,
    )
    assert assert_error(answer, 413)["details"]["limit_bytes"] == SMALL_UPLOAD
    blobs = limited.log_path.parent / "home" / "blobs"
    assert [p for p in blobs.rglob("*") if p.is_file()] == []
    assert client.get(f"/v1/jobs/{job_id}").json()["result"] is None


# ---- absurd paging values -------------------------------------------------------------

LISTINGS = {
    "jobs": ("/v1/jobs", {}),
    "history": ("/v1/jobs/history", {"from": "2020-01-01", "to": "2099-12-31"}),
    "miners": ("/v1/miners", {}),
}


def cursor_of(text: bytes) -> str:
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


BAD_LIMITS = ["0", "-1", "101", str(10**12), str(2**64), "abc", "", "1e3", "NaN", "\x00", "5 5"]
BAD_CURSORS = {
    "garbage": "garbage",
    "percent": "%%%",
    "nul": "\x00",
    "emoji": "🚀",
    "not-utf8": cursor_of(b"\xff\xfe\xfd"),
    "seq-float": cursor_of(b"seq:1e5"),
    "seq-empty": cursor_of(b"seq:"),
    "10kb": "A" * 10_240,
}
# Already in test_errors.py / test_paging_and_history.py.
COVERED = {
    ("jobs", "limit", "0"),
    ("jobs", "limit", "-1"),
    ("jobs", "limit", "101"),
    ("jobs", "limit", "abc"),
    ("jobs", "cursor", "garbage"),
    ("history", "limit", "0"),
    ("history", "limit", "101"),
    ("history", "cursor", "garbage"),
}
PAGING_CASES = [
    pytest.param(listing, "limit", value, id=f"{listing}-limit-{value[:12]!r}")
    for listing in LISTINGS
    for value in BAD_LIMITS
    if (listing, "limit", value) not in COVERED
] + [
    pytest.param(listing, "cursor", value, id=f"{listing}-cursor-{name}")
    for listing in LISTINGS
    for name, value in BAD_CURSORS.items()
    if (listing, "cursor", name) not in COVERED
]


@pytest.mark.parametrize(("listing", "parameter", "value"), PAGING_CASES)
def test_absurd_paging_values_are_422_naming_the_parameter(
    auditor: httpx.Client, listing: str, parameter: str, value: str
) -> None:
    path, params = LISTINGS[listing]
    error = assert_error(auditor.get(path, params=params | {parameter: value}), 422)
    assert parameter in error["message"], error


@pytest.mark.parametrize("listing", LISTINGS)
@pytest.mark.parametrize(
    "cursor",
    [cursor_of(b"seq:-1"), cursor_of(b"seq:0"), cursor_of(b"seq:" + b"9" * 40)],
    ids=["seq-negative", "seq-zero", "seq-40-digits"],
)
def test_forged_cursors_of_the_right_shape_are_never_a_server_error(
    auditor: httpx.Client, listing: str, cursor: str
) -> None:
    """Shaped like ours but pointing nowhere: an empty page or a 422, never a 500."""
    path, params = LISTINGS[listing]
    answer = auditor.get(path, params=params | {"cursor": cursor})
    if answer.status_code == 200:
        assert answer.json()["has_more"] is False
    else:
        assert_error(answer, 422)


# ---- deeply nested JSON ---------------------------------------------------------------

DEPTH = 100_000
NESTED = {
    "arrays": b"[" * DEPTH + b"]" * DEPTH,
    "objects": b'{"a":' * DEPTH + b"1" + b"}" * DEPTH,
    "unterminated": b"[" * DEPTH,
    "in-a-field": b'{"model": "gpt2", "requirements": {"gpu_type": "v100"}, "input": '
    + b"[" * DEPTH
    + b"]" * DEPTH
    + b"}",
    "in-an-unknown-field": b'{"model": "gpt2", "input": "x", "requirements": '
    b'{"gpu_type": "v100"}, "extra": ' + b'{"a":' * DEPTH + b"1" + b"}" * DEPTH + b"}",
}


NESTED_ROUTES = ["/v1/jobs", "/v1/miners", "/v1/admin/keys"]


def post_nested(
    client: httpx.Client, admin: httpx.Client, path: str, shape: str
) -> tuple[httpx.Response, float]:
    caller = client if path == "/v1/jobs" else admin
    started = time.monotonic()
    answer = caller.post(path, content=NESTED[shape], headers=JSON, timeout=30)
    return answer, time.monotonic() - started


@pytest.mark.parametrize("path", NESTED_ROUTES)
@pytest.mark.parametrize("shape", NESTED)
def test_deeply_nested_json_is_answered_quickly_and_the_server_stays_healthy(
    served: Served, client: httpx.Client, admin: httpx.Client, path: str, shape: str
) -> None:
    answer, elapsed = post_nested(client, admin, path, shape)
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert_error(answer, answer.status_code)
    assert healthy(served)
    assert client.post("/v1/jobs", json=SEED_JOB).status_code == 201


@pytest.mark.parametrize("path", NESTED_ROUTES)
@pytest.mark.parametrize("shape", NESTED)
def test_deeply_nested_json_is_a_client_error(
    client: httpx.Client, admin: httpx.Client, path: str, shape: str
) -> None:
    answer, _ = post_nested(client, admin, path, shape)
    assert answer.status_code in (400, 422), (answer.status_code, answer.text[:500])


# ---- injection-shaped and control characters ------------------------------------------

SQL_DROP = "'; DROP TABLE jobledger_events; --"
SQL_OR = '\\" OR 1=1 --'
TEXTS = {
    "sql-drop": SQL_DROP,
    "sql-or": SQL_OR,
    "nul": "before\x00after",
    "whitespace": "tab\there\nnewline\r\ncrlf\x0bvt\x0cff",
    "rtl-override": "\u202eevil.exe\u202c \u2066isolate\u2069 \u200f",
    "emoji": "🚀 👩\u200d💻 🏳\ufe0f\u200d🌈",
    "astral": "\U0001d573\U0001d58a\U0001d591\U0001d591\U0001d594 \U0002070e\U00020731 \U0010fffd",
    "c1-and-del": "\x85\x9b\x7f",
    "everything": SQL_DROP + SQL_OR + "\x00\t\n\u202e🚀𠜎",
}


def events_count(served: Served) -> int:
    with psycopg.connect(served.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM jobledger_events").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("name", TEXTS)
def test_hostile_job_input_is_stored_and_returned_verbatim(
    served: Served, client: httpx.Client, miner: tuple[str, str], name: str
) -> None:
    text = TEXTS[name]
    idempotency_key = f"';DROP/**/TABLE/**/jobledger_events;--{name}"
    before = events_count(served)
    body = SEED_JOB | {"input": text, "requirements": {"gpu_type": FAKE_GPU}}
    headers = {"Idempotency-Key": idempotency_key}
    created = client.post("/v1/jobs", json=body, headers=headers)
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]

    submitted = client.get(f"/v1/jobs/{job_id}/events").json()["events"][0]["data"]
    assert submitted["input_text"] == text
    assert submitted["idempotency_key"] == idempotency_key
    replayed = client.post("/v1/jobs", json=body, headers=headers)
    assert replayed.status_code == 201, replayed.text
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.json()["job_id"] == job_id
    # The miner that runs it receives exactly these bytes.
    attempt = hold(served, job_id, miner[0])
    fetched = httpx.get(
        f"{served.url}/v1/jobs/{job_id}/attempts/{attempt}/input",
        headers={"X-Api-Key": miner[1]},
        timeout=30,
    )
    assert fetched.status_code == 200, fetched.text
    assert fetched.content == text.encode()
    # The events table is still there, and grew.
    assert events_count(served) > before


@pytest.mark.parametrize(
    "raw",
    [b'"\\ud800"', b'"\\udfff x"', b'"a\\ud83d"'],
    ids=["lone-high-surrogate", "lone-low-surrogate", "half-an-emoji"],
)
def test_a_lone_surrogate_in_the_input_is_a_client_error(client: httpx.Client, raw: bytes) -> None:
    """Not text at all: it could never be handed to a miner as UTF-8."""
    body = b'{"model": "gpt2", "requirements": {"gpu_type": "v100"}, "input": ' + raw + b"}"
    answer = client.post("/v1/jobs", content=body, headers=JSON)
    assert answer.status_code in (400, 422), answer.text
    assert_error(answer, answer.status_code)


@pytest.mark.parametrize(
    "key",
    ["has space", "tab\there", "🚀".encode().decode("latin-1"), "x" * 256],
    ids=["space", "tab", "non-ascii", "too-long"],
)
def test_idempotency_keys_outside_printable_ascii_are_422_and_create_nothing(
    client: httpx.Client, key: str
) -> None:
    total = client.get("/v1/jobs", params={"limit": 1}).json()["total"]
    answer = client.post(
        "/v1/jobs", json=SEED_JOB, headers={b"Idempotency-Key": key.encode("latin-1")}
    )
    assert_error(answer, 422)
    assert client.get("/v1/jobs", params={"limit": 1}).json()["total"] == total


# The name a client gives a file comes back as is, except that path separators, quotes
# and control characters become "_" (app/api/files.py safe_filename).
FILENAMES = {
    "sql-drop": (SQL_DROP + ".txt", SQL_DROP + ".txt"),
    "sql-or": (SQL_OR, "_ OR 1=1 --"),
    "nul": ("a\x00b.txt", "a_b.txt"),
    "whitespace": ("tab\there\nnew.txt", "tab_here_new.txt"),
    "rtl-override": ("\u202egpj.exe", "\u202egpj.exe"),
    "emoji-astral": ("🚀 𠜎.bin", "🚀 𠜎.bin"),
}


@pytest.mark.parametrize("name", FILENAMES)
def test_hostile_file_names_come_back_as_documented(
    served: Served, client: httpx.Client, name: str
) -> None:
    given, kept = FILENAMES[name]
    data = f"{name} {secrets.token_hex(8)}".encode()
    uploaded = client.post("/v1/files", content=data, params={"filename": given})
    assert uploaded.status_code == 201, uploaded.text
    file_id = uploaded.json()["file_id"]
    assert uploaded.json()["filename"] == kept
    assert client.get(f"/v1/files/{file_id}").json()["filename"] == kept
    content = client.get(f"/v1/files/{file_id}/content")
    assert content.content == data
    disposition = content.headers["content-disposition"]
    assert "\r" not in disposition and "\n" not in disposition
    assert disposition.startswith("attachment; filename=")
    if "filename*=UTF-8''" in disposition:
        assert unquote(disposition.split("filename*=UTF-8''", 1)[1]) == kept
    with psycopg.connect(served.database_url) as conn:
        tables = conn.execute(
            "SELECT to_regclass('jobledger_events'), to_regclass('jobledger_api_keys')"
        ).fetchone()
    assert tables is not None and None not in tables


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        pytest.param("../../../etc/passwd", "passwd", id="dotdot-slash"),
        pytest.param("..\\..\\boot.ini", "boot.ini", id="dotdot-backslash"),
        pytest.param("/etc/shadow", "shadow", id="absolute"),
        pytest.param("%2e%2e%2fx", "%2e%2e%2fx", id="percent-stays-literal"),
        pytest.param("..", None, id="dotdot"),
        pytest.param(".", None, id="dot"),
        pytest.param("a/..", None, id="ends-in-dotdot"),
    ],
)
def test_a_file_name_is_never_a_path(client: httpx.Client, given: str, kept: str | None) -> None:
    data = f"{given} {secrets.token_hex(8)}".encode()
    uploaded = client.post("/v1/files", content=data, params={"filename": given})
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["filename"] == kept


@pytest.mark.parametrize(
    "text",
    [
        SQL_DROP,
        SQL_OR,
        "\U0001f680 \U0002070e \U0001d573\U0001d58a\U0001d591\U0001d591\U0001d594 \u00e9",
    ],
    ids=["drop", "or", "emoji-astral"],
)
def test_hostile_miner_and_key_names_are_stored_verbatim(admin: httpx.Client, text: str) -> None:
    registered = admin.post("/v1/miners", json=RIG | {"name": text, "location": text})
    assert registered.status_code == 201, registered.text
    shown = admin.get(f"/v1/miners/{registered.json()['miner_id']}").json()
    assert (shown["name"], shown["location"]) == (text, text)
    key = admin.post("/v1/admin/keys", json={"role": "auditor", "name": text})
    assert key.status_code == 201, key.text
    assert key.json()["name"] == text


@pytest.mark.parametrize(
    "text",
    ["a\x00b", "a\nb", "\x1b[31mred", "\u202eevil", "👩\u200d💻"],
    ids=["nul", "newline", "ansi", "rtl-override", "zero-width-joiner"],
)
def test_control_and_format_characters_in_miner_and_key_names_are_422(
    admin: httpx.Client, text: str
) -> None:
    assert_error(admin.post("/v1/miners", json=RIG | {"name": text}), 422)
    assert_error(admin.post("/v1/miners", json=RIG | {"name": "rig", "location": text}), 422)
    assert_error(admin.post("/v1/admin/keys", json={"role": "auditor", "name": text}), 422)


# ---- SSRF-shaped destinations -----------------------------------------------------------

SSRF_DESTINATIONS = [
    "s3://127.0.0.1/x",
    "s3://169.254.169.254/latest/meta-data",
    "s3://[::1]/x",
    "s3://[fd00:ec2::254]/x",
    "s3://0x7f000001/x",
    "s3://2130706433/x",
    "s3://localhost/x",
    "s3://metadata.google.internal/computeMetadata/v1",
    "s3://metadata/x",
    f"s3://{ALLOWED_BUCKET}@169.254.169.254/x",
    f"s3://user:pass@{ALLOWED_BUCKET}/x",
    f"s3://{ALLOWED_BUCKET}:9000/x",
    f"s3://{ALLOWED_BUCKET}:@evil.com/x",
    f"S3://{ALLOWED_BUCKET}/x",
    f"s3:/{ALLOWED_BUCKET}/x",
    f"s3:{ALLOWED_BUCKET}/x",
    f" s3://{ALLOWED_BUCKET}/x",
    f"s3://{ALLOWED_BUCKET}/x\n",
    f"s3://{ALLOWED_BUCKET.upper()}/x",
    f"s3://{ALLOWED_BUCKET}./x",
    f"s3://{ALLOWED_BUCKET}.evil.com/x",
    f"s3://evil.com/{ALLOWED_BUCKET}",
    f"s3://{ALLOWED_BUCKET}\\@evil.com/x",
    f"s3://{ALLOWED_BUCKET}#@evil.com/x",
    f"s3://{ALLOWED_BUCKET}?@evil.com/x",
    f"s3://{ALLOWED_BUCKET}/a@169.254.169.254",
    f"s3://{ALLOWED_BUCKET}/../other-bucket/x",
    f"s3://{ALLOWED_BUCKET}//x",
    f"s3://{ALLOWED_BUCKET}/%2e%2e/x",
    f"s3://{ALLOWED_BUCKET}/x%2f..%2f..",
    "s3://allowed%2Dbucket/x",
    f"s3%3A%2F%2F{ALLOWED_BUCKET}/x",
    "s3://\u0430llowed-bucket/x",  # Cyrillic a
    "s3://allowed\u2010bucket/x",  # Unicode hyphen
    f"s3://{ALLOWED_BUCKET}\u200b/x",  # zero-width space
    "s3://\uff41\uff4c\uff4c\uff4f\uff57\uff45\uff44-bucket/x",  # fullwidth
    f"http://{ALLOWED_BUCKET}.s3.amazonaws.com/x",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "https://localhost:9000/x",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_FLUSHALL",
]


def submit_to(client: httpx.Client, destination: str) -> httpx.Response:
    body = SEED_JOB | {"output_config": {"destination": destination, "format": "json"}}
    return client.post("/v1/jobs", json=body)


@pytest.mark.parametrize("ledger", ["no-buckets", "one-bucket"])
@pytest.mark.parametrize("destination", SSRF_DESTINATIONS)
def test_ssrf_shaped_destinations_are_an_immediate_422(
    served: Served, bucketed: Served, ledger: str, destination: str
) -> None:
    target = served if ledger == "no-buckets" else bucketed
    client = target.client(target.new_key("client"))
    started = time.monotonic()
    answer = submit_to(client, destination)
    elapsed = time.monotonic() - started
    error = assert_error(answer, 422)
    assert error["details"]["field"] == "output_config.destination", error
    assert elapsed < 2, f"took {elapsed:.2f} s"


def test_submission_never_contacts_s3(bucketed: Served, s3_trap: Listener) -> None:
    """Refused and accepted S3 destinations alike: the S3 endpoint hears nothing at submission.

    A result upload to the accepted one then does reach the trap: it is the endpoint in use.
    """
    client = bucketed.client(bucketed.new_key("client"))
    for destination in SSRF_DESTINATIONS[:10]:
        assert submit_to(client, destination).status_code == 422
    accepted = submit(
        client,
        "echo",
        "x",
        gpu_type=FAKE_GPU,
        output_config={"destination": f"s3://{ALLOWED_BUCKET}/results", "format": "binary"},
    )
    time.sleep(0.3)
    assert s3_trap.connections == []

    miner_id, miner_key = register_miner(bucketed, FAKE_GPU)
    attempt = hold(bucketed, accepted, miner_id)
    stored = httpx.put(
        f"{bucketed.url}/v1/jobs/{accepted}/attempts/{attempt}/result",
        content=b"result",
        headers={"X-Api-Key": miner_key},
        timeout=60,
    )
    assert_error(stored, 503)
    assert s3_trap.connections != []


# ---- path traversal in every id ----------------------------------------------------------

HOSTILE_IDS = {
    "dotdot": "..",
    "dotdot-deep": "../../../../../etc/passwd",
    "dotdot-encoded-slash": "..%2F..%2F..%2Fetc%2Fpasswd",
    "encoded-dots": "%2e%2e",
    "encoded-all": "%2e%2e%2f%2e%2e%2fhome",
    "half-encoded": ".%2e/.%2e",
    "double-encoded": "%252e%252e%252f%252e%252e",
    "backslash": "..\\..\\windows\\win.ini",
    "encoded-backslash": "..%5c..%5cwindows",
    "nul": "%00",
    "job-nul": "job_" + "a" * 32 + "%00",
    "file-nul-dotdot": "file_" + "0" * 31 + "%00..%2f",
    "overlong-utf8": "%c0%ae%c0%ae%c0%af",
    "valid-prefix-then-dotdot": "job_" + "a" * 32 + "%2F..%2F..",
    "long-10kb": "a" * 10_240,
    "long-encoded": "%2e%2e%2f" * 1_000,
    "long-100kb": "b" * 100_000,
}

ID_ROUTES: dict[str, tuple[str, str, str, Any]] = {
    "job-status": ("GET", "/v1/jobs/{x}", "client", None),
    "job-as-of": ("GET", "/v1/jobs/{x}?as_of=1", "client", None),
    "job-cancel": ("DELETE", "/v1/jobs/{x}", "client", None),
    "job-download": ("GET", "/v1/jobs/{x}/download", "client", None),
    "job-events": ("GET", "/v1/jobs/{x}/events", "client", None),
    "attempt-input-job": ("GET", "/v1/jobs/{x}/attempts/1/input", "miner", None),
    "attempt-result-job": ("PUT", "/v1/jobs/{x}/attempts/1/result", "miner", b'{"a": 1}'),
    "attempt-input-attempt": ("GET", "/v1/jobs/{job}/attempts/{x}/input", "miner", None),
    "attempt-result-attempt": (
        "PUT",
        "/v1/jobs/{job}/attempts/{x}/result",
        "miner",
        b'{"a": 1}',
    ),
    "file": ("GET", "/v1/files/{x}", "client", None),
    "file-content": ("GET", "/v1/files/{x}/content", "client", None),
    "file-delete": ("DELETE", "/v1/files/{x}", "client", None),
    "miner": ("GET", "/v1/miners/{x}", "admin", None),
    "miner-update": ("PUT", "/v1/miners/{x}", "admin", RIG),
    "miner-deregister": ("DELETE", "/v1/miners/{x}", "admin", None),
    "miner-stats": ("GET", "/v1/miners/{x}/stats", "admin", None),
    "miner-keys": ("GET", "/v1/miners/{x}/keys", "admin", None),
    "miner-key-register": ("POST", "/v1/miners/{x}/keys", "admin", openapi.REGISTER_RECEIPT_KEY),
    "miner-key-revoke-by-miner": ("DELETE", "/v1/miners/{x}/keys/{key_id}", "admin", None),
    "miner-key-revoke-by-key": ("DELETE", "/v1/miners/{miner}/keys/{x}", "admin", None),
    "admin-key-revoke": ("DELETE", "/v1/admin/keys/{x}", "admin", None),
}


@dataclass
class Targets:
    """Real things for the ids a route needs besides the hostile one."""

    keys: dict[str, str]
    job_id: str
    miner_id: str
    key_id: str


@pytest.fixture(scope="module")
def targets(served: Served, client: httpx.Client, admin: httpx.Client) -> Targets:
    """A job held by a fresh miner, which has one receipt key."""
    miner_id, miner_key = register_miner(served, FAKE_GPU)
    job_id = submit(client, "echo", "x", gpu_type=FAKE_GPU)
    hold(served, job_id, miner_id)
    registered = admin.post(f"/v1/miners/{miner_id}/keys", json=openapi.REGISTER_RECEIPT_KEY)
    assert registered.status_code == 201, registered.text
    key_id = key_id_of(decode_public_key(openapi.REGISTER_RECEIPT_KEY["public_key"]))
    keys = {
        "client": str(client.headers["X-Api-Key"]),
        "admin": served.admin_key,
        "miner": miner_key,
    }
    return Targets(keys=keys, job_id=job_id, miner_id=miner_id, key_id=key_id)


def files_under(*roots: Path) -> set[Path]:
    return {path for root in roots for path in root.rglob("*") if path.is_file()}


def entries_in(*directories: Path) -> set[Path]:
    return {path for directory in directories for path in directory.iterdir()}


TRAVERSAL_CASES = [
    pytest.param(route, hostile, id=f"{route}-{hostile}")
    for route in ID_ROUTES
    for hostile in HOSTILE_IDS
]


@pytest.mark.parametrize(("route", "hostile"), TRAVERSAL_CASES)
def test_path_traversal_in_any_id_is_a_4xx_and_writes_nothing(
    served: Served, targets: Targets, route: str, hostile: str
) -> None:
    method, template, caller, body = ID_ROUTES[route]
    target = template.format(
        x=HOSTILE_IDS[hostile], job=targets.job_id, miner=targets.miner_id, key_id=targets.key_id
    )
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    served_dir = served.log_path.parent  # JOBLEDGER_HOME is served_dir / "home"
    files_before = files_under(served_dir)
    beside_before = entries_in(served_dir.parent)

    answer = raw_request(
        served,
        method,
        target,
        key=targets.keys[caller],
        body=content,
        headers=JSON if content is not None else None,
    )

    assert_refused(answer)
    assert files_under(served_dir) == files_before
    assert entries_in(served_dir.parent) == beside_before


def test_the_targets_survived_the_traversal_attempts(
    served: Served, admin: httpx.Client, targets: Targets
) -> None:
    """No hostile id reached the real job, miner or receipt key next to it."""
    assert admin.get(f"/v1/jobs/{targets.job_id}").json()["status"] not in {"canceled", "canceling"}
    assert admin.get(f"/v1/miners/{targets.miner_id}").json()["status"] != "deregistered"
    [key] = admin.get(f"/v1/miners/{targets.miner_id}/keys").json()["keys"]
    assert (key["key_id"], key["status"]) == (targets.key_id, "active")
    assert healthy(served)
