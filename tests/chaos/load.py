"""Clients under fault: steady submissions, each with its own Idempotency-Key, retried.

The bookkeeping follows Jepsen's: every logical submission (an `Operation`) has a
unique key and keeps every attempt's outcome. An operation is *acknowledged* once an
attempt answers 201 or 200 with a job id; until then it is retried with the same key
(against whichever API process is up) — a lost response may still have committed.
After its acknowledgement each operation is retried once more on purpose: the
ledger must answer with the job it acknowledged first.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

# Statuses after which the same key is tried again: the request may or may not have
# been recorded, or the ledger asked to be asked later.
RETRIED = {429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Attempt:
    """One HTTP request of an operation: when it ran, and what came back."""

    started: float
    ended: float
    url: str
    status: int | None  # None: no answer (connection refused, reset, timed out)
    error: str = ""
    job_id: str | None = None
    replayed: bool = False  # answered with `Idempotent-Replayed: true`: the key's job existed


@dataclass
class Operation:
    """One logical submission and every attempt made for it."""

    key: str
    body: dict[str, Any]
    attempts: list[Attempt] = field(default_factory=list)
    job_id: str | None = None  # from the first acknowledging answer
    confirmed_job_id: str | None = None  # from the deliberate retry after it

    @property
    def acknowledged(self) -> bool:
        return self.job_id is not None


def echo_job(gpu_type: str) -> Callable[[str], dict[str, Any]]:
    """Bodies for jobs no miner needs to run (`gpu_type` that no miner offers)."""

    def body(key: str) -> dict[str, Any]:
        return {
            "model": "echo",
            "input": f"chaos {key}",
            "requirements": {"gpu_type": gpu_type, "gpu_count": 1},
            "timeout_seconds": 600,
        }

    return body


class Submitters:
    """Threads submitting at a steady total rate to whichever URLs `targets()` names."""

    def __init__(
        self,
        targets: Callable[[], list[str]],
        api_key: str,
        *,
        rate: float,
        body: Callable[[str], dict[str, Any]],
        threads: int = 8,
        request_timeout: float = 10.0,
        seed: int = 0,
    ) -> None:
        self._targets = targets
        self._headers = {"X-Api-Key": api_key}
        self._interval = 1.0 / rate
        self._body = body
        self._request_timeout = request_timeout
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._next_start = 0.0
        self._stop_starting = threading.Event()
        self._give_up_at = float("inf")
        self._threads = [
            threading.Thread(target=self._work, name=f"submitter-{i}", daemon=True)
            for i in range(threads)
        ]
        self._turn = itertools.count()
        self.operations: list[Operation] = []

    def start(self) -> None:
        self._next_start = time.monotonic()
        for thread in self._threads:
            thread.start()

    def stop(self, drain_seconds: float) -> list[Operation]:
        """Start no new operation; retry open ones for up to `drain_seconds`; return them all."""
        self._give_up_at = time.monotonic() + drain_seconds
        self._stop_starting.set()
        for thread in self._threads:
            thread.join(drain_seconds + 2 * self._request_timeout)
        with self._lock:
            return list(self.operations)

    def _claim_slot(self) -> float:
        """The start time of this thread's next operation, keeping the total rate steady."""
        with self._lock:
            slot = self._next_start
            self._next_start += self._interval
        return slot

    def _work(self) -> None:
        with httpx.Client(timeout=self._request_timeout) as http:
            while not self._stop_starting.is_set():
                slot = self._claim_slot()
                delay = slot - time.monotonic()
                if delay > 0 and self._stop_starting.wait(delay):
                    return
                key = f"chaos-{uuid.uuid4()}"
                operation = Operation(key=key, body=self._body(key))
                with self._lock:
                    self.operations.append(operation)
                self._run(http, operation)

    def _run(self, http: httpx.Client, operation: Operation) -> None:
        operation.job_id = self._until_answered(http, operation)
        if operation.job_id is not None:
            operation.confirmed_job_id = self._until_answered(http, operation)

    def _until_answered(self, http: httpx.Client, operation: Operation) -> str | None:
        """POST with the operation's key until a job id comes back; None if given up."""
        while time.monotonic() <= self._give_up_at:
            attempt = self._post(http, operation)
            if attempt.job_id is not None:
                return attempt.job_id
            if attempt.status is not None and attempt.status not in RETRIED:
                return None  # a 4xx other than 429: the bookkeeping reports it
            time.sleep(0.05 + 0.2 * self._rng.random())
        return None

    def _post(self, http: httpx.Client, operation: Operation) -> Attempt:
        urls = self._targets()
        url = urls[next(self._turn) % len(urls)]
        started = time.monotonic()
        try:
            answer = http.post(
                url + "/v1/jobs",
                json=operation.body,
                headers=self._headers | {"Idempotency-Key": operation.key},
            )
        except httpx.TransportError as error:
            attempt = Attempt(started, time.monotonic(), url, None, type(error).__name__)
        else:
            job_id = answer.json().get("job_id") if answer.status_code in (200, 201) else None
            refusal = "" if job_id else answer.text[:300]
            replayed = answer.headers.get("Idempotent-Replayed") == "true"
            attempt = Attempt(
                started, time.monotonic(), url, answer.status_code, refusal, job_id, replayed
            )
        operation.attempts.append(attempt)
        return attempt


def attempts_of(operations: list[Operation]) -> list[Attempt]:
    return [attempt for operation in operations for attempt in operation.attempts]


def status_counts(attempts: list[Attempt]) -> Counter[str]:
    """How often each answer came: '201', '503', 'no answer', ..."""
    return Counter(
        str(attempt.status) if attempt.status is not None else "no answer" for attempt in attempts
    )
