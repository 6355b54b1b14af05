"""The sealer: links every committed event into the hash chains and signs checkpoints.

It runs in a background thread of every API process, like the projector. Each batch is
one transaction holding an advisory lock, so however many processes run, events are
sealed once, in log order, each link computed from the one before it. It reads the
rows through the event store exactly as stored (topic and state bytes), so what it
hashes is what an auditor later re-reads.

It relies on the event store committing events in position order (the recorder
takes a table lock per insert), so no event can appear later below the chain's head.

Events are sealed within about a second of their commit; a signed checkpoint is
written every CHECKPOINT_EVERY_EVENTS events, and at least every
`checkpoint_seconds` while new events arrive.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg

from app.audit import chain
from app.audit.signing import LedgerKey
from app.backoff import keep_running
from app.store import DATABASE_DOWN, JobLedger

log = logging.getLogger("jobledger.sealer")

CHECKPOINT_EVERY_EVENTS = 1000
BATCH_SIZE = 1000
# Serialises sealing across processes (taken per transaction).
_SEALER_LOCK_ID = 0x6A6C7365  # "jlse"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobledger_audit_chain (
    position bigint PRIMARY KEY,
    originator_id uuid NOT NULL,
    originator_version bigint NOT NULL,
    recorded_at timestamptz NOT NULL,
    event_hash bytea NOT NULL,
    aggregate_hash bytea NOT NULL,
    log_hash bytea NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobledger_audit_chain_by_aggregate
    ON jobledger_audit_chain (originator_id, originator_version);
CREATE INDEX IF NOT EXISTS jobledger_audit_chain_by_time
    ON jobledger_audit_chain (recorded_at, position);
CREATE TABLE IF NOT EXISTS jobledger_audit_checkpoints (
    position bigint PRIMARY KEY,
    log_hash bytea NOT NULL,
    signed_at timestamptz NOT NULL,
    key_id text NOT NULL,
    signature bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS jobledger_audit_keys (
    key_id text PRIMARY KEY,
    public_key bytea NOT NULL,
    first_used timestamptz NOT NULL DEFAULT now()
);
"""


def create_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the audit tables if missing (autocommit connection)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SEALER_LOCK_ID,))
        conn.execute(SCHEMA)


@dataclass(frozen=True, slots=True)
class Sealed:
    """Where the chain stands after a batch."""

    position: int
    events: int
    checkpoint: int | None


