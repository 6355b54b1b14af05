"""Item 2: PostgreSQL stopped and started again while clients submit and read.

One `jobledger serve` process on a private PostgreSQL. Clients submit at a steady
rate (retrying with their keys) and read job status and lists. A third of the way in,
PostgreSQL is stopped (fast shutdown: sessions cut, open transactions rolled back)
and started again on the same port after the outage. Pass: lost = 0; no 2xx for a
request made after PostgreSQL stopped and answered before it was back; every request
made while it was down answered 503 at once (no hang, no other status); no 500 at any
time; the first 2xx after PostgreSQL is back comes within 30 s. Requests in flight as
it went down (up to a second after: the ledger notices within a quarter of a second)
may wait for it, and are counted apart; one that committed before the shutdown may
still be answered 201 during the outage, and must then be in the log.
"""

from __future__ import annotations

import threading
import time

import httpx

from tests.chaos.checker import bookkeeping, scan_log
from tests.chaos.lab import Lab, new_prefix
from tests.chaos.load import Attempt, Operation, Submitters, attempts_of, echo_job, status_counts
from tests.chaos.result import Result

RATE = 25.0
RECOVERY_LIMIT_SECONDS = 30.0
DETECTION_SECONDS = 1.0
UNSERVED_GPU = "h100"


class Readers:
    """A thread reading status and list views of acknowledged jobs, keeping every answer."""

    def __init__(self, url: str, api_key: str, operations: list[Operation]) -> None:
        self.attempts: list[Attempt] = []
        self._url = url
        self._headers = {"X-Api-Key": api_key}
        self._operations = operations
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[Attempt]:
        self._stop.set()
        self._thread.join(30)
        return self.attempts

    def _read(self) -> None:
        with httpx.Client(base_url=self._url, headers=self._headers, timeout=10) as http:
            while not self._stop.wait(0.05):
                known = [op.job_id for op in self._operations[-50:] if op.job_id]
                paths = ["/v1/jobs?limit=5"] + [f"/v1/jobs/{job_id}" for job_id in known[-1:]]
                for path in paths:
                    started = time.monotonic()
                    try:
                        answer = http.get(path)
                    except httpx.TransportError as error:
                        self.attempts.append(
                            Attempt(started, time.monotonic(), path, None, type(error).__name__)
                        )
                        continue
                    self.attempts.append(
                        Attempt(
                            started,
                            time.monotonic(),
                            path,
                            answer.status_code,
                            "" if answer.is_success else answer.text[:300],
                        )
                    )


def run(lab: Lab, seconds: float) -> Result:
    result = Result("postgres-restarted")
    postgres, database = lab.restartable_postgres()
    served = lab.serve(database, prefix=new_prefix())
    key = served.new_key("client")
    submitters = Submitters(lambda: [served.url], key, rate=RATE, body=echo_job(UNSERVED_GPU))
    readers = Readers(served.url, key, submitters.operations)
    outage = max(4.0, seconds / 3)

    started = time.monotonic()
    submitters.start()
    readers.start()
    time.sleep(seconds / 3)
    stopping_at = time.monotonic()
    postgres.stop()
    down_at = time.monotonic()
    time.sleep(outage)
    restart_at = time.monotonic()
    postgres.start()
    up_at = time.monotonic()
    time.sleep(max(0.0, seconds - (up_at - started)))
    operations = submitters.stop(drain_seconds=RECOVERY_LIMIT_SECONDS + 10)
    reads = readers.stop()
    result.seconds = time.monotonic() - started

    everything = attempts_of(operations) + reads
    noticed = down_at + DETECTION_SECONDS
    in_flight = [a for a in everything if a.started < noticed and a.ended > stopping_at]
    while_down = [a for a in everything if a.started >= noticed and a.ended <= restart_at]
    after = [a for a in everything if a.started >= up_at]
    down_answers = status_counts(while_down)
    result.figure("outage (s)", round(restart_at - down_at, 1))
    result.figure("requests", len(everything))
    result.figure("requests in flight as it went down", len(in_flight))
    outcomes = status_counts(in_flight)
    result.figure("  their answers", ", ".join(f"{n} x {s}" for s, n in sorted(outcomes.items())))
    result.figure(
        "  of those answered 2xx after the restart",
        sum(a.status in (200, 201) and a.ended > restart_at for a in in_flight),
    )
    result.figure("requests made while down", len(while_down))
    result.figure("answered 503 while down", down_answers["503"])
    made_after_stop = [a for a in everything if a.started >= down_at and a.ended < restart_at]
    result.expect_equal(
        "2xx for requests made after it stopped, before it was back",
        sum(a.status is not None and 200 <= a.status < 300 for a in made_after_stop),
        0,
    )
    result.figure(
        "2xx for requests made before it stopped, answered while down",
        sum(
            a.status in (200, 201) and a.started < stopping_at and down_at < a.ended < restart_at
            for a in everything
        ),
    )
    result.expect_equal(
        "answers other than 503 while down",
        sum(n for status, n in down_answers.items() if status != "503"),
        0,
    )
    clear = [a for a in while_down if a.status == 503 and "database" in a.error]
    result.expect_equal("503s not naming the database", down_answers["503"] - len(clear), 0)
    result.expect_equal("answers 500", status_counts(everything)["500"], 0)
    first_success = min((a.ended for a in after if a.status in (200, 201)), default=None)
    recovery = (first_success - up_at) if first_success is not None else float("inf")
    result.expect_at_most("service back after PostgreSQL (s)", round(recovery, 1), 30.0)
    result.check("outage observed", len(while_down) > 0, f"{len(while_down)} requests")
    bookkeeping(result, operations, scan_log(database))
    return result
