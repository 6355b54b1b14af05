"""Recompute the chains from the stored events and report every place the log was touched.

`verify_ledger` reads the event table and the chain table side by side in log order, in
one read-only snapshot, and recomputes every hash. Each finding names a position, an
aggregate and a version where it can:

- modified: the event row at a sealed position no longer hashes to what was sealed;
- deleted: a sealed event is gone;
- inserted: an event sits at a sealed position, or among sealed events, that was
  never sealed (written behind the ledger's back);
- reordered: a sealed event now sits at another position (or under another version);
- chain: a row of the chain table does not follow from the one before it (the chain
  table itself was edited);
- checkpoint: a checkpoint's signature does not verify, or the chain no longer leads to
  the link it signed.

Events newer than the chain's head are counted as unsealed, not as findings: the sealer
covers them within a second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from app.audit import chain
from app.audit.findings import Finding, Report
from app.audit.receipts_check import MINER_KEY_TOPICS, ReceiptCheck
from app.audit.signing import verify_signature
from domain.errors import JobNotFound
from domain.files import file_id_of
from domain.jobs import aggregate_id_of, job_id_of
from domain.miners import miner_id_of

_FETCH = 2000
_PUBLIC_IDS: tuple[tuple[str, Callable[[UUID], str]], ...] = (
    ("domain.jobs:", job_id_of),
    ("domain.miners:", miner_id_of),
    ("domain.files:", file_id_of),
)


def public_id(originator_id: UUID, topic: str | None) -> str:
    """The public id of an aggregate, by the module its events come from."""
    for prefix, name in _PUBLIC_IDS:
        if topic is not None and topic.startswith(prefix):
            return name(originator_id)
    return str(originator_id)


class _Links:
    """Checks that each stored chain row follows from the stored rows before it."""

    def __init__(self) -> None:
        self.log = chain.GENESIS
        self.aggregates: dict[UUID, tuple[int, bytes]] = {}

    def check(self, row: tuple[Any, ...], name: str) -> list[Finding]:
        """Both links of a stored row, against the stored rows before it."""
        return self.check_log(row, name) + self.check_aggregate(row, name)

    def check_log(self, row: tuple[Any, ...], name: str) -> list[Finding]:
        """The row's log link, against the previous row's."""
        position, _, version, event_hash, _, log_hash = row
        expected = chain.log_link(self.log, position, bytes(event_hash))
        self.log = bytes(log_hash)
        if expected == bytes(log_hash):
            return []
        return [
            Finding(
                kind="chain",
                position=position,
                aggregate_id=name,
                version=version,
                detail="the chain's log link here does not follow from the one before it",
            )
        ]

    def check_aggregate(self, row: tuple[Any, ...], name: str) -> list[Finding]:
        """The row's aggregate link, against the same aggregate's previous row."""
        position, originator_id, version, event_hash, aggregate_hash, _ = row
        last_version, last_link = self.aggregates.get(originator_id, (0, chain.GENESIS))
        self.aggregates[originator_id] = (version, bytes(aggregate_hash))
        if version == last_version + 1 and chain.aggregate_link(
            last_link, bytes(event_hash)
        ) == bytes(aggregate_hash):
            return []
        return [
            Finding(
                kind="chain",
                position=position,
                aggregate_id=name,
                version=version,
                detail=f"the aggregate's chain link does not follow from version {last_version}",
            )
        ]


def verify_ledger(
    conn: psycopg.Connection[Any],
    events_table: str,
    *,
    pinned_keys: Mapping[str, bytes] | None = None,
) -> Report:
    """Verify the whole log against the chain and its signed checkpoints (read-only)."""
    conn.autocommit = False
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        report = _LedgerWalk(conn, sql.Identifier(events_table)).run(pinned_keys)
    finally:
        conn.rollback()
        conn.autocommit = True
    report.findings.sort(key=lambda f: (f.position or 0, f.kind))
    return report


class _LedgerWalk:
    """The events and the chain side by side in position order, in one snapshot."""

    def __init__(self, conn: psycopg.Connection[Any], table: sql.Identifier) -> None:
        self._conn = conn
        self._table = table
        self._links = _Links()
        self._receipts = ReceiptCheck()
        self._names: dict[UUID, str] = {}
        self._report = Report(scope="ledger")

    def run(self, pinned_keys: Mapping[str, bytes] | None) -> Report:
        """Walk the whole log; the report of what was found."""
        report = self._report
        head = self._conn.execute("SELECT coalesce(max(position), 0) FROM jobledger_audit_chain")
        report.sealed_through = int(head.fetchone()[0])  # type: ignore[index]
        checkpoints = _checkpoints(self._conn)
        at_checkpoints: dict[int, bytes] = {}
        events = _rows(
            self._conn,
            "events",
            sql.SQL(
                "SELECT notification_id, originator_id, originator_version, topic, state "
                "FROM {} ORDER BY notification_id"
            ).format(self._table),
        )
        sealed = _rows(
            self._conn,
            "sealed",
            sql.SQL(
                "SELECT position, originator_id, originator_version, event_hash, "
                "aggregate_hash, log_hash FROM jobledger_audit_chain ORDER BY position"
            ),
        )
        event, seal = next(events, None), next(sealed, None)
        while event is not None or seal is not None:
            if seal is None or (event is not None and event[0] < seal[0]):
                assert event is not None
                self._unsealed(event)
                event = next(events, None)
                continue
            if seal[0] in checkpoints:
                at_checkpoints[seal[0]] = bytes(seal[5])
            if event is None or seal[0] < event[0]:
                self._gone(seal)
                seal = next(sealed, None)
                continue
            self._both(event, seal)
            event, seal = next(events, None), next(sealed, None)
        report.findings.extend(
            _check_checkpoints(self._conn, checkpoints, at_checkpoints, pinned_keys, report)
        )
        report.findings.extend(self._receipts.findings)
        report.receipts_verified = self._receipts.verified
        report.unsigned_completions = self._receipts.unsigned
        return report

    def _seen(self, event: tuple[Any, ...]) -> str:
        self._report.events += 1
        self._receipts.observe(event)
        name = self._names[event[1]] = public_id(event[1], event[3])
        return name

    def _unsealed(self, event: tuple[Any, ...]) -> None:
        """An event at a position the chain has no row for."""
        name = self._seen(event)
        if event[0] <= self._report.sealed_through:
            self._report.findings.append(_unsealed_event(self._conn, event, name))
        else:
            self._report.unsealed += 1

    def _gone(self, seal: tuple[Any, ...]) -> None:
        """A chain row whose position holds no event."""
        name = self._names.get(seal[1], str(seal[1]))
        self._report.findings.extend(self._links.check(seal, name))
        self._report.findings.extend(_sealed_gone(self._conn, self._table, seal, name))

    def _both(self, event: tuple[Any, ...], seal: tuple[Any, ...]) -> None:
        """An event and a chain row at the same position."""
        name = self._seen(event)
        self._report.findings.extend(self._links.check(seal, name))
        self._report.findings.extend(_compare(self._conn, self._table, event, seal, name))


def _rows(conn: psycopg.Connection[Any], name: str, query: sql.Composed | sql.SQL) -> Iterator[Any]:
    """Rows of a query through a server-side cursor, a batch at a time."""
    with conn.cursor(name=f"audit_{name}") as cursor:
        cursor.execute(query)
        while batch := cursor.fetchmany(_FETCH):
            yield from batch


def _compare(
    conn: psycopg.Connection[Any],
    table: sql.Identifier,
    event: tuple[Any, ...],
    seal: tuple[Any, ...],
    name: str,
) -> list[Finding]:
    """An event at a sealed position: the same one, unchanged?"""
    position, originator_id, version, topic, state = event
    if (originator_id, version) == (seal[1], seal[2]):
        recomputed = chain.event_hash(originator_id, version, topic, bytes(state))
        if recomputed != bytes(seal[3]):
            return [
                Finding(
                    kind="modified",
                    position=position,
                    aggregate_id=name,
                    version=version,
                    detail="the stored event no longer hashes to what was sealed",
                )
            ]
        return []
    found = [_unsealed_event(conn, event, name)]
    now_at = _event_position(conn, table, seal[1], seal[2])
    if now_at is None:
        found.append(_deleted(seal, str(seal[1])))
    return found


def _unsealed_event(conn: psycopg.Connection[Any], event: tuple[Any, ...], name: str) -> Finding:
    """An event where the chain has none: moved here from elsewhere, or never sealed."""
    position, originator_id, version = event[0], event[1], event[2]
    sealed_at = conn.execute(
        "SELECT position FROM jobledger_audit_chain "
        "WHERE originator_id = %s AND originator_version = %s",
        (originator_id, version),
    ).fetchone()
    if sealed_at is not None:
        return Finding(
            kind="reordered",
            position=position,
            aggregate_id=name,
            version=version,
            detail=f"sealed at position {sealed_at[0]}, now found at position {position}",
        )
    return Finding(
        kind="inserted",
        position=position,
        aggregate_id=name,
        version=version,
        detail="an event among sealed ones that was never sealed",
    )


def _sealed_gone(
    conn: psycopg.Connection[Any], table: sql.Identifier, seal: tuple[Any, ...], name: str
) -> list[Finding]:
    """A sealed position with no event: deleted, unless the event moved (reported there)."""
    if _event_position(conn, table, seal[1], seal[2]) is not None:
        return []
    return [_deleted(seal, name)]


def _deleted(seal: tuple[Any, ...], name: str) -> Finding:
    return Finding(
        kind="deleted",
        position=seal[0],
        aggregate_id=name,
        version=seal[2],
        detail="a sealed event is missing from the log",
    )


def _event_position(
    conn: psycopg.Connection[Any], table: sql.Identifier, originator_id: UUID, version: int
) -> int | None:
    """Where an event is in the log now, if it is anywhere."""
    found = conn.execute(
        sql.SQL(
            "SELECT notification_id FROM {} WHERE originator_id = %s AND originator_version = %s"
        ).format(table),
        (originator_id, version),
    ).fetchone()
    return int(found[0]) if found else None


def _checkpoints(conn: psycopg.Connection[Any]) -> dict[int, tuple[bytes, Any, str, bytes]]:
    rows = conn.execute(
        "SELECT position, log_hash, signed_at, key_id, signature "
        "FROM jobledger_audit_checkpoints ORDER BY position"
    ).fetchall()
    return {int(r[0]): (bytes(r[1]), r[2], str(r[3]), bytes(r[4])) for r in rows}


def _check_checkpoints(
    conn: psycopg.Connection[Any],
    checkpoints: Mapping[int, tuple[bytes, Any, str, bytes]],
    stored: Mapping[int, bytes],
    pinned_keys: Mapping[str, bytes] | None,
    report: Report,
) -> list[Finding]:
    """Each checkpoint's signature, and that the chain still leads to the link it signed."""
    keys = dict(pinned_keys) if pinned_keys is not None else _ledger_keys(conn)
    report.key_ids = sorted(keys)
    report.checkpoints = len(checkpoints)
    found: list[Finding] = []
    for position, (log_hash, signed_at, key_id, signature) in checkpoints.items():
        problem = None
        if key_id not in keys:
            problem = f"signed by {key_id}, which is not a trusted ledger key"
        elif not verify_signature(
            keys[key_id], signature, chain.checkpoint_message(position, log_hash, signed_at)
        ):
            problem = "its signature does not verify"
        elif stored.get(position) != log_hash:
            problem = "the chain no longer leads to the link this checkpoint signed"
        if problem is None:
            report.signed_through = max(report.signed_through, position)
        else:
            found.append(
                Finding(
                    kind="checkpoint",
                    position=position,
                    aggregate_id=None,
                    version=None,
                    detail=problem,
                )
            )
    return found