class Sealer:
    """Seals the log into the audit chain, resuming where the chain ends."""

    def __init__(
        self, ledger: JobLedger, dsn: str, key: LedgerKey, *, checkpoint_seconds: float = 10.0
    ) -> None:
        self._ledger = ledger
        self._dsn = dsn
        self._key = key
        self._checkpoint_seconds = checkpoint_seconds

    def seal(self, conn: psycopg.Connection[Any], *, checkpoint: bool = False) -> Sealed:
        """Seal one batch of unsealed events; sign a checkpoint when due (or asked)."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SEALER_LOCK_ID,))
            head = conn.execute(
                "SELECT position, log_hash FROM jobledger_audit_chain "
                "ORDER BY position DESC LIMIT 1"
            ).fetchone()
            position, log_hash = (int(head[0]), bytes(head[1])) if head else (0, chain.GENESIS)
            notifications = self._ledger.recorder.select_notifications(
                start=position + 1, limit=BATCH_SIZE
            )
            rows = self._links(conn, notifications, log_hash)
            if rows:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO jobledger_audit_chain (position, originator_id, "
                        "originator_version, recorded_at, event_hash, aggregate_hash, log_hash) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                        rows,
                    )
                position, log_hash = rows[-1][0], rows[-1][6]
            signed = self._checkpoint(conn, position, log_hash, force=checkpoint)
            return Sealed(position=position, events=len(rows), checkpoint=signed)

    def catch_up(self, conn: psycopg.Connection[Any], *, checkpoint: bool = False) -> Sealed:
        """Seal everything committed so far; with `checkpoint`, end with a signed one."""
        sealed = self.seal(conn)
        while sealed.events == BATCH_SIZE:
            sealed = self.seal(conn)
        if checkpoint and sealed.checkpoint is None:
            sealed = self.seal(conn, checkpoint=True)
        return sealed

    def run(self, stop: threading.Event) -> None:
        """Follow the log until `stop` is set, starting again after failures.

        An event it cannot read stops sealing there; that is logged at every try, and
        audit verify shows the unsealed events piling up meanwhile.
        """
        keep_running(self._follow, stop, name="sealer", log=log, down=DATABASE_DOWN)

    def _follow(self, stop: threading.Event) -> None:
        channel = self._ledger.recorder.channel_name  # type: ignore[attr-defined]
        with (
            psycopg.connect(self._dsn, autocommit=True) as listener,
            psycopg.connect(self._dsn, autocommit=True) as conn,
        ):
            create_schema(conn)
            listener.execute(f'LISTEN "{channel}"')
            while not stop.is_set():
                self.catch_up(conn)
                # A NOTIFY wakes us at once; the timeout bounds a missed one and lets a
                # due checkpoint be signed when the log is quiet.
                for _ in listener.notifies(timeout=1.0, stop_after=1):
                    pass

    def _links(
        self, conn: psycopg.Connection[Any], notifications: Sequence[Any], log_hash: bytes
    ) -> list[tuple[int, UUID, int, datetime, bytes, bytes, bytes]]:
        """The chain rows of a batch, each link made from the one before it."""
        if not notifications:
            return []
        ids = list({n.originator_id for n in notifications})
        previous: dict[UUID, bytes] = {
            row[0]: bytes(row[1])
            for row in conn.execute(
                "SELECT DISTINCT ON (originator_id) originator_id, aggregate_hash "
                "FROM jobledger_audit_chain WHERE originator_id = ANY(%s) "
                "ORDER BY originator_id, originator_version DESC",
                (ids,),
            )
        }
        rows = []
        for notification in notifications:
            originator_id = notification.originator_id
            event = chain.event_hash(
                originator_id,
                notification.originator_version,
                notification.topic,
                bytes(notification.state),
            )
            aggregate = chain.aggregate_link(previous.get(originator_id, chain.GENESIS), event)
            previous[originator_id] = aggregate
            log_hash = chain.log_link(log_hash, notification.id, event)
            event_object: Any = self._ledger.mapper.to_domain_event(notification)
            recorded_at: datetime = event_object.timestamp
            rows.append(
                (
                    int(notification.id),
                    originator_id,
                    int(notification.originator_version),
                    recorded_at,
                    event,
                    aggregate,
                    log_hash,
                )
            )
        return rows

    def _checkpoint(
        self, conn: psycopg.Connection[Any], position: int, log_hash: bytes, *, force: bool
    ) -> int | None:
        """Sign the chain's head if a checkpoint is due (or forced); its position, else None."""
        if position == 0:
            return None
        last = conn.execute(
            "SELECT position, signed_at FROM jobledger_audit_checkpoints "
            "ORDER BY position DESC LIMIT 1"
        ).fetchone()
        if last is not None and int(last[0]) >= position:
            return None  # nothing new since the last checkpoint
        due = (
            force
            or last is None
            or position - int(last[0]) >= CHECKPOINT_EVERY_EVENTS
            or time.time() - last[1].timestamp() >= self._checkpoint_seconds
        )
        if not due:
            return None
        signed_at = datetime.now(UTC)
        signature = self._key.sign(chain.checkpoint_message(position, log_hash, signed_at))
        conn.execute(
            "INSERT INTO jobledger_audit_keys (key_id, public_key) VALUES (%s, %s) "
            "ON CONFLICT (key_id) DO NOTHING",
            (self._key.key_id, self._key.public_key),
        )
        conn.execute(
            "INSERT INTO jobledger_audit_checkpoints (position, log_hash, signed_at, key_id, "
            "signature) VALUES (%s, %s, %s, %s, %s)",
            (position, log_hash, signed_at, self._key.key_id, signature),
        )
        return position
