"""The write side: `JobLedger`, an eventsourcing Application on PostgreSQL.

Every command loads an aggregate, runs a domain command and saves the new events
in one transaction with optimistic concurrency on the aggregate version. Queries
return plain data, never aggregates. Library errors stop at this boundary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar
from uuid import UUID, uuid4

import eventsourcing.persistence
import msgspec
import psycopg
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from psycopg.conninfo import conninfo_to_dict
from psycopg.sql import SQL, Identifier

from domain.errors import (
    ConcurrentChange,
    DomainError,
    FileNotFound,
    IdempotencyConflict,
    InvalidJobRequest,
    JobNotFound,
    MinerNotFound,
)
from domain.files import File, file_aggregate_id, file_aggregate_id_of
from domain.jobs import (
    InputFile,
    Job,
    JobSpec,
    aggregate_id_of,
    idempotent_aggregate_id,
    job_id_of,
)
from domain.miners import Capabilities, Miner, miner_aggregate_id_of
from domain.pricing import NO_HISTORY, Estimate, RateTable, RuntimeStats, estimate
from projections.jobs import JobRow, fold


class Submitted(msgspec.Struct, frozen=True):
    """The outcome of a submission; `created` is False when an Idempotency-Key replayed it."""

    job_id: str
    estimated_cost: Decimal
    estimated_time_seconds: int
    created: bool
    position: int


class SubmitRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One client's submission, as the API hands it to the ledger."""

    owner: str
    spec: JobSpec
    idempotency_key: str | None
    # What jobs like this took so far, for the estimate (None: no history).
    history: RuntimeStats | None = None


class FileFacts(msgspec.Struct, frozen=True, kw_only=True):
    """An uploaded file as its owner and the API see it."""

    file_id: str
    owner: str
    size_bytes: int
    sha256: str
    content_type: str
    filename: str | None
    location: str
    created_at: datetime
    used_by: str | None


class Uploaded(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of an upload; `created` is False when the owner already had these bytes."""

    file: FileFacts
    created: bool


class AttemptInput(msgspec.Struct, frozen=True, kw_only=True):
    """The input of an attempt, for the miner holding it: inline text or a stored file."""

    text: str | None
    location: str | None
    size_bytes: int
    sha256: str | None


class EventRecord(msgspec.Struct, frozen=True):
    """One stored event of a job, as clients and auditors read it."""

    sequence: int
    type: str
    timestamp: datetime
    data: dict[str, Any]


def event_type_name(event: object) -> str:
    """'Job.Submitted' becomes 'JobSubmitted': past tense, prefixed by its aggregate."""
    return type(event).__qualname__.replace(".", "")


# What a lost or restarting database raises, through psycopg or the event store.
DATABASE_DOWN = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    eventsourcing.persistence.OperationalError,
    eventsourcing.persistence.InterfaceError,
)
T = TypeVar("T")
A = TypeVar("A", bound=Aggregate)
_COMMAND_ATTEMPTS = 10
_ENVELOPE_FIELDS = {"originator_id", "originator_version", "timestamp", "originator_topic"}


def postgres_env(dsn: str) -> dict[str, str]:
    """The eventsourcing library's settings for the database a DSN names."""
    parts = conninfo_to_dict(dsn)
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(parts.get("dbname", "postgres")),
        "POSTGRES_HOST": str(parts.get("host", "127.0.0.1")),
        "POSTGRES_PORT": str(parts.get("port", "5432")),
        "POSTGRES_USER": str(parts.get("user", "postgres")),
        "POSTGRES_PASSWORD": str(parts.get("password", "")),
        # Writers queue on the events table lock, so more connections add no throughput.
        "POSTGRES_POOL_SIZE": "5",
        "POSTGRES_MAX_OVERFLOW": "10",
        "POSTGRES_CONNECT_TIMEOUT": "5",
        "POSTGRES_PRE_PING": "y",
        # Concurrent writers queue on the events table lock; give up after this long.
        "POSTGRES_LOCK_TIMEOUT": "10",
    }
    return env