def _ledger_keys(conn: psycopg.Connection[Any]) -> dict[str, bytes]:
    rows = conn.execute("SELECT key_id, public_key FROM jobledger_audit_keys").fetchall()
    return {str(r[0]): bytes(r[1]) for r in rows}


def verify_job(
    conn: psycopg.Connection[Any],
    events_table: str,
    job_id: str,
    *,
    pinned_keys: Mapping[str, bytes] | None = None,
) -> Report:
    """Verify one job's events, its chain, and the log links up to a signed checkpoint."""
    aggregate_id = aggregate_id_of(job_id)
    report = Report(scope=job_id)
    table = sql.Identifier(events_table)
    conn.autocommit = False
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        head = conn.execute("SELECT coalesce(max(position), 0) FROM jobledger_audit_chain")
        sealed_head = int(head.fetchone()[0])  # type: ignore[index]
        report.sealed_through = sealed_head
        events = {
            int(row[2]): row
            for row in conn.execute(
                sql.SQL(
                    "SELECT notification_id, originator_id, originator_version, topic, state "
                    "FROM {} WHERE originator_id = %s"
                ).format(table),
                (aggregate_id,),
            )
        }
        seals = {
            int(row[2]): row
            for row in conn.execute(
                "SELECT position, originator_id, originator_version, event_hash, aggregate_hash, "
                "log_hash FROM jobledger_audit_chain WHERE originator_id = %s",
                (aggregate_id,),
            )
        }
        if not events and not seals:
            raise JobNotFound(f"job {job_id!r} not found", details={"job_id": job_id})
        links = _Links()
        for version in sorted(set(events) | set(seals)):
            event, seal = events.get(version), seals.get(version)
            if seal is not None:
                report.findings.extend(links.check_aggregate(seal, job_id))
                report.findings.extend(_log_link_at(conn, seal, job_id))
            if event is None:
                assert seal is not None
                report.findings.extend(_sealed_gone(conn, table, seal, job_id))
                continue
            report.events += 1
            if seal is None:
                if event[0] <= sealed_head:
                    report.findings.append(_unsealed_event(conn, event, job_id))
                else:
                    report.unsealed += 1
                continue
            if event[0] != seal[0]:
                report.findings.append(_unsealed_event(conn, event, job_id))
                continue
            report.findings.extend(_compare(conn, table, event, seal, job_id))
        last = max((int(seal[0]) for seal in seals.values()), default=0)
        report.findings.extend(_covering_checkpoint(conn, last, pinned_keys, report))
        receipts = ReceiptCheck()
        for row in conn.execute(
            sql.SQL(
                "SELECT notification_id, originator_id, originator_version, topic, state FROM {} "
                "WHERE topic = ANY(%s) AND notification_id < %s ORDER BY notification_id"
            ).format(table),
            (list(MINER_KEY_TOPICS), max((int(e[0]) for e in events.values()), default=0)),
        ):
            receipts.observe(row)
        for version in sorted(events):
            receipts.observe(events[version])
        report.findings.extend(receipts.findings)
        report.receipts_verified = receipts.verified
        report.unsigned_completions = receipts.unsigned
    finally:
        conn.rollback()
        conn.autocommit = True
    report.findings.sort(key=lambda f: (f.position or 0, f.kind))
    return report


