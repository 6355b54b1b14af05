"""Item 1: an API process killed with SIGKILL every few seconds while clients keep submitting.

Two `jobledger serve` processes share one database. Clients submit at a steady rate,
alternating between them, and retry each operation with its Idempotency-Key until
acknowledged. Every 2-4 s one process is killed (no shutdown of any kind) and a new
one started in its place. Pass: lost = 0, duplicated = 0, every deliberate retry
names the job first acknowledged, and no answer is a 500.
"""

from __future__ import annotations

import random
import threading
import time

from tests.chaos.checker import bookkeeping, scan_log
from tests.chaos.lab import Lab, new_prefix
from tests.chaos.load import Submitters, attempts_of, echo_job, status_counts
from tests.chaos.result import Result

RATE = 40.0  # submissions per second, in total
PROCESSES = 2
# No miner offers it: the jobs stay pending, the test is about the ledger's own bookkeeping.
UNSERVED_GPU = "h100"


def run(lab: Lab, seconds: float) -> Result:
    result = Result("api-killed")
    rng = random.Random(1)
    database = lab.database()
    prefix = new_prefix()
    processes = [lab.serve(database, prefix=prefix) for _ in range(PROCESSES)]
    key = processes[0].new_key("client")
    urls = [served.url for served in processes]
    lock = threading.Lock()

    def targets() -> list[str]:
        with lock:
            return list(urls)

    submitters = Submitters(targets, key, rate=RATE, body=echo_job(UNSERVED_GPU))
    started = time.monotonic()
    submitters.start()
    kills = 0
    while time.monotonic() - started < seconds:
        time.sleep(rng.uniform(2.0, 4.0))
        slot = kills % PROCESSES
        victim = processes[slot]
        victim.process.kill()  # SIGKILL: no drain, no goodbye
        victim.process.wait()
        kills += 1
        # Its port stays in the clients' rotation, refusing connections, until replaced.
        processes[slot] = lab.serve(database, prefix=prefix)
        with lock:
            urls[slot] = processes[slot].url
    operations = submitters.stop(drain_seconds=30)
    result.seconds = time.monotonic() - started

    answers = status_counts(attempts_of(operations))
    result.figure("kills (SIGKILL)", kills)
    result.figure("submission rate (per s)", RATE)
    result.figure("requests", sum(answers.values()))
    result.figure("requests without an answer", answers["no answer"])
    result.expect_equal("answers 500", answers["500"], 0)
    bookkeeping(result, operations, scan_log(database))
    result.check("some kill happened", kills > 0, f"kills = {kills}")
    return result
