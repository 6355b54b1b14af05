"""Group commit: submissions that arrive together are saved together, in one transaction.

Saving an event takes the event table's lock and a commit (a WAL flush), and the lock
serialises every writer, so one transaction per request caps submissions at what one
connection can commit, however many threads wait. `GroupCommit` gathers instead: while
a batch commits, new submissions queue; the next batch takes all of them (up to
`max_batch`) and saves them with `JobLedger.submit_many`, one lock and one commit for
the lot. Each caller is answered only after its batch committed, so an acknowledged
submission is always durable. A lone submission waits for nobody: a free writer takes
it at once, and batches grow only as fast as submissions queue up.

Two writers take turns, so one batch is built and encoded while the other commits
(the table lock still orders their commits). Each job's estimate uses what similar
jobs took (the runtime stats view), read per batch only for the kinds of job whose
figures are older than a second: an estimate needs no fresher figures, and a query
per batch would lengthen every batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection

import msgspec
from anyio import to_thread

from app.database_watch import DatabaseDown
from app.store import JobLedger, SubmitRequest, Submitted
from app.tasks import cancel_all
from domain.errors import DomainError
from domain.pricing import RuntimeStats

log = logging.getLogger("jobledger.group_commit")

# Submissions in one transaction at most; more wait for the next (they are not dropped).
MAX_BATCH = 500
# Inline input bytes in one transaction at most (a larger submission goes alone): the
# event store's insert stalls for good once one call carries about 4.5 MB (psycopg
# pipeline with the recorder's composite-array insert; see test_group_commit.py).
MAX_BATCH_BYTES = 1024 * 1024
# Batches in progress at once: one being built while another commits.
WRITERS = 2
# How old the runtime figures behind an estimate may be.
HISTORY_SECONDS = 1.0
# Past this many kinds of job remembered, the figures older than HISTORY_SECONDS (which
# would be read again anyway) are forgotten.
MAX_KINDS = 1024

Kind = tuple[str, str]  # (model, gpu_type)
# What completed jobs took, per kind: `JobQueries.runtime_stats`.
History = Callable[[Collection[Kind]], Awaitable[dict[Kind, RuntimeStats]]]


class _Waiting:
    """A queued submission, its inline input's size, and the future its handler awaits."""

    __slots__ = ("answer", "request", "size")

    def __init__(self, request: SubmitRequest, answer: asyncio.Future[Submitted]) -> None:
        self.request = request
        self.answer = answer
        self.size = len((request.spec.input_text or "").encode())


class GroupCommit:
    """Writers that save queued submissions in batches, one commit per batch."""

    def __init__(self, ledger: JobLedger, history: History, *, max_batch: int = MAX_BATCH) -> None:
        self._ledger = ledger
        self._history = history
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        # kind -> (its figures, None if none completed yet; when they were read)
        self._known: dict[Kind, tuple[RuntimeStats | None, float]] = {}

    async def start(self) -> None:
        """Start the writers."""
        self._tasks = [
            asyncio.create_task(self._write(), name=f"group-commit-{n}") for n in range(WRITERS)
        ]

    async def stop(self) -> None:
        """Stop the writers; submissions still queued are answered 503 (retry elsewhere)."""
        await cancel_all(self._tasks)
        while not self._queue.empty():
            _answer(self._queue.get_nowait(), _stopping())

    async def submit(self, request: SubmitRequest) -> Submitted:
        """Record a submission; returns once the transaction holding it has committed."""
        answer: asyncio.Future[Submitted] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Waiting(request, answer))
        return await answer

    async def _write(self) -> None:
        carried: _Waiting | None = None  # what did not fit the last batch: it starts the next
        while True:
            batch = [carried or await self._queue.get()]
            carried = None
            size = batch[0].size
            while len(batch) < self._max_batch and not self._queue.empty():
                waiting = self._queue.get_nowait()
                if size + waiting.size > MAX_BATCH_BYTES:
                    carried = waiting
                    break
                batch.append(waiting)
                size += waiting.size
            try:
                requests = await self._with_history([waiting.request for waiting in batch])
                outcomes = await to_thread.run_sync(self._ledger.submit_many, requests)
            except asyncio.CancelledError:
                for waiting in [*batch, *([carried] if carried else [])]:
                    _answer(waiting, _stopping())
                raise
            except Exception as error:  # the database is down, say: every caller hears it
                for waiting in batch:
                    _answer(waiting, error)
                continue
            for waiting, outcome in zip(batch, outcomes, strict=True):
                _answer(waiting, outcome)

    async def _with_history(self, requests: list[SubmitRequest]) -> list[SubmitRequest]:
        now = time.monotonic()
        kinds = {(r.spec.model, r.spec.gpu_type) for r in requests if r.history is None}
        stale = [
            k
            for k in kinds
            if now - self._known.get(k, (None, -HISTORY_SECONDS))[1] >= HISTORY_SECONDS
        ]
        if stale:
            found = await self._history(stale)
            if len(self._known) > MAX_KINDS:  # models are the clients' names: keep it bounded
                self._known = {k: v for k, v in self._known.items() if now - v[1] < HISTORY_SECONDS}
            for kind in stale:
                self._known[kind] = (found.get(kind), now)
        return [
            msgspec.structs.replace(r, history=self._known[(r.spec.model, r.spec.gpu_type)][0])
            if r.history is None
            else r
            for r in requests
        ]


def _stopping() -> DatabaseDown:
    # The batch may or may not have committed: the same Idempotency-Key tells, on retry.
    return DatabaseDown(
        "this API process is stopping; retry the submission (with the same Idempotency-Key)"
    )


def _answer(waiting: _Waiting, outcome: Submitted | DomainError | Exception) -> None:
    if waiting.answer.done():  # its client went away; the job is recorded all the same
        return
    if isinstance(outcome, Exception):
        waiting.answer.set_exception(outcome)
    else:
        waiting.answer.set_result(outcome)
