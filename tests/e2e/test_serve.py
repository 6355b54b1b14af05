"""`jobledger serve` as an operator runs it: embedded services, restarts, ports, health."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.embedded import EmbeddedNats, EmbeddedPostgres, ensure_database
from tests.e2e.conftest import SEED_JOB, Served, free_port, start_server, wait_until_healthy

NATS_SERVER = Path(sys.executable).parent / "nats-server"


def processes_mentioning(text: str) -> dict[int, str]:
    """Command lines of live processes (not this one) that contain `text`, by pid."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        pid = int(cmdline.parent.name)
        if pid == os.getpid():
            continue
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if text in command and state != "Z":
            found[pid] = command
    return found


def stop_leftovers(home: str) -> None:
    """Stop embedded servers a killed `serve` left running on `home` (fast shutdown)."""
    for pid, command in processes_mentioning(home).items():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT if "postgres" in command else signal.SIGTERM)
    wait_for(lambda: not processes_mentioning(home), 30, f"leftovers on {home} stopped")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.2)


def health(served: Served) -> tuple[int, dict[str, object]]:
    answer = httpx.get(served.url + "/healthz", timeout=10)
    return answer.status_code, answer.json()


def sigterm(served: Served) -> int:
    """Stop the server as an init system would and return its exit code."""
    served.process.send_signal(signal.SIGTERM)
    return served.process.wait(60)


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], object]]]:
    """Stop whatever a test started, in reverse, even when it fails."""
    undo: list[Callable[[], object]] = []
    yield undo
    for step in reversed(undo):
        step()


def test_embedded_serve_is_healthy_and_keeps_jobs_across_a_restart(
    tmp_path: Path, cleanup: list[Callable[[], object]]
) -> None:
    home = str(tmp_path / "home")
    cleanup.append(lambda: stop_leftovers(home))
    first = start_server(tmp_path, database_url=None, nats_url=None)
    cleanup.append(first.stop)
    assert health(first) == (200, {"status": "ok", "postgres": True, "nats": True})
    commands = processes_mentioning(home).values()
    assert any("nats-server" in command for command in commands), commands
    assert any("postgres" in command for command in commands), commands
    key = first.new_key("client")
    job_id = first.client(key).post("/v1/jobs", json=SEED_JOB).json()["job_id"]

    sigterm(first)
    second = start_server(tmp_path, database_url=None, nats_url=None)
    cleanup.append(second.stop)
    answer = second.client(key).get(f"/v1/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "pending"
    assert answer.json()["estimated_cost"] == 0.05


def test_sigterm_exits_0(tmp_path: Path, cleanup: list[Callable[[], object]]) -> None:
    home = str(tmp_path / "home")
    cleanup.append(lambda: stop_leftovers(home))
    served = start_server(tmp_path, database_url=None, nats_url=None)
    cleanup.append(served.stop)
    assert sigterm(served) == 0, served.log()


def test_sigterm_leaves_no_embedded_server_running(
    tmp_path: Path, cleanup: list[Callable[[], object]]
) -> None:
    home = str(tmp_path / "home")
    cleanup.append(lambda: stop_leftovers(home))
    served = start_server(tmp_path, database_url=None, nats_url=None)
    cleanup.append(served.stop)
    assert len(processes_mentioning(home)) >= 2
    sigterm(served)
    wait_for(lambda: not processes_mentioning(home), 10, f"no process mentions {home}")


def test_the_port_flag_wins_over_the_environment(
    tmp_path: Path, database_url: str, nats_url: str, cleanup: list[Callable[[], object]]
) -> None:
    flag_port, env_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")} | {
        "JOBLEDGER_HOME": str(tmp_path / "home"),
        "JOBLEDGER_DATABASE_URL": database_url,
        "JOBLEDGER_NATS_URL": nats_url,
        "JOBLEDGER_HTTP_PORT": str(env_port),
    }
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(flag_port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    served = Served(
        url=f"http://127.0.0.1:{flag_port}",
        admin_key="",
        database_url=database_url,
        process=process,
        log_path=log_path,
    )
    cleanup.append(served.stop)
    wait_until_healthy(served)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{env_port}/healthz", timeout=2)


def start_nats_on(port: int, store: Path) -> subprocess.Popen[bytes]:
    """A nats-server with JetStream on a given port, as an operator would restart it."""
    store.mkdir(parents=True, exist_ok=True)
    log = (store / "nats.log").open("ab")
    process = subprocess.Popen(
        [str(NATS_SERVER), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
        stdout=log,
        stderr=log,
    )
    log.close()
    return process


def test_health_follows_nats_going_away_and_coming_back(
    tmp_path: Path, database_url: str, cleanup: list[Callable[[], object]]
) -> None:
    nats = EmbeddedNats(tmp_path / "nats")
    nats_url = nats.start()
    cleanup.append(nats.stop)
    port = nats.port
    assert port is not None
    served = start_server(tmp_path, database_url=database_url, nats_url=nats_url)
    cleanup.append(served.stop)
    assert health(served) == (200, {"status": "ok", "postgres": True, "nats": True})

    nats.stop()
    wait_for(lambda: health(served)[0] == 503, 10, "/healthz reports NATS down")
    assert health(served) == (503, {"status": "unavailable", "postgres": True, "nats": False})

    again = start_nats_on(port, tmp_path / "nats-again")
    cleanup.append(lambda: (again.terminate(), again.wait(30)))
    wait_for(lambda: health(served)[0] == 200, 20, "/healthz recovers with NATS")
    assert health(served)[1] == {"status": "ok", "postgres": True, "nats": True}
    # And the API still does its job.
    client = served.client(served.new_key("client"))
    assert client.post("/v1/jobs", json=SEED_JOB).status_code == 201


def served_on_stopped_postgres(
    tmp_path: Path, nats_url: str, cleanup: list[Callable[[], object]]
) -> tuple[Served, str]:
    """A server whose own PostgreSQL was healthy, then stopped; and a client key for it."""
    postgres = EmbeddedPostgres(tmp_path / "postgres")
    dsn = ensure_database(postgres.start(), "jobledger")
    cleanup.append(postgres.stop)
    served = start_server(tmp_path, database_url=dsn, nats_url=nats_url)
    cleanup.append(served.stop)
    key = served.new_key("client")
    assert served.client(key).get("/v1/jobs").status_code == 200
    assert health(served) == (200, {"status": "ok", "postgres": True, "nats": True})
    postgres.stop()
    return served, key


def test_health_answers_503_while_postgres_is_down(
    tmp_path: Path, nats_url: str, cleanup: list[Callable[[], object]]
) -> None:
    served, _ = served_on_stopped_postgres(tmp_path, nats_url, cleanup)
    wait_for(lambda: health(served)[0] == 503, 10, "/healthz reports PostgreSQL down")
    assert health(served) == (503, {"status": "unavailable", "postgres": False, "nats": True})


def test_the_api_answers_503_promptly_while_postgres_is_down(
    tmp_path: Path, nats_url: str, cleanup: list[Callable[[], object]]
) -> None:
    served, key = served_on_stopped_postgres(tmp_path, nats_url, cleanup)
    # Once the pool has noticed the outage (as /healthz has), requests wait for a connection.
    wait_for(lambda: health(served)[0] == 503, 10, "/healthz reports PostgreSQL down")
    answer = httpx.get(served.url + "/v1/jobs", headers={"X-Api-Key": key}, timeout=10)
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["status"] == 503
    assert "Retry-After" in answer.headers
