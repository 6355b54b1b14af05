"""Fill a fresh jobledger database with the history of many jobs, as a ledger in service holds it.

The scale and rebuild comparisons need ledgers that already hold 10^4 to 10^6 jobs.
Submitting them over HTTP would take hours, and even the ledger's own write path
(recorder insert, then the projector's upsert per row, then the sealer reading the log
back) manages about 11,000 events/s here: six minutes for a million jobs. So the
generator keeps what defines the data and bulk-loads the rest:

- every job is a real `Job` aggregate driven through domain commands (submit, assign,
  start, complete / fail / cancel), and its events are encoded by the ledger's mapper:
  the stored rows are byte for byte what the ledger would store;
- the view rows are folded by the projection's own `fold`, the runtime and miner stats
  by its `runtime_sample`/`stats_delta` and written with its statements, and the audit
  chain is linked by `app.audit.chain`'s functions over the stored bytes;
- events, view rows and chain rows go in with COPY, one transaction per batch that also
  moves the views' tracking position, so the views never lag the log they describe.

Worker processes build, encode and hash batches in parallel; a batch's positions, log
links and COPYs are taken under an advisory lock, so the log and its chain grow in
order. The result is checked (counts, positions), and tests/e2e/test_bench_scale.py
checks a generated ledger with `audit verify` and the drift check, which recompute the
chain and rebuild the views with the ledger's own code and compare.

What results is what a ledger that served those jobs holds once its background workers
caught up: views and audit chain at the head (one signed checkpoint there, by the real
Sealer), the relay's position at the head too (that history counts as published long
ago: pushing millions of old events through NATS is not what the benchmarks measure),
and the tables vacuumed, analysed and checkpointed, as autovacuum and time would have
left them. (Every event carries the time it was generated: the history spans minutes, not
months, which no read measured here depends on.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import multiprocessing
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO
from uuid import UUID

import msgspec
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from app import keys, protocol
from app.audit import chain
from app.audit.sealer import Sealer
from app.audit.signing import LedgerKey
from app.relay import RELAY_NAME
from app.services import prepare_database
from app.store import JobLedger, postgres_env
from domain.jobs import Job, JobSpec, job_id_of
from domain.miners import Capabilities
from domain.pricing import Estimate, Priority, RateTable, estimate, price
from projections import tables
from projections.jobs import JobRow, RuntimeSample, fold, runtime_sample
from projections.miners import MinerStats, stats_delta

# The client the benchmarks query as; the other owners are "owner-01", "owner-02", ...
BENCH_OWNER = "bench-client"
# Serialises "take positions, link the chain, COPY" across the worker processes.
_WRITE_LOCK_ID = 0x6A6C_6765  # "jlge"
_MODELS = ("echo", "llama-3-8b", "sdxl-turbo", "whisper-large-v3")
_PRIORITIES = (Priority.LOW, Priority.NORMAL, Priority.NORMAL, Priority.HIGH, Priority.URGENT)
# (gpu_type, vram_gb): one registered miner of each type runs that type's jobs.
_MINER_TYPES = (("t4", 16), ("a10", 24), ("v100", 32), ("a100", 80))
_RESULT_INDEX = tables.COLUMNS.index("result")


class GenerationError(RuntimeError):
    """The generated ledger is not what was asked for (a check after writing failed)."""


@dataclass(frozen=True)
class Mix:
    """The share of jobs ending in each status; the rest stay pending.

    By default none do: how many jobs wait right now depends on load and capacity, not
    on how long the history is, so the current queue is asked for apart (`backlog`).
    """

    completed: float = 0.92
    failed: float = 0.04
    canceled: float = 0.04

    def __post_init__(self) -> None:
        if min(self.completed, self.failed, self.canceled) < 0 or self.pending < -1e-9:
            raise ValueError(f"shares must be >= 0 and add up to at most 1: {self}")

    @property
    def pending(self) -> float:
        return 1.0 - self.completed - self.failed - self.canceled


@dataclass(frozen=True)
class _Chunk:
    """One worker task: `jobs` jobs, built with a random generator seeded by `seed`."""

    dsn: str
    seed: int
    jobs: int
    batch_jobs: int
    owner_share: float
    owners: int
    miners: tuple[tuple[str, str], ...]
    mix: Mix
    sample: int


@dataclass
class _Written:
    """What chunks wrote, and where their time went (summed over the workers)."""

    jobs: int = 0
    events: int = 0
    owner_jobs: int = 0
    owner_sample: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, other: _Written) -> None:
        self.jobs += other.jobs
        self.events += other.events
        self.owner_jobs += other.owner_jobs
        self.owner_sample += other.owner_sample
        for step, value in other.seconds.items():
            self.time(step, value)

    def time(self, step: str, seconds: float) -> None:
        self.seconds[step] = self.seconds.get(step, 0.0) + seconds


@dataclass(frozen=True)
class Generated:
    """A generated ledger: where it is, what it holds, and how long each step took."""

    database_url: str
    jobs: int
    events: int
    head: int
    owner: str
    owner_jobs: int
    # A random sample of the owner's job ids, for requests by id.
    owner_job_ids: list[str]
    # Wall seconds per step: "write" (build, encode, load), "seal" (the signed checkpoint),
    # "vacuum" (VACUUM ANALYZE and CHECKPOINT).
    seconds: dict[str, float]
    # CPU-side seconds summed over the workers: build, encode, hash, lock_wait, load.
    worker_seconds: dict[str, float]
    workers: int

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def events_per_second(self) -> float:
        return self.events / self.total_seconds if self.total_seconds else 0.0

    def describe(self) -> str:
        """One line: size and rates, for notes and progress output."""
        steps = ", ".join(f"{name} {value:.1f} s" for name, value in self.seconds.items())
        return (
            f"{self.jobs:,} jobs / {self.events:,} events generated in "
            f"{self.total_seconds:.1f} s ({self.events_per_second:,.0f} events/s, "
            f"{self.jobs / max(self.total_seconds, 1e-9):,.0f} jobs/s; {steps}; "
            f"{self.workers} worker process(es))"
        )


class Progress:
    """Prints a line every few seconds on long steps, so nothing is silent for minutes."""

    def __init__(self, out: TextIO | None = None, every: float = 3.0) -> None:
        self._out = out if out is not None else sys.stderr
        self._every = every
        self._last = 0.0

    def say(self, message: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self._every:
            self._last = now
            print(f"  [generator] {message}", file=self._out, flush=True)


def generate(
    dsn: str,
    jobs: int,
    *,
    workdir: Path,
    workers: int = 2,
    mix: Mix | None = None,
    owner_share: float = 0.10,
    owners: int = 20,
    seed: int = 7,
    sample: int = 5000,
    batch_jobs: int = 2000,
    backlog: int = 0,
    progress: Progress | None = None,
) -> Generated:
    """Write `jobs` jobs' histories into the fresh database `dsn`, with views and chain.

    `owner_share` of the jobs belong to BENCH_OWNER, the rest to `owners - 1` others.
    The last `backlog` of the `jobs` are the current queue: submitted, still pending.
    """
    if not 0 <= backlog <= jobs:
        raise ValueError(f"the backlog ({backlog}) must be between 0 and the jobs ({jobs})")
    if jobs < 1:
        raise ValueError("generate at least one job")
    mix = mix or Mix()
    progress = progress or Progress()
    ledger = prepare_database(dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            if ledger.head() != 0:
                raise GenerationError(f"{dsn} already holds events: generate into a fresh one")
            key = LedgerKey.load_or_create(workdir / "generator-audit-ed25519.pem")
            sealer = Sealer(ledger, dsn, key)
            miners = _register_miners(ledger, conn, sealer)
            seconds: dict[str, float] = {}
            started = time.monotonic()
            template = _Chunk(
                dsn=dsn,
                seed=seed,
                jobs=0,
                batch_jobs=batch_jobs,
                owner_share=owner_share,
                owners=owners,
                miners=miners,
                mix=mix,
                sample=sample,
            )
            written = _write_jobs(
                jobs - backlog, workers=workers, template=template, progress=progress
            )
            if backlog:
                queue = dataclasses.replace(
                    template, seed=seed - 1, jobs=backlog, mix=Mix(0.0, 0.0, 0.0), sample=0
                )
                written.add(_write_chunk(queue))
            seconds["write"] = time.monotonic() - started
            head = _finish_log(conn, ledger)
            _check(conn, head=head, jobs=jobs, events=written.events + len(miners))
            started = time.monotonic()
            # The real sealer finds the chain at the head and signs a checkpoint there.
            sealed = sealer.catch_up(conn, checkpoint=True)
            if sealed.position != head or sealed.checkpoint != head:
                raise GenerationError(f"sealer ended at {sealed}, log head is {head}")
            # The relay would have published all this long ago.
            conn.execute(
                "INSERT INTO jobledger_projection_tracking (projection, position) "
                "VALUES (%s, %s) ON CONFLICT (projection) DO UPDATE SET position = %s",
                (RELAY_NAME, head, head),
            )
            seconds["seal"] = time.monotonic() - started
            started = time.monotonic()
            progress.say(
                "VACUUM (ANALYZE) and CHECKPOINT, as a ledger in service is left", force=True
            )
            conn.execute("VACUUM (ANALYZE)")
            # And the bulk load's dirty pages on disk now, not written back during the reads.
            conn.execute("CHECKPOINT")
            seconds["vacuum"] = time.monotonic() - started
    finally:
        ledger.close()
    generated = Generated(
        database_url=dsn,
        jobs=written.jobs,
        events=written.events + len(miners),
        head=head,
        owner=BENCH_OWNER,
        owner_jobs=written.owner_jobs,
        owner_job_ids=random.Random(seed).sample(
            written.owner_sample, min(sample, len(written.owner_sample))
        ),
        seconds=seconds,
        worker_seconds=dict(written.seconds),
        workers=workers,
    )
    progress.say(generated.describe(), force=True)
    return generated


def _register_miners(
    ledger: JobLedger, conn: psycopg.Connection[Any], sealer: Sealer
) -> tuple[tuple[str, str], ...]:
    """One miner per GPU type, registered through the ledger and projected (and sealed)."""
    miners = []
    for gpu_type, vram_gb in _MINER_TYPES:
        miner, _ = ledger.register_miner(
            f"generated-{gpu_type}",
            Capabilities(
                gpu_type=gpu_type,
                gpu_count=1,
                vram_gb=vram_gb,
                location="bench",
                price_per_hour=Decimal("0.5"),
                max_concurrent=8,
            ),
        )
        miners.append((miner.miner_id, gpu_type))
    tables.apply_batch(conn, ledger.read_log(1, len(miners)))
    sealer.seal(conn)  # the workers continue the chain from its head
    return tuple(miners)


def _write_jobs(jobs: int, *, workers: int, template: _Chunk, progress: Progress) -> _Written:
    """Hand the jobs to worker processes in chunks; sums what they wrote."""
    if jobs == 0:
        return _Written()
    # Chunks of at most 25,000 jobs: a progress line every few seconds at full size.
    chunk_jobs = max(1, min(25_000, -(-jobs // (workers * 4))))
    chunks = [
        dataclasses.replace(
            template,
            seed=template.seed * 1_000_003 + number,
            jobs=min(chunk_jobs, jobs - first),
            # Each chunk keeps a share of the sample in proportion to its size.
            sample=template.sample * min(chunk_jobs, jobs - first) // jobs + 1,
        )
        for number, first in enumerate(range(0, jobs, chunk_jobs))
    ]
    total = _Written()
    started = time.monotonic()

    def report(written: _Written) -> None:
        total.add(written)
        elapsed = time.monotonic() - started
        progress.say(
            f"{total.jobs:,}/{jobs:,} jobs, {total.events:,} events written "
            f"({total.events / elapsed:,.0f} events/s)",
            force=total.jobs == jobs,
        )

    if workers <= 1:
        for chunk in chunks:
            report(_write_chunk(chunk))
        return total
    # spawn: a fresh interpreter per worker, no inherited connections or threads.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for written in pool.imap_unordered(_write_chunk, chunks):
            report(written)
    return total


def _write_chunk(chunk: _Chunk) -> _Written:
    """Build, encode and load `chunk.jobs` jobs, a batch at a time (in a worker)."""
    rng = random.Random(chunk.seed)
    # The parent created the tables; workers creating them again at once would collide.
    ledger = JobLedger(postgres_env(chunk.dsn) | {"CREATE_TABLE": "false"})
    factory = _JobFactory(ledger.rates, chunk, rng)
    table = ledger.recorder.events_table_name  # type: ignore[attr-defined]
    written = _Written()
    owner_ids: list[str] = []
    try:
        with psycopg.connect(chunk.dsn, autocommit=True) as conn:
            for first in range(0, chunk.jobs, chunk.batch_jobs):
                count = min(chunk.batch_jobs, chunk.jobs - first)
                mark = time.perf_counter()
                histories = [factory.job() for _ in range(count)]
                owner_ids += [job.job_id for job, _ in histories if job.owner == BENCH_OWNER]
                events = [event for _, history in histories for event in history]
                built = time.perf_counter()
                stored = [ledger.mapper.to_stored_event(event) for event in events]
                encoded = time.perf_counter()
                hashes = _aggregate_links(stored)
                hashed = time.perf_counter()
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK_ID,))
                    locked = time.perf_counter()
                    _load(conn, table, events, stored, hashes)
                done = time.perf_counter()
                written.jobs += count
                written.events += len(events)
                written.time("build", built - mark)
                written.time("encode", encoded - built)
                written.time("hash", hashed - encoded)
                written.time("lock_wait", locked - hashed)
                written.time("load", done - locked)
    finally:
        ledger.close()
    written.owner_jobs = len(owner_ids)
    written.owner_sample = rng.sample(owner_ids, min(chunk.sample, len(owner_ids)))
    return written


def _aggregate_links(stored: list[Any]) -> list[tuple[bytes, bytes]]:
    """(event hash, aggregate link) per stored event; each job's chain starts in this batch."""
    previous: dict[UUID, bytes] = {}
    links = []
    for row in stored:
        event = chain.event_hash(row.originator_id, row.originator_version, row.topic, row.state)
        link = chain.aggregate_link(previous.get(row.originator_id, chain.GENESIS), event)
        previous[row.originator_id] = link
        links.append((event, link))
    return links