def _log_link_at(conn: psycopg.Connection[Any], seal: tuple[Any, ...], name: str) -> list[Finding]:
    """Does the sealed row's log link follow from the row sealed just before it?"""
    before = conn.execute(
        "SELECT log_hash FROM jobledger_audit_chain WHERE position < %s "
        "ORDER BY position DESC LIMIT 1",
        (seal[0],),
    ).fetchone()
    previous = bytes(before[0]) if before else chain.GENESIS
    if chain.log_link(previous, seal[0], bytes(seal[3])) == bytes(seal[5]):
        return []
    return [
        Finding(
            kind="chain",
            position=seal[0],
            aggregate_id=name,
            version=seal[2],
            detail="the chain's log link here does not follow from the one before it",
        )
    ]


def _covering_checkpoint(
    conn: psycopg.Connection[Any],
    position: int,
    pinned_keys: Mapping[str, bytes] | None,
    report: Report,
) -> list[Finding]:
    """The first checkpoint at or after `position`, and every log link up to it."""
    if position == 0:
        return []
    found = conn.execute(
        "SELECT position, log_hash, signed_at, key_id, signature FROM jobledger_audit_checkpoints "
        "WHERE position >= %s ORDER BY position LIMIT 1",
        (position,),
    ).fetchone()
    if found is None:
        return []  # not signed yet: the next checkpoint will cover it
    checkpoint = {int(found[0]): (bytes(found[1]), found[2], str(found[3]), bytes(found[4]))}
    # From the job's last sealed row (its own link was checked) to the checkpoint's row.
    rows = conn.execute(
        "SELECT position, originator_id, originator_version, event_hash, aggregate_hash, "
        "log_hash FROM jobledger_audit_chain WHERE position BETWEEN %s AND %s ORDER BY position",
        (position, found[0]),
    ).fetchall()
    findings: list[Finding] = []
    links = _Links()
    links.log = bytes(rows[0][5]) if rows else chain.GENESIS
    for row in rows[1:]:
        findings.extend(links.check_log(row, str(row[1])))
    stored = {int(rows[-1][0]): bytes(rows[-1][5])} if rows else {}
    findings.extend(_check_checkpoints(conn, checkpoint, stored, pinned_keys, report))
    return findings
