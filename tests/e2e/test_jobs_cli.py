"""`jobledger jobs ...` against a served ledger and a miner: output, --json and exit codes.

Most commands run in-process through the same parser and runner as the console
script (fault-injecting transports need that); a few run as real subprocesses.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.cli import parser
from app.client.cli import run_jobs
from tests.e2e.client_faults import FlipDownloadedByte
from tests.e2e.conftest import Served, free_port
from tests.e2e.dispatch import Miner, start_miner

pytestmark = pytest.mark.e2e

NOBODY_OFFERS = "h100"  # the module's miner offers cpu: such jobs stay pending


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture(scope="module")
def miner(
    served: Served, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Miner]:
    started = start_miner(
        served, nats_url, tmp_path_factory.mktemp("miner"), "cpu", max_concurrent=4
    )
    yield started
    started.kill()


@pytest.fixture(scope="module")
def env(served: Served, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a client: the API and its key, and no profile file of the user's."""
    home = tmp_path_factory.mktemp("client-home")
    return {
        "JOBLEDGER_URL": served.url,
        "JOBLEDGER_API_KEY": served.new_key("client"),
        "JOBLEDGER_CONFIG": str(home / "absent.toml"),
    }


def jobs(*args: str, env: dict[str, str], transport: httpx.BaseTransport | None = None) -> Ran:
    """Run `jobledger jobs ARGS` in-process and capture what it prints."""
    out, err = io.StringIO(), io.StringIO()
    parsed = parser().parse_args(["jobs", *args])
    code = run_jobs(parsed, environ=env, stdout=out, stderr=err, transport=transport)
    return Ran(code, out.getvalue(), err.getvalue())