def _load(
    conn: psycopg.Connection[Any],
    table: str,
    events: list[Any],
    stored: list[Any],
    hashes: list[tuple[bytes, bytes]],
) -> None:
    """Append a batch at the head of the log, with its chain rows, view rows and stats.

    Runs in the caller's transaction, under the write lock: nobody else appends meanwhile.
    """
    found = conn.execute(
        "SELECT position, log_hash FROM jobledger_audit_chain ORDER BY position DESC LIMIT 1"
    ).fetchone()
    head, log_hash = (int(found[0]), bytes(found[1])) if found else (0, chain.GENESIS)
    if tables.read_position(conn) != head:
        raise GenerationError(f"views are not at the chain's head {head}")
    rows: dict[str, JobRow] = {}
    samples: list[RuntimeSample] = []
    deltas: list[MinerStats] = []
    chain_rows = []
    for offset, (event, row, (event_hash, aggregate)) in enumerate(
        zip(events, stored, hashes, strict=True)
    ):
        position = head + 1 + offset
        log_hash = chain.log_link(log_hash, position, event_hash)
        timestamp: datetime = event.timestamp
        chain_rows.append(
            (
                position,
                row.originator_id,
                row.originator_version,
                timestamp,
                event_hash,
                aggregate,
                log_hash,
            )
        )
        job_id = job_id_of(event.originator_id)
        before = rows.get(job_id)
        if before is not None and (sample := runtime_sample(before, event)) is not None:
            samples.append(sample)
        if (delta := stats_delta(before, event)) is not None:
            deltas.append(delta)
        rows[job_id] = fold(before, event, position)
    with conn.cursor() as cur:
        _copy(
            cur,
            sql.SQL(
                "COPY {} (notification_id, originator_id, originator_version, topic, state) "
                "FROM STDIN"
            ).format(sql.Identifier(table)),
            (
                (head + 1 + offset, row.originator_id, row.originator_version, row.topic, row.state)
                for offset, row in enumerate(stored)
            ),
        )
        _copy(
            cur,
            sql.SQL(
                "COPY jobledger_audit_chain (position, originator_id, originator_version, "
                "recorded_at, event_hash, aggregate_hash, log_hash) FROM STDIN"
            ),
            chain_rows,
        )
        _copy(
            cur,
            sql.SQL("COPY jobledger_job_views ({}) FROM STDIN").format(
                sql.SQL(", ").join(map(sql.Identifier, tables.COLUMNS))
            ),
            (_view_row(row) for row in rows.values()),
        )
        # The projector's own statements for the counts and stats (few rows: owners x
        # statuses, models x GPU types, miners).
        tables.save_counts(cur, {}, rows)
        if samples:
            tables.save_runtime_stats(cur, samples)
        if deltas:
            tables.save_miner_stats(cur, deltas)
        cur.execute(
            "UPDATE jobledger_projection_tracking SET position = %s WHERE projection = %s",
            (head + len(events), tables.PROJECTION_NAME),
        )