class JobLedger(Application[UUID]):
    """Commands on jobs and miners, recorded as events in `jobledger_events`."""

    name = "JobLedger"

    def __init__(self, env: dict[str, str], rates: RateTable | None = None) -> None:
        super().__init__(env)
        self.rates = rates or RateTable()

    def submit(
        self,
        *,
        owner: str,
        spec: JobSpec,
        idempotency_key: str | None,
        history: RuntimeStats | None = None,
    ) -> Submitted:
        """Record a new job; with an Idempotency-Key, the same key always yields the same job."""
        request = SubmitRequest(
            owner=owner, spec=spec, idempotency_key=idempotency_key, history=history
        )
        guess = self._estimate(request)
        aggregate_id = self._aggregate_id(request)
        for _ in range(_COMMAND_ATTEMPTS):
            job, input_file = self._new_job(request, aggregate_id, guess)
            try:
                recordings = self.save(job, *([input_file] if input_file else []))
                break
            except IntegrityError:
                if self._exists(aggregate_id):
                    # Version 1 of this id exists: the key was used before (or concurrently).
                    return self._replay_submission(aggregate_id, job.request_fingerprint)
                # The file changed meanwhile (deleted, or first used by another job): again.
        else:
            raise ConcurrentChange("the input file is changing too fast; retry the request")
        return _submitted(job, recordings[-1].notification.id)

    def submit_many(self, requests: Sequence[SubmitRequest]) -> list[Submitted | DomainError]:
        """Record many submissions in one transaction: one table lock, one commit.

        This is group commit: the API gathers the submissions that arrive while the
        previous batch commits and saves them together, so each still gets its answer
        only once its event is durable. Each outcome is the `Submitted` that `submit`
        would have returned, or the domain error it would have raised, in order.

        Anything the batch cannot settle on its own goes through `submit`, one by one,
        after the batch: a second request with an id already in the batch (the same
        Idempotency-Key twice), or a file already used in the batch. If the save is
        refused (a key used before, a file changed), nothing of the batch was written
        and every submission runs alone, where `submit` replays or retries it.
        """
        outcomes: list[Submitted | DomainError | None] = [None] * len(requests)
        batch: dict[int, tuple[Job, File | None]] = {}
        later: list[int] = []
        ids: set[UUID] = set()
        files: set[str] = set()  # the input files the batch uses, by file id
        for index, request in enumerate(requests):
            try:
                aggregate_id = self._aggregate_id(request)
                if aggregate_id in ids or request.spec.input_file_id in files:
                    later.append(index)
                    continue
                job, input_file = self._new_job(request, aggregate_id, self._estimate(request))
            except DomainError as error:
                outcomes[index] = error
                continue
            ids.add(aggregate_id)
            if input_file is not None:
                files.add(input_file.file_id)
            batch[index] = (job, input_file)
        if batch:
            aggregates = [a for job, file in batch.values() for a in (job, file) if a is not None]
            try:
                recordings = self.save(*aggregates)
            except IntegrityError:
                later.extend(batch)
            else:
                # One transaction: the views show all of it at once, so all wait for its end.
                position = recordings[-1].notification.id
                for index, (job, _) in batch.items():
                    outcomes[index] = _submitted(job, position)
        for index in sorted(later):
            request = requests[index]
            try:
                outcomes[index] = self.submit(
                    owner=request.owner,
                    spec=request.spec,
                    idempotency_key=request.idempotency_key,
                    history=request.history,
                )
            except DomainError as error:
                outcomes[index] = error
        return [outcome for outcome in outcomes if outcome is not None]

    def _estimate(self, request: SubmitRequest) -> Estimate:
        """The price and duration a job is recorded with; an unpriced GPU type is a 422."""
        spec = request.spec
        if self.rates.rate(spec.gpu_type) is None:
            known = ", ".join(sorted(self.rates.per_gpu_hour))
            raise InvalidJobRequest(
                f"no price for gpu_type {spec.gpu_type!r}; known types: {known}",
                details={"field": "requirements.gpu_type"},
            )
        return estimate(
            self.rates,
            gpu_type=spec.gpu_type,
            gpu_count=spec.gpu_count,
            priority=spec.priority,
            timeout_seconds=spec.timeout_seconds,
            history=request.history or NO_HISTORY,
        )

    @staticmethod
    def _aggregate_id(request: SubmitRequest) -> UUID:
        if request.idempotency_key:
            return idempotent_aggregate_id(request.owner, request.idempotency_key)
        return uuid4()

    def _new_job(
        self, request: SubmitRequest, aggregate_id: UUID, guess: Estimate
    ) -> tuple[Job, File | None]:
        """The new job, and the input file it uses (marked used, to be saved with it)."""
        input_file = self._input_file(request.spec.input_file_id, request.owner)
        job = Job.submit(
            aggregate_id=aggregate_id,
            owner=request.owner,
            spec=request.spec,
            estimate=guess,
            idempotency_key=request.idempotency_key,
            input_file=(
                InputFile(size_bytes=input_file.size_bytes, sha256=input_file.sha256)
                if input_file
                else None
            ),
        )
        if input_file is not None:
            input_file.use(job.job_id)  # saved with the job: a delete cannot slip between
        return job, input_file

    def _input_file(self, file_id: str | None, owner: str) -> File | None:
        """The live file a submission names, owned by the submitter; anything else is a 422."""
        if file_id is None:
            return None
        try:
            file = self._file(file_id, owner=owner)
            file.require_present()
        except FileNotFound as error:
            raise InvalidJobRequest(
                f"input names file {file_id!r}, which does not exist for you: "
                "upload it with POST /v1/files first",
                details={"field": "input", "file_id": file_id, "reason": error.message},
            ) from None
        return file

    def _exists(self, aggregate_id: UUID) -> bool:
        return bool(self.recorder.select_events(aggregate_id, limit=1))

    def _replay_submission(self, aggregate_id: UUID, fingerprint: str) -> Submitted:
        original: Job = self.repository.get(aggregate_id)
        if original.request_fingerprint != fingerprint:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used with a different request body",
                details={"job_id": original.job_id},
            )
        return Submitted(
            job_id=original.job_id,
            estimated_cost=original.estimated_cost,
            estimated_time_seconds=original.estimated_time_seconds,
            created=False,
            position=0,
        )

    def cancel(self, job_id: str, *, owner: str | None) -> tuple[JobRow, int]:
        """Cancel a job (at once if pending); returns its view and the log position written.

        The view is the job as this cancel left it: a completion that lands right after
        must not turn the answer to an accepted cancel into "completed".
        """
        written: list[int] = []

        def cancel(job: Job) -> None:
            job.request_cancel()
            written.append(job.version)

        position = self._command(job_id, owner, cancel)
        history = self.job_history(job_id, owner=None)
        return _fold([e for e in history if e.originator_version <= written[-1]]), position

    def change_job(self, job_id: str, command: Callable[[Job], None]) -> int:
        """Run a command on a job for the ledger's own workers; returns the log position."""
        return self._command(job_id, None, command)

    def job(self, job_id: str) -> Job:
        """A job's current state, for workers that decide what to do with it."""
        return self._job(job_id, owner=None)

    def register_miner(self, name: str, capabilities: Capabilities) -> tuple[Miner, int]:
        """Record a new miner; returns it and the log position written."""
        miner = Miner.register(name, capabilities)
        recordings = self.save(miner)
        return miner, recordings[-1].notification.id

    def miner(self, miner_id: str) -> Miner:
        """A miner's current state; unknown ids are MinerNotFound."""
        not_found = MinerNotFound(f"miner {miner_id!r} not found", details={"miner_id": miner_id})
        try:
            miner: Aggregate = self.repository.get(miner_aggregate_id_of(miner_id))
        except AggregateNotFoundError:
            raise not_found from None
        if not isinstance(miner, Miner):  # another aggregate's UUID spelt miner_…
            raise not_found
        return miner

    def change_miner(self, miner_id: str, command: Callable[[Miner], None]) -> int:
        """Run a command on a miner's latest version and save it; returns the log position."""
        return self._save_retrying(lambda: self.miner(miner_id), command, f"miner {miner_id}")

    def change_jobs(
        self, commands: Sequence[tuple[str, Callable[[Job], T]]]
    ) -> tuple[list[T | DomainError], int]:
        """Run many commands and save all they record in one transaction (one commit).

        Several commands may name one job; they run in order on the same state. Each
        command's result, or the domain error it raised (which recorded nothing), is
        returned in order with the log position written. If another writer saved one
        of these jobs meanwhile, the whole batch is refused by the version check and
        every command runs again alone, on fresh state, as `change_job` would.
        """
        jobs = self.jobs_now([job_id for job_id, _ in commands])
        results: list[T | DomainError] = []
        for job_id, command in commands:
            try:
                if job_id not in jobs:
                    raise JobNotFound(f"job {job_id!r} not found", details={"job_id": job_id})
                results.append(command(jobs[job_id]))
            except DomainError as error:
                results.append(error)
        changed = [job for job in jobs.values() if job.pending_events]
        if not changed:
            return results, 0
        try:
            recordings = self.save(*changed)
        except IntegrityError:
            return self._one_by_one(commands)
        return results, recordings[-1].notification.id if recordings else 0

    def jobs_now(self, job_ids: Collection[str]) -> dict[str, Job]:
        """The current state of many jobs, read in one query; ids of no job are left out.

        The library reads one aggregate per query; a batch of reports or assignments
        would then cost a round trip per job.
        """
        ids = set()
        for job_id in job_ids:
            with contextlib.suppress(JobNotFound):  # a malformed id is no job: left out
                ids.add(aggregate_id_of(job_id))
        histories = self._histories(dict.fromkeys(ids, None))
        found = {aggregate_id: _folded(events) for aggregate_id, events in histories.items()}
        return {
            job_id_of(aggregate_id): job
            for aggregate_id, job in found.items()
            if isinstance(job, Job)
        }

    def jobs_at(self, wanted: Sequence[tuple[str, int]]) -> dict[tuple[str, int], Job]:
        """Each (job_id, version) wanted: the job right after that event, all in one query.

        The relay needs, for every order in a batch of the log, the job as of the event
        that caused it: one query per order would be N+1. A job with fewer events than
        wanted, or no job at all, is JobNotFound.
        """
        upto: dict[UUID, int] = {}
        for job_id, version in wanted:
            aggregate_id = aggregate_id_of(job_id)
            upto[aggregate_id] = max(version, upto.get(aggregate_id, 0))
        histories = self._histories(upto)
        jobs: dict[tuple[str, int], Job] = {}
        for job_id, version in wanted:
            events = histories.get(aggregate_id_of(job_id), [])[:version]
            if len(events) < version or not isinstance(events[0], Job.Submitted):
                raise JobNotFound(f"job {job_id!r} not found", details={"job_id": job_id})
            jobs[(job_id, version)] = _folded(events)
        return jobs

    def _histories(self, upto: Mapping[UUID, int | None]) -> dict[UUID, list[Any]]:
        """The events of many aggregates in one query, each up to a version (None: all).

        The library reads one aggregate per query. `= ANY` on the primary key is served
        from its index (a join with a list of versions scanned the whole table).
        """
        if not upto:
            return {}
        rows = self._stored_rows(
            "originator_id = ANY(%s) ORDER BY originator_id, originator_version", (list(upto),)
        )
        histories: dict[UUID, list[Any]] = {}
        for row in rows:
            last = upto[row["originator_id"]]
            if last is not None and row["originator_version"] > last:
                continue  # later than wanted: not worth decoding
            histories.setdefault(row["originator_id"], []).append(self._decoded(row))
        return histories

    def _stored_rows(self, where: str, params: Sequence[Any]) -> list[Any]:
        """Rows of the events table (with their log position) matching `where`, in one query."""
        recorder = self.recorder
        assert isinstance(recorder, PostgresApplicationRecorder)  # postgres_env is the only one
        statement = SQL(
            "SELECT originator_id, originator_version, topic, state, notification_id "
            "FROM {}.{} WHERE " + where
        ).format(Identifier(recorder.datastore.schema), Identifier(recorder.events_table_name))
        with recorder.datastore.transaction(commit=False) as cursor:
            # Never prepared: a generic plan made while the log was small (a sequential
            # scan) would stay on the pooled connection and read the whole log each time.
            cursor.execute(statement, params, prepare=False)
            return cursor.fetchall()

    def _decoded(self, row: Any) -> Any:
        """The domain event stored in one row of the events table."""
        return self.mapper.to_domain_event(
            StoredEvent(
                originator_id=row["originator_id"],
                originator_version=row["originator_version"],
                topic=row["topic"],
                state=bytes(row["state"]),
            )
        )

    def _one_by_one(
        self, commands: Sequence[tuple[str, Callable[[Job], T]]]
    ) -> tuple[list[T | DomainError], int]:
        results: list[T | DomainError] = []
        position = 0
        for job_id, command in commands:
            outcome: list[T] = []

            def run(
                job: Job, command: Callable[[Job], T] = command, into: list[T] = outcome
            ) -> None:
                into.append(command(job))

            try:
                written = self._command(job_id, None, run)
            except DomainError as error:
                results.append(error)
                continue
            results.append(outcome[-1])
            position = max(position, written)
        return results, position

    def _command(self, job_id: str, owner: str | None, command: Callable[[Job], None]) -> int:
        """Run `command` on the job's latest version and save; returns the log position.

        Optimistic concurrency: if another writer saved first, the version check
        fails, and the command runs again on the fresh state, where the domain
        decides anew (a second cancel of a job just canceled is then a 409).
        """
        return self._save_retrying(lambda: self._job(job_id, owner=owner), command, f"job {job_id}")

    def _save_retrying(self, load: Callable[[], A], command: Callable[[A], None], what: str) -> int:
        """Load, command, save; on a version clash, again on the fresh state (a few times)."""
        for _ in range(_COMMAND_ATTEMPTS):
            aggregate = load()
            command(aggregate)
            try:
                recordings = self.save(aggregate)
            except IntegrityError:
                continue
            return recordings[-1].notification.id if recordings else 0
        raise ConcurrentChange(f"{what} is changing too fast; retry the request")

    # ---- files -------------------------------------------------------------------

    def upload_file(
        self,
        *,
        owner: str,
        sha256: str,
        size_bytes: int,
        content_type: str,
        filename: str | None,
        location: str,
    ) -> Uploaded:
        """Record bytes already stored at `location` as the owner's file.

        If the owner already has these bytes, the existing file is the answer
        (`created` False) and the caller removes the copy it just stored.
        """
        for _ in range(_COMMAND_ATTEMPTS):
            file = File.upload(
                owner=owner,
                sha256=sha256,
                size_bytes=size_bytes,
                content_type=content_type,
                filename=filename,
                location=location,
            )
            try:
                self.save(file)
                return Uploaded(file=_file_facts(file), created=True)
            except IntegrityError:
                pass
            existing: File = self.repository.get(file_aggregate_id(owner, sha256))
            if not existing.deleted:
                return Uploaded(file=_file_facts(existing), created=False)
            existing.restore(location=location, content_type=content_type, filename=filename)
            try:
                self.save(existing)
            except IntegrityError:
                continue
            return Uploaded(file=_file_facts(existing), created=True)
        raise ConcurrentChange("the file is changing too fast; retry the upload")

    def file(self, file_id: str, *, owner: str | None) -> FileFacts:
        """A live file; someone else's, or a deleted one, is not found."""
        file = self._file(file_id, owner=owner)
        file.require_present()
        return _file_facts(file)

    def delete_file(self, file_id: str, *, owner: str | None) -> str:
        """Delete a file no job used; returns the location whose bytes the caller removes."""
        location: list[str] = []

        def delete(file: File) -> None:
            file.delete()
            location.append(file.location)

        self._save_retrying(lambda: self._file(file_id, owner=owner), delete, f"file {file_id}")
        return location[-1]

    def _file(self, file_id: str, *, owner: str | None) -> File:
        try:
            file: Aggregate = self.repository.get(file_aggregate_id_of(file_id))
        except AggregateNotFoundError:
            raise FileNotFound(
                f"file {file_id!r} not found", details={"file_id": file_id}
            ) from None
        if not isinstance(file, File) or (owner is not None and file.owner != owner):
            raise FileNotFound(f"file {file_id!r} not found", details={"file_id": file_id})
        return file

    # ---- what miners fetch and store ---------------------------------------------

    def attempt_input(self, job_id: str, *, miner_id: str, attempt: int) -> AttemptInput:
        """The input of an attempt, for the miner that holds it (anyone else: not found)."""
        job = self._held(job_id, miner_id=miner_id, attempt=attempt)
        if job.input_file_id is None:
            text = job.input_text or ""
            return AttemptInput(
                text=text, location=None, size_bytes=len(text.encode()), sha256=None
            )
        file: File = self.repository.get(file_aggregate_id_of(job.input_file_id))
        return AttemptInput(
            text=None, location=file.location, size_bytes=file.size_bytes, sha256=file.sha256
        )

    def output_of(self, job_id: str, *, miner_id: str, attempt: int) -> tuple[str, str]:
        """The (destination, format) of a held attempt's result, for its upload."""
        job = self._held(job_id, miner_id=miner_id, attempt=attempt)
        return job.output_destination, job.output_format

    def store_result(
        self,
        job_id: str,
        *,
        miner_id: str,
        attempt: int,
        location: str,
        size_bytes: int,
        sha256: str,
        content_type: str,
    ) -> int:
        """Record the result bytes a holder stored (JobResultStored); returns the log position."""

        def record(job: Job) -> None:
            if not job.holds(miner_id, attempt):
                raise _not_held(job_id, miner_id, attempt)
            job.store_result(
                miner_id=miner_id,
                attempt=attempt,
                location=location,
                size_bytes=size_bytes,
                sha256=sha256,
                content_type=content_type,
            )

        return self._command(job_id, None, record)

    def _held(self, job_id: str, *, miner_id: str, attempt: int) -> Job:
        job = self._job(job_id, owner=None)
        if not job.holds(miner_id, attempt):
            raise _not_held(job_id, miner_id, attempt)
        return job

    def job_row(self, job_id: str, *, owner: str | None) -> JobRow:
        """A job's view folded straight from the log: authoritative, never behind."""
        return _fold(self.job_history(job_id, owner=owner))

    def job_events(self, job_id: str, *, owner: str | None) -> list[EventRecord]:
        """Every event of a job, in order, with its per-job sequence number."""
        return [
            EventRecord(
                sequence=event.originator_version,
                type=event_type_name(event),
                timestamp=event.timestamp,
                data={k: v for k, v in vars(event).items() if k not in _ENVELOPE_FIELDS},
            )
            for event in self.job_history(job_id, owner=owner)
        ]

    def job_history_after(
        self, job_id: str, sequence: int, *, owner: str | None = None
    ) -> tuple[list[Any], int]:
        """A job's domain events after `sequence`, in order, and the log position of the last.

        For watchers: the position lets one wait until the views show what it is about to
        tell (0 when there is no event after `sequence`). From sequence 0 it is the whole
        history, checked like `job_history` (`owner`); a later read needs no check.
        """
        rows = self._stored_rows(
            "originator_id = %s AND originator_version > %s ORDER BY originator_version",
            (aggregate_id_of(job_id), sequence),
        )
        events = [self._decoded(row) for row in rows]
        if sequence == 0:
            _require_job(job_id, events, owner)
        return events, max((int(row["notification_id"]) for row in rows), default=0)

    def read_log(self, start: int, limit: int) -> list[tuple[int, Any]]:
        """Up to `limit` (position, domain event) pairs from `start` on, in log order."""
        notifications = self.recorder.select_notifications(start=start, limit=limit)
        return [(n.id, self.mapper.to_domain_event(n)) for n in notifications]

    def read_whole_log(self, batch_size: int = 1000) -> Iterator[list[tuple[int, Any]]]:
        """The whole log in batches, for rebuilds and audits."""
        start = 1
        while batch := self.read_log(start, batch_size):
            yield batch
            start = batch[-1][0] + 1

    def head(self) -> int:
        """The position of the newest event in the log (0 when empty)."""
        return self.recorder.max_notification_id() or 0

    def _job(self, job_id: str, *, owner: str | None) -> Job:
        try:
            job: Aggregate = self.repository.get(aggregate_id_of(job_id))
        except AggregateNotFoundError:
            raise JobNotFound(f"job {job_id!r} not found", details={"job_id": job_id}) from None
        if not isinstance(job, Job) or (owner is not None and job.owner != owner):
            # Someone else's job is indistinguishable from no job at all.
            raise JobNotFound(f"job {job_id!r} not found", details={"job_id": job_id})
        return job

    def job_history(self, job_id: str, *, owner: str | None) -> Sequence[Any]:
        """A job's domain events in order, in one read; none, or someone else's, is not found."""
        events: list[Any] = list(self.events.get(aggregate_id_of(job_id)))
        _require_job(job_id, events, owner)
        return events


