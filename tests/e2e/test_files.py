"""Inputs and results end to end: uploads, miners fetching and storing, verified downloads.

A served ledger, real miner agents, real NATS and PostgreSQL, and for S3 a real
S3-compatible HTTP server (moto's server mode, in its own process) on loopback.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from app import protocol
from tests.e2e.conftest import Served
from tests.e2e.dispatch import Miner, register_miner, start_miner, submit, wait_status
from tests.e2e.fake_miner import completed, hold, report
from tests.s3server import S3Server

BUCKET = "results-bucket"
# No real miner offers this type, so the test can hold such jobs itself.
FAKE_GPU = "h100"


@pytest.fixture(scope="module")
def ledger(serve_factory: Callable[..., Served], s3_server: S3Server) -> Served:
    """A ledger that may write results to one S3 bucket of the loopback server."""
    s3_server.create_bucket(BUCKET)
    return serve_factory(
        env=s3_server.env
        | {
            "JOBLEDGER_S3_ENDPOINT_URL": s3_server.endpoint_url,
            "JOBLEDGER_S3_ALLOWED_BUCKETS": BUCKET,
        }
    )


@pytest.fixture(scope="module")
def miner(
    ledger: Served, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Miner]:
    started = start_miner(
        ledger, nats_url, tmp_path_factory.mktemp("miner"), "cpu", max_concurrent=4
    )
    yield started
    started.kill()


@pytest.fixture(scope="module")
def client(ledger: Served) -> httpx.Client:
    return ledger.client(ledger.new_key("client"))


def logs(*things: Served | Miner) -> Callable[[], str]:
    return lambda: "\n".join(f"--- {type(t).__name__} log ---\n{t.log()[-6000:]}" for t in things)


def upload(client: httpx.Client, data: bytes, **params: str) -> dict[str, Any]:
    answer = client.post("/v1/files", content=data, params=params)
    assert answer.status_code in (200, 201), answer.text
    body: dict[str, Any] = answer.json()
    return body


def s3_object(server: S3Server, key: str) -> bytes:
    s3 = server.client()
    data: bytes = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return data


# ---- uploads -----------------------------------------------------------------


def test_an_upload_answers_its_id_size_and_digest_and_dedups(client: httpx.Client) -> None:
    data = secrets.token_bytes(300_000)
    answer = client.post("/v1/files", content=data, params={"filename": "weights.bin"})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["size_bytes"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["file_id"].startswith("file_") and body["filename"] == "weights.bin"
    # The same bytes as a multipart form: the same file, kept once.
    again = client.post("/v1/files", files={"file": ("w.bin", data, "application/octet-stream")})
    assert again.status_code == 200, again.text
    assert again.json()["file_id"] == body["file_id"]
    fetched = client.get(f"/v1/files/{body['file_id']}/content")
    assert fetched.content == data and fetched.headers["etag"] == f'"{body["sha256"]}"'


def test_a_multipart_upload_keeps_the_part_name_and_type(client: httpx.Client) -> None:
    data = b'{"prompt": "hello"}\n' * 1000
    answer = client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("../../prompts.jsonl", data, "application/jsonl")},
    )
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["filename"] == "prompts.jsonl"  # no path ever survives from a client's name
    assert body["content_type"] == "application/jsonl"
    assert body["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_malformed_multipart_upload_is_a_400(client: httpx.Client) -> None:
    answer = client.post(
        "/v1/files",
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert answer.status_code == 400, answer.text


def test_uploads_past_the_limit_are_413_and_keep_nothing(
    serve_factory: Callable[..., Served],
) -> None:
    small = serve_factory(env={"JOBLEDGER_MAX_UPLOAD_BYTES": str(1024 * 1024)})
    client = small.client(small.new_key("client"))
    announced = client.post("/v1/files", content=b"x" * (1024 * 1024 + 1))
    assert announced.status_code == 413, announced.text
    assert announced.json()["error"]["details"]["limit_bytes"] == 1024 * 1024

    def unannounced() -> Iterator[bytes]:  # chunked: the size shows only while streaming
        for _ in range(3):
            yield b"y" * 512 * 1024

    streamed = client.post("/v1/files", content=unannounced())
    assert streamed.status_code == 413, streamed.text
    home = small.log_path.parent / "home" / "blobs"
    left = [p for p in home.rglob("*") if p.is_file()] if home.exists() else []
    assert left == []


def test_files_belong_to_their_owner(ledger: Served, client: httpx.Client) -> None:
    file_id = upload(client, b"mine")["file_id"]
    other = ledger.client(ledger.new_key("client"))
    assert other.get(f"/v1/files/{file_id}").status_code == 404
    assert other.get(f"/v1/files/{file_id}/content").status_code == 404
    assert other.delete(f"/v1/files/{file_id}").status_code == 404
    refused = other.post(
        "/v1/jobs",
        json={"model": "echo", "input": file_id, "requirements": {"gpu_type": "cpu"}},
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["details"]["field"] == "input"
    auditor = ledger.client(ledger.new_key("auditor"))
    assert auditor.get(f"/v1/files/{file_id}").json()["file_id"] == file_id


def test_a_job_naming_an_unknown_file_is_422(client: httpx.Client) -> None:
    for job_input in ("file_" + "0" * 32, {"file_id": "file_" + "1" * 32}):
        answer = client.post(
            "/v1/jobs",
            json={"model": "echo", "input": job_input, "requirements": {"gpu_type": "cpu"}},
        )
        assert answer.status_code == 422, answer.text


def test_only_unused_files_can_be_deleted(client: httpx.Client) -> None:
    unused = upload(client, b"scratch " + secrets.token_bytes(8))["file_id"]
    assert client.delete(f"/v1/files/{unused}").status_code == 204
    assert client.get(f"/v1/files/{unused}").status_code == 404
    used = upload(client, b"keep " + secrets.token_bytes(8))["file_id"]
    job_id = submit(client, "echo", used, gpu_type=FAKE_GPU)
    refused = client.delete(f"/v1/files/{used}")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["details"]["used_by"] == job_id
    assert client.get(f"/v1/files/{used}").json()["used_by"] == job_id


# ---- jobs on files, results of any size ----------------------------------------


def download(client: httpx.Client, job_id: str, **headers: str) -> httpx.Response:
    return client.get(f"/v1/jobs/{job_id}/download", headers=headers)


def test_echo_on_a_large_file_stores_and_downloads_the_same_bytes(
    ledger: Served, miner: Miner, client: httpx.Client
) -> None:
    data = secrets.token_bytes(3 * 1024 * 1024 + 17)
    digest = hashlib.sha256(data).hexdigest()
    file_id = upload(client, data)["file_id"]
    job_id = submit(
        client, "echo", file_id, output_config={"destination": "local", "format": "binary"}
    )
    done = wait_status(client, job_id, {"completed", "failed"}, on_fail=logs(ledger, miner))
    assert done["status"] == "completed", done
    result = done["result"]
    assert result["storage"] == "stored" and result["format"] == "binary"
    assert (result["size_bytes"], result["sha256"]) == (len(data), digest)
    assert result["location"] == f"local:results/{job_id}/attempt-1/result.bin"

    whole = download(client, job_id)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["content-type"] == "application/octet-stream"
    assert whole.headers["content-length"] == str(len(data))
    assert whole.headers["etag"] == f'"{digest}"'
    assert whole.headers["accept-ranges"] == "bytes"
    assert "sha-256=" in whole.headers["digest"]

    part = download(client, job_id, Range="bytes=1000-1999")
    assert part.status_code == 206 and part.content == data[1000:2000]
    assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
    tail = download(client, job_id, Range="bytes=-10")
    assert tail.status_code == 206 and tail.content == data[-10:]
    beyond = download(client, job_id, Range=f"bytes={len(data)}-")
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(data)}"
    assert download(client, job_id, **{"If-None-Match": f'"{digest}"'}).status_code == 304


def test_sha256_of_a_file_input_is_its_digest(
    ledger: Served, miner: Miner, client: httpx.Client
) -> None:
    data = secrets.token_bytes(2 * 1024 * 1024)
    job_id = submit(
        client,
        "sha256",
        {"file_id": upload(client, data)["file_id"]},  # type: ignore[arg-type]
        output_config={"destination": "local", "format": "text"},
    )
    done = wait_status(client, job_id, {"completed", "failed"}, on_fail=logs(ledger, miner))
    assert done["status"] == "completed", done
    assert download(client, job_id).text == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("output_format", "media_type"),
    [
        ("json", "application/json"),
        ("text", "text/plain; charset=utf-8"),
        ("binary", "application/octet-stream"),
        ("archive", "application/zip"),
    ],
)
def test_each_result_format_arrives_as_asked(
    ledger: Served, miner: Miner, client: httpx.Client, output_format: str, media_type: str
) -> None:
    job_id = submit(
        client,
        "echo",
        "hello, ledger",
        output_config={"destination": "local", "format": output_format},
    )
    done = wait_status(client, job_id, {"completed", "failed"}, on_fail=logs(ledger, miner))
    assert done["status"] == "completed", done
    got = download(client, job_id)
    assert got.headers["content-type"] == media_type
    extension = {"json": "json", "text": "txt", "binary": "bin", "archive": "zip"}[output_format]
    assert got.headers["content-disposition"].endswith(f'{job_id}.{extension}"')
    assert got.headers["etag"] == f'"{hashlib.sha256(got.content).hexdigest()}"'
    match output_format:
        case "json":
            assert json.loads(got.content) == "hello, ledger"
        case "text" | "binary":
            assert got.content == b"hello, ledger"
        case "archive":
            with zipfile.ZipFile(io.BytesIO(got.content)) as archive:
                [member] = archive.namelist()
                assert archive.read(member) == b"hello, ledger"


def test_download_is_409_until_there_is_a_result(client: httpx.Client) -> None:
    job_id = submit(client, "echo", "waiting", gpu_type=FAKE_GPU)
    answer = download(client, job_id)
    assert answer.status_code == 409
    assert answer.json()["error"]["details"]["status"] == "pending"


# ---- S3 destinations -------------------------------------------------------------


def test_an_s3_destination_receives_the_result_at_its_documented_key(
    ledger: Served, miner: Miner, client: httpx.Client, s3_server: S3Server
) -> None:
    data = secrets.token_bytes(1024 * 1024)
    file_id = upload(client, data)["file_id"]
    job_id = submit(
        client,
        "echo",
        file_id,
        output_config={"destination": f"s3://{BUCKET}/runs/2026", "format": "binary"},
    )
    done = wait_status(client, job_id, {"completed", "failed"}, on_fail=logs(ledger, miner))
    assert done["status"] == "completed", done
    key = f"runs/2026/{job_id}/attempt-1/result.bin"
    assert done["result"]["location"] == f"s3://{BUCKET}/{key}"
    assert s3_object(s3_server, key) == data
    got = download(client, job_id)
    assert got.content == data and got.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert download(client, job_id, Range="bytes=10-19").content == data[10:20]
    # Bytes removed behind the ledger's back are reported as gone, before any byte is sent.
    s3_server.client().delete_object(Bucket=BUCKET, Key=key)
    gone = download(client, job_id)
    assert gone.status_code == 410, gone.text
    assert key in gone.json()["error"]["message"]


def test_small_results_for_s3_are_stored_there_too(
    ledger: Served, miner: Miner, client: httpx.Client, s3_server: S3Server
) -> None:
    job_id = submit(
        client, "echo", "tiny", output_config={"destination": f"s3://{BUCKET}", "format": "text"}
    )
    done = wait_status(client, job_id, {"completed", "failed"}, on_fail=logs(ledger, miner))
    assert done["status"] == "completed", done
    assert s3_object(s3_server, f"{job_id}/attempt-1/result.txt") == b"tiny"


@pytest.mark.parametrize(
    "destination",
    [
        "s3://another-bucket/x",
        f"s3://{BUCKET}/../x",
        f"s3://{BUCKET}/a/./b",
        "s3://",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data",
        f"s3://{BUCKET}@169.254.169.254/x",
        "local/../../etc",
    ],
)
def test_destinations_outside_the_allowed_buckets_are_422(
    client: httpx.Client, destination: str
) -> None:
    answer = client.post(
        "/v1/jobs",
        json={
            "model": "echo",
            "input": "x",
            "requirements": {"gpu_type": "cpu"},
            "output_config": {"destination": destination, "format": "json"},
        },
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["details"]["field"] == "output_config.destination"


# ---- what the ledger refuses from miners ------------------------------------------


def held_job(ledger: Served, client: httpx.Client, destination: str) -> tuple[str, str, str, int]:
    """A job held by a registered miner that the test plays itself."""
    miner_id, key = register_miner(ledger, FAKE_GPU)
    job_id = submit(
        client,
        "echo",
        "x",
        gpu_type=FAKE_GPU,
        output_config={"destination": destination, "format": "binary"},
    )
    return job_id, miner_id, key, hold(ledger, job_id, miner_id)


def put_result(
    ledger: Served, key: str, job_id: str, attempt: int, data: bytes, **headers: str
) -> httpx.Response:
    return httpx.put(
        ledger.url + protocol.RESULT_PATH.format(job_id=job_id, attempt=attempt),
        content=data,
        headers={"X-Api-Key": key} | headers,
        timeout=30,
    )


@pytest.mark.parametrize("destination", ["local", f"s3://{BUCKET}/checked"])
def test_a_completion_whose_checksum_differs_is_refused(
    ledger: Served, client: httpx.Client, nats_url: str, destination: str
) -> None:
    job_id, miner_id, key, attempt = held_job(ledger, client, destination)
    stored = put_result(ledger, key, job_id, attempt, b"the real bytes")
    assert stored.status_code == 201, stored.text
    answer = stored.json()
    forged = protocol.StoredResult(
        location=answer["location"], size_bytes=answer["size_bytes"], sha256="0" * 64
    )
    report(ledger, nats_url, job_id, completed(miner_id, attempt, forged))
    done = wait_status(client, job_id, {"completed", "failed"}, on_fail=logs(ledger))
    assert (done["status"], done["error_code"]) == ("failed", "result_checksum_mismatch"), done


def test_a_completion_whose_object_vanished_is_refused(
    ledger: Served, client: httpx.Client, nats_url: str, s3_server: S3Server
) -> None:
    job_id, miner_id, key, attempt = held_job(ledger, client, f"s3://{BUCKET}/gone")
    stored = put_result(ledger, key, job_id, attempt, b"soon gone")
    assert stored.status_code == 201, stored.text
    answer = stored.json()
    s3 = s3_server.client()
    s3.delete_object(Bucket=BUCKET, Key=answer["location"].removeprefix(f"s3://{BUCKET}/"))
    result = protocol.StoredResult(
        location=answer["location"], size_bytes=answer["size_bytes"], sha256=answer["sha256"]
    )
    report(ledger, nats_url, job_id, completed(miner_id, attempt, result))
    done = wait_status(client, job_id, {"completed", "failed"}, on_fail=logs(ledger))
    assert (done["status"], done["error_code"]) == ("failed", "result_missing"), done


def test_a_completion_naming_bytes_never_stored_is_refused(
    ledger: Served, client: httpx.Client, nats_url: str
) -> None:
    job_id, miner_id, _, attempt = held_job(ledger, client, "local")
    invented = protocol.StoredResult(
        location=f"local:results/{job_id}/attempt-{attempt}/result.bin",
        size_bytes=3,
        sha256=hashlib.sha256(b"abc").hexdigest(),
    )
    report(ledger, nats_url, job_id, completed(miner_id, attempt, invented))
    done = wait_status(client, job_id, {"completed", "failed"}, on_fail=logs(ledger))
    assert (done["status"], done["error_code"]) == ("failed", "result_missing"), done


def test_result_uploads_are_checked_before_anything_is_kept(
    ledger: Served, client: httpx.Client
) -> None:
    miner_id, key = register_miner(ledger, FAKE_GPU)
    job_id = submit(
        client,
        "echo",
        "x",
        gpu_type=FAKE_GPU,
        output_config={"destination": "local", "format": "json"},
    )
    attempt = hold(ledger, job_id, miner_id)
    not_json = put_result(ledger, key, job_id, attempt, b"{not json")
    assert not_json.status_code == 422, not_json.text
    good = b'{"answer": 42}'
    wrong_digest = put_result(
        ledger, key, job_id, attempt, good, **{"Content-Digest": "sha-256=:" + "A" * 43 + "=:"}
    )
    assert wrong_digest.status_code == 422, wrong_digest.text
    path = ledger.log_path.parent / "home" / "blobs" / "results" / job_id
    assert not path.exists() or not any(p.is_file() for p in path.rglob("*"))
    # Another miner, or the right miner on another attempt, finds nothing to write to.
    _, other_key = register_miner(ledger, FAKE_GPU)
    assert put_result(ledger, other_key, job_id, attempt, good).status_code == 404
    assert put_result(ledger, key, job_id, attempt + 1, good).status_code == 404
    # A client key cannot store results at all.
    assert put_result(ledger, client.headers["X-Api-Key"], job_id, attempt, good).status_code == 403
    assert put_result(ledger, key, job_id, attempt, good).status_code == 201


def test_only_the_holder_fetches_an_input(ledger: Served, client: httpx.Client) -> None:
    data = secrets.token_bytes(4096)
    miner_id, key = register_miner(ledger, FAKE_GPU)
    job_id = submit(client, "echo", upload(client, data)["file_id"], gpu_type=FAKE_GPU)
    attempt = hold(ledger, job_id, miner_id)
    path = protocol.INPUT_PATH.format(job_id=job_id, attempt=attempt)
    got = httpx.get(ledger.url + path, headers={"X-Api-Key": key})
    assert got.status_code == 200 and got.content == data
    assert got.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    resumed = httpx.get(ledger.url + path, headers={"X-Api-Key": key, "Range": "bytes=4000-"})
    assert resumed.status_code == 206 and resumed.content == data[4000:]
    _, other_key = register_miner(ledger, FAKE_GPU)
    assert httpx.get(ledger.url + path, headers={"X-Api-Key": other_key}).status_code == 404
    assert client.get(path).status_code == 403


# ---- hostile ids ----------------------------------------------------------------

TRAVERSALS = [
    "..",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fetc",
    "file_..%2f..%2f",
    "job_..%5c..%5cwindows",
    "file_" + "0" * 31 + "%00",
    "job_" + "a" * 32 + "%2F..",
    "....%2F%2F",
]


@pytest.mark.parametrize("hostile", TRAVERSALS)
def test_path_traversal_in_any_id_reaches_nothing(
    ledger: Served, client: httpx.Client, hostile: str
) -> None:
    _, miner_key = register_miner(ledger, FAKE_GPU)
    miner = {"X-Api-Key": miner_key}
    home = ledger.log_path.parent / "home"
    before = {p for p in home.parent.rglob("*") if p.is_file()}
    answers = [
        client.get(f"/v1/files/{hostile}"),
        client.get(f"/v1/files/{hostile}/content"),
        client.delete(f"/v1/files/{hostile}"),
        client.get(f"/v1/jobs/{hostile}/download"),
        httpx.get(f"{ledger.url}/v1/jobs/{hostile}/attempts/1/input", headers=miner),
        httpx.put(f"{ledger.url}/v1/jobs/{hostile}/attempts/1/result", content=b"x", headers=miner),
        httpx.put(
            f"{ledger.url}/v1/jobs/job_{'a' * 32}/attempts/{hostile}/result",
            content=b"x",
            headers=miner,
        ),
    ]
    for answer in answers:
        assert answer.status_code in (400, 404, 405, 422), (answer.request.url, answer.text)
    after = {p for p in home.parent.rglob("*") if p.is_file()}
    assert {p for p in after - before if "blobs" in p.parts} == set()


# ---- memory stays bounded ----------------------------------------------------------

GIB = 1024**3


def rss_peak_growth(pid: int, transfer: Callable[[], None]) -> int:
    """How far the process's peak resident memory rose above its current size during `transfer`."""
    with open(f"/proc/{pid}/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM, the peak, to the current resident size
    before = _status_kb(pid, "VmRSS")
    transfer()
    return (_status_kb(pid, "VmHWM") - before) * 1024


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status_file:
        for line in status_file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_one_gib_through_upload_job_and_download_keeps_server_memory_bounded(
    ledger: Served, miner: Miner, client: httpx.Client
) -> None:
    """Upload 1 GiB, run echo on it (the miner fetches it and stores 1 GiB back), download it."""
    block = secrets.token_bytes(1024 * 1024)
    digest = hashlib.sha256()
    for _ in range(GIB // len(block)):
        digest.update(block)
    uploaded: dict[str, Any] = {}
    limit = 100 * 1024**2

    def send() -> None:
        answer = client.post(
            "/v1/files", content=(block for _ in range(GIB // len(block))), timeout=600
        )
        assert answer.status_code == 201, answer.text
        uploaded.update(answer.json())

    growth = rss_peak_growth(ledger.process.pid, send)
    print(f"1 GiB upload: server peak RSS grew {growth / 1024**2:.1f} MiB")
    assert uploaded["size_bytes"] == GIB and uploaded["sha256"] == digest.hexdigest()
    assert growth < limit, f"the upload grew the server by {growth / 1024**2:.0f} MiB"

    done: dict[str, Any] = {}

    def run() -> None:
        job_id = submit(
            client,
            "echo",
            uploaded["file_id"],
            output_config={"destination": "local", "format": "binary"},
            timeout_seconds=900,
        )
        done.update(wait_status(client, job_id, {"completed", "failed"}, 600, logs(ledger, miner)))

    growth = rss_peak_growth(ledger.process.pid, run)
    print(
        f"1 GiB job (input fetch + result upload): server peak RSS grew {growth / 1024**2:.1f} MiB"
    )
    assert done["status"] == "completed", done
    assert done["result"]["sha256"] == digest.hexdigest()
    assert growth < limit, f"serving the miner grew the server by {growth / 1024**2:.0f} MiB"

    received = hashlib.sha256()

    def fetch() -> None:
        with client.stream("GET", f"/v1/jobs/{done['job_id']}/download", timeout=600) as answer:
            assert answer.status_code == 200
            for chunk in answer.iter_bytes(1024 * 1024):
                received.update(chunk)

    growth = rss_peak_growth(ledger.process.pid, fetch)
    print(f"1 GiB download: server peak RSS grew {growth / 1024**2:.1f} MiB")
    assert received.hexdigest() == digest.hexdigest()
    assert growth < limit, f"the download grew the server by {growth / 1024**2:.0f} MiB"