def jobledger(*args: str, env: dict[str, str], cwd: Path | None = None) -> Ran:
    """Run the real `jobledger` entry point in a subprocess."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


def submitted(env: dict[str, str], *args: str) -> str:
    ran = jobs("--json", "submit", "--gpu", "cpu", *args, env=env)
    assert ran.code == 0, ran
    return str(ran.json()["job_id"])


def test_submit_wait_runs_the_job_to_completion_and_exits_0(
    env: dict[str, str], miner: Miner
) -> None:
    ran = jobledger(
        "jobs", "submit", "--model", "echo", "--input", "hello", "--gpu", "cpu", "--wait", env=env
    )
    assert ran.code == 0, ran
    job_id = ran.out.splitlines()[0]
    assert job_id.startswith("job_")
    assert "estimated cost 0.01" in ran.err  # one started hour of the pseudo GPU `cpu`
    assert "JobCompleted" in ran.out and f"{job_id} completed" in ran.out
    # The whole timeline after the submission, however fast the job ran: no event skipped.
    timeline = [line.split()[2] for line in ran.out.splitlines()[1:-1]]
    assert timeline == ["JobAssigned", "JobStarted", "JobCompleted"], ran.out
    assert "\x1b[" not in ran.out + ran.err  # no terminal: no bar, no escape codes


def test_a_failing_job_exits_1_and_says_why(env: dict[str, str], miner: Miner) -> None:
    ran = jobs(
        "submit", "--model", "fail", "--input", "as requested", "--gpu", "cpu", "--wait", env=env
    )
    assert ran.code == 1, ran
    assert "failed: as requested" in ran.out
    job_id = ran.out.splitlines()[0]
    watched = jobs("watch", job_id, env=env)
    assert watched.code == 1 and watched.out.splitlines()[-1].startswith(f"{job_id} failed")


def test_json_output_is_one_document_per_command_and_ndjson_for_watch(
    env: dict[str, str], miner: Miner
) -> None:
    job_id = submitted(env, "--model", "echo", "--input", "json please")
    final = jobs("--json", "watch", job_id, env=env)
    assert final.code == 0, final
    updates = [json.loads(line) for line in final.out.splitlines()]
    sequences = [u["sequence"] for u in updates]  # from the current state on, one by one
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
    assert updates[-1]["job"]["status"] == "completed"

    shown = jobs("status", job_id, "--json", env=env).json()  # --json after the subcommand too
    assert shown["job_id"] == job_id and shown["status"] == "completed"
    assert isinstance(shown["estimated_cost"], float | int)  # a JSON number, as the API sends
    events = jobs("--json", "events", job_id, env=env).json()
    assert events["job_id"] == job_id and events["events"][0]["type"] == "JobSubmitted"
    listed = jobs("--json", "list", "--limit", "5", env=env).json()
    assert job_id in [job["job_id"] for job in listed["jobs"]]
    assert set(listed) == {"jobs", "total", "has_more", "next_cursor"}
    today = datetime.now(UTC).date().isoformat()
    history = jobs("--json", "history", "--from", today, "--to", today, env=env).json()
    assert {"from", "to", "jobs", "totals"} <= set(history)
    assert history["totals"]["jobs"] >= 1


def test_human_tables_list_history_and_events(env: dict[str, str], miner: Miner) -> None:
    job_id = submitted(env, "--model", "echo", "--input", "table", "--priority", "high")
    assert jobs("watch", job_id, env=env).code == 0
    listed = jobs("list", "--all", env=env)
    header, *rows = listed.out.splitlines()
    assert header.split() == ["ID", "STATUS", "PROGRESS", "MODEL", "PRIORITY", "CREATED", "COST"]
    row = next(line for line in rows if line.startswith(job_id)).split()
    assert row[1:5] == ["completed", "100%", "echo", "high"] and row[-2] == "ago"
    timeline = jobs("events", job_id, env=env).out.splitlines()
    assert timeline[0].split() == ["SEQ", "TIME", "AFTER", "EVENT", "DETAILS"]
    assert "JobSubmitted" in timeline[1] and "model=echo" in timeline[1]
    assert "JobCompleted" in timeline[-1]
    today = datetime.now(UTC).date().isoformat()
    history = jobs("history", "--from", today, "--to", today, env=env).out
    assert job_id in history and "completed" in history
    status = jobs("status", job_id, env=env).out
    assert "result" in status and "sha256" in status


def test_an_input_file_is_uploaded_and_the_download_is_verified(
    env: dict[str, str], miner: Miner, tmp_path: Path
) -> None:
    data = os.urandom(200_000)
    (tmp_path / "input.bin").write_bytes(data)
    ran = jobs(
        "submit", "--model", "echo", "--input", str(tmp_path / "input.bin"),
        "--format", "binary", "--gpu", "cpu", "--wait", env=env,
    )  # fmt: skip
    assert ran.code == 0, ran
    assert "uploaded" in ran.err and "file_" in ran.err
    job_id = ran.out.splitlines()[0]
    target = tmp_path / "out"
    target.mkdir()
    got = jobs("download", job_id, "-o", str(target), env=env)
    assert got.code == 0, got
    assert got.out.strip() == str(target / f"{job_id}.bin")
    assert (target / f"{job_id}.bin").read_bytes() == data
    assert hashlib.sha256(data).hexdigest() in got.err and "verified" in got.err


def test_a_tampered_download_exits_8_and_leaves_no_file(
    env: dict[str, str], miner: Miner, tmp_path: Path
) -> None:
    source = _write(tmp_path / "in.txt")
    job_id = submitted(env, "--model", "echo", "--input", f"@{source}", "--format", "binary")
    assert jobs("watch", job_id, env=env).code == 0
    target = tmp_path / "result.bin"
    ran = jobs("download", job_id, "-o", str(target), env=env, transport=FlipDownloadedByte())
    assert ran.code == 8, ran
    assert ran.err.startswith("jobledger: the bytes downloaded") and "hint:" in ran.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def _write(path: Path) -> Path:
    path.write_text("from a file")
    return path


def test_not_found_bad_keys_conflicts_and_invalid_requests_exit_as_documented(
    env: dict[str, str], miner: Miner
) -> None:
    missing = jobledger("jobs", "status", "job_" + "0" * 32, env=env)
    assert missing.code == 5 and missing.err.startswith("jobledger: ") and "hint:" in missing.err

    refused = jobs("list", env=env | {"JOBLEDGER_API_KEY": "jl_wrong_key"})
    assert refused.code == 4 and "JOBLEDGER_API_KEY" in refused.err
    keyless = jobs("list", env={k: v for k, v in env.items() if k != "JOBLEDGER_API_KEY"})
    assert keyless.code == 4 and "no API key was sent" in keyless.err

    job_id = submitted(env, "--model", "echo", "--input", "done soon")
    assert jobs("watch", job_id, env=env).code == 0
    finished = jobs("--json", "cancel", job_id, env=env)
    assert finished.code == 6
    assert finished.json()["error"]["status"] == 409  # --json errors are documents too
    pending = submitted(env, "--model", "echo", "--input", "x", "--gpu", NOBODY_OFFERS)
    canceled = jobs("cancel", pending, env=env)
    assert canceled.code == 0 and canceled.out.strip() == f"{pending} canceled"
    assert jobs("download", pending, env=env).code == 6

    invalid = jobs(
        "submit", "--model", "echo", "--input", "x", "--gpu", "cpu", "--timeout", "0", env=env
    )
    assert invalid.code == 2 and "timeout_seconds" in invalid.err


def test_the_same_idempotency_key_gives_the_same_job(env: dict[str, str]) -> None:
    args = [
        "--model",
        "echo",
        "--input",
        "once",
        "--gpu",
        NOBODY_OFFERS,
        "--idempotency-key",
        "k-1",
    ]
    assert submitted(env, *args) == submitted(env, *args)


def test_a_profile_file_configures_the_client_and_an_unreachable_api_exits_3(
    env: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[profiles.work]\nurl = "{env["JOBLEDGER_URL"]}"\napi_key = "{env["JOBLEDGER_API_KEY"]}"\n'
    )
    config.chmod(0o644)
    by_profile = {"JOBLEDGER_CONFIG": str(config)}
    listed = jobs("--profile", "work", "--json", "list", env=by_profile)
    assert listed.code == 0, listed
    assert "readable by other users" in listed.err and "chmod 600" in listed.err
    config.chmod(0o600)
    assert jobs("list", env=by_profile | {"JOBLEDGER_PROFILE": "work"}).err == ""
    assert jobs("list", "--profile", "home", env=by_profile).code == 2

    nowhere = f"http://127.0.0.1:{free_port()}"
    unreachable = jobs("--url", nowhere, "list", env=env)
    assert unreachable.code == 3
    assert f"is `scripts/serve` running at {nowhere}?" in unreachable.err