def _require_job(job_id: str, events: Sequence[Any], owner: str | None) -> None:
    """JobNotFound unless the events are a job's (the owner's, if given) from its submission."""
    # The id must be a job's: a file's or a miner's UUID spelt job_… is no job either.
    if (
        not events
        or not isinstance(events[0], Job.Submitted)
        or (owner is not None and events[0].owner != owner)
    ):
        raise JobNotFound(f"job {job_id!r} not found", details={"job_id": job_id})


def _not_held(job_id: str, miner_id: str, attempt: int) -> JobNotFound:
    """What a miner asking about an attempt it does not hold is told: exactly what it would
    be told for a job that does not exist, so a miner cannot probe for other jobs' ids."""
    del miner_id, attempt  # the same answer whoever asks about whichever attempt
    return JobNotFound(f"job {job_id!r} not found", details={"job_id": job_id})


def _submitted(job: Job, position: int) -> Submitted:
    return Submitted(
        job_id=job.job_id,
        estimated_cost=job.estimated_cost,
        estimated_time_seconds=job.estimated_time_seconds,
        created=True,
        position=position,
    )


def _file_facts(file: File) -> FileFacts:
    return FileFacts(
        file_id=file.file_id,
        owner=file.owner,
        size_bytes=file.size_bytes,
        sha256=file.sha256,
        content_type=file.content_type,
        filename=file.filename,
        location=file.location,
        created_at=file.created_on,
        used_by=file.used_by,
    )


def _folded(events: Sequence[Any]) -> Any:
    """An aggregate from its events, as the library's repository builds it."""
    aggregate: Any = None
    for event in events:
        aggregate = event.mutate(aggregate)
    return aggregate


def _fold(events: Sequence[Any]) -> JobRow:
    """A job's view row from its events (the first is always JobSubmitted)."""
    row: JobRow | None = None
    for event in events:
        # The log position is only known to the projector; 0 sorts it last until then.
        row = fold(row, event, row.seq if row else 0)
    assert row is not None  # job_history never returns an empty list
    return row