def _copy(
    cur: psycopg.Cursor[Any], statement: sql.SQL | sql.Composed, rows: Iterable[Sequence[Any]]
) -> None:
    with cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def _view_row(row: JobRow) -> tuple[Any, ...]:
    values = list(msgspec.structs.astuple(row))
    if values[_RESULT_INDEX] is not None:
        values[_RESULT_INDEX] = Jsonb(values[_RESULT_INDEX])
    return tuple(values)


def _finish_log(conn: psycopg.Connection[Any], ledger: JobLedger) -> int:
    """Move the log's position sequence past the loaded events; returns the head."""
    table = ledger.recorder.events_table_name  # type: ignore[attr-defined]
    found = conn.execute(
        sql.SQL("SELECT max(notification_id) FROM {}").format(sql.Identifier(table))
    ).fetchone()
    head = int(found[0]) if found and found[0] is not None else 0
    conn.execute("SELECT setval(pg_get_serial_sequence(%s, 'notification_id'), %s)", (table, head))
    return head


class _JobFactory:
    """Jobs with realistic histories, each driven through the domain's own commands."""

    def __init__(self, rates: RateTable, chunk: _Chunk, rng: random.Random) -> None:
        self._rates = rates
        self._chunk = chunk
        self._rng = rng
        self._others = [f"owner-{n:02d}" for n in range(1, max(chunk.owners, 2))]
        # Estimates and prices depend on few inputs here: computed once per combination.
        self._estimates: dict[tuple[str, Priority], Estimate] = {}
        self._prices: dict[tuple[str, Priority, int], Decimal] = {}

    def job(self) -> tuple[Job, list[Any]]:
        """A job and the events its life recorded, in order."""
        rng = self._rng
        mix = self._chunk.mix
        miner_id, gpu_type = rng.choice(self._chunk.miners)
        priority = rng.choice(_PRIORITIES)
        spec = JobSpec(
            model=rng.choice(_MODELS),
            input_text=f"prompt {rng.getrandbits(32):08x}",
            input_file_id=None,
            output_destination="local",
            output_format="json",
            gpu_type=gpu_type,
            gpu_count=1,
            min_vram_gb=8,
            priority=priority,
            timeout_seconds=3600,
        )
        owner = BENCH_OWNER if rng.random() < self._chunk.owner_share else rng.choice(self._others)
        guess = self._estimates.get((gpu_type, priority))
        if guess is None:
            guess = self._estimates[(gpu_type, priority)] = estimate(
                self._rates,
                gpu_type=gpu_type,
                gpu_count=1,
                priority=priority,
                timeout_seconds=spec.timeout_seconds,
            )
        job = Job.submit(
            aggregate_id=UUID(int=rng.getrandbits(128), version=4),
            owner=owner,
            spec=spec,
            estimate=guess,
            idempotency_key=None,
        )
        outcome = rng.random()
        if outcome < mix.completed:
            job.assign(miner_id)
            job.start(attempt=1, miner_id=miner_id)
            self._complete(job, gpu_type, priority)
        elif outcome < mix.completed + mix.failed:
            job.assign(miner_id)
            job.start(attempt=1, miner_id=miner_id)
            job.fail(attempt=1, error="executor exited with status 1", error_code="executor_error")
        elif outcome < mix.completed + mix.failed + mix.canceled:
            job.request_cancel()  # while pending: canceled at once
        return job, list(job.collect_events())

    def _complete(self, job: Job, gpu_type: str, priority: Priority) -> None:
        """Complete as the ingestor records a miner's completion with an inline result."""
        data = f'{{"job": "{job.job_id}", "tokens": {self._rng.randint(10, 4000)}}}'.encode()
        result = protocol.InlineResult(
            data=data.decode(),
            content_type="application/json",
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        milliseconds = self._rng.randint(1, 600_000)
        seconds = Decimal(milliseconds) / 1000
        key = (gpu_type, priority, -(-milliseconds // 3_600_000))  # billed whole hours
        cost = self._prices.get(key)
        if cost is None:
            cost = self._prices[key] = price(
                self._rates, gpu_type=gpu_type, gpu_count=1, seconds=seconds, priority=priority
            )
        metrics = protocol.Metrics(execution_seconds=float(seconds), gpu_seconds=float(seconds))
        job.complete(
            attempt=1,
            result=protocol.to_builtins(result) | {"format": job.output_format},
            metrics=protocol.to_builtins(metrics),
            gpu_seconds=seconds,
            cost=cost,
        )


def _check(conn: psycopg.Connection[Any], *, head: int, jobs: int, events: int) -> None:
    """The log, its chain and the views hold every job up to the head: or the run is void."""
    views = tables.read_position(conn)
    found = conn.execute("SELECT count(*) FROM jobledger_job_views").fetchone()
    sealed = conn.execute("SELECT count(*), max(position) FROM jobledger_audit_chain").fetchone()
    counted = int(found[0]) if found else 0
    links, chain_head = (int(sealed[0]), int(sealed[1] or 0)) if sealed else (0, 0)
    if not (views == chain_head == head == events == links) or counted != jobs:
        raise GenerationError(
            f"log head {head} for {events} events; views at {views}, chain at {chain_head} "
            f"with {links} links; {counted} job views for {jobs} jobs"
        )


def create_client_key(dsn: str, owner: str = BENCH_OWNER) -> str:
    """A client API key whose subject is `owner`, so its requests see that owner's jobs."""

    async def create() -> str:
        async with AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False) as pool:
            await keys.create_schema(pool)
            _, key = await keys.ApiKeys(pool).create(keys.Role.CLIENT, "bench", subject=owner)
        return key

    return asyncio.run(create())


def main(argv: list[str]) -> int:
    """`python -m tests.bench.generator DSN JOBS [WORKERS]`: generate into DSN, print rates."""
    dsn, jobs = argv[0], int(argv[1])
    workers = int(argv[2]) if len(argv) > 2 else 2
    with tempfile.TemporaryDirectory(prefix="jobledger-generator-") as workdir:
        generated = generate(dsn, jobs, workdir=Path(workdir), workers=workers)
    print(generated.describe())
    print({step: round(value, 1) for step, value in generated.worker_seconds.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
