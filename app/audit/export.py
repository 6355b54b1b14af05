"""Audit exports: NDJSON of sealed events with their hashes, checkpoints and a signed end.

One JSON object per line, in this order:

- `header`: the window, the positions covered, the log link before the first event,
  the ledger's public keys, and the miner signing keys registered before the window
  (so receipts can be checked from the file alone);
- `event`: one per sealed event in position order, with its stored row (topic and state
  in base64, from which its hash is recomputed), the decoded data for people, and its
  event, aggregate and log links;
- `checkpoint`: each signed checkpoint inside the range, after the event it covers;
- `end`: the number of lines before it, the SHA-256 of those lines' bytes, and the
  ledger's signature over that digest, so nothing in the file can be changed, added or
  dropped without the signature failing.

`verify_export` checks all of it offline: no database, only the file and (best) a
ledger public key obtained earlier from `GET /v1/audit/key`.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Generator, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

import msgspec
import psycopg
from eventsourcing.persistence import StoredEvent
from psycopg import sql

from app.audit import chain
from app.audit.findings import Finding, Report
from app.audit.receipts_check import MINER_KEY_TOPICS, ReceiptCheck
from app.audit.signing import LedgerKey, verify_signature
from app.receipts import encode_public_key
from app.relay import relayed
from app.store import JobLedger
from domain.miners import miner_id_of

FORMAT = "jobledger-audit-export/1"
MEDIA_TYPE = "application/x-ndjson"
_END = b"jobledger-export-v1\n"
_BATCH = 500


class LedgerKeyLine(msgspec.Struct, frozen=True):
    """A public key the ledger signs with."""

    key_id: str
    public_key: str


class MinerKeyLine(msgspec.Struct, frozen=True):
    """A miner's receipt key registered before the export's first event."""

    miner_id: str
    key_id: str
    public_key: str
    revoked: bool


class Header(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="header"):
    """The first line."""

    format: str
    exported_at: datetime
    window_from: datetime
    window_to: datetime
    first_position: int | None
    last_position: int | None
    previous_log_hash: str
    ledger_keys: list[LedgerKeyLine]
    miner_keys: list[MinerKeyLine]


class EventLine(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="event"):
    """One sealed event."""

    position: int
    aggregate_id: str
    originator_id: UUID
    version: int
    event_type: str
    timestamp: datetime
    topic: str
    state: str
    data: dict[str, Any]
    event_hash: str
    previous_aggregate_hash: str
    aggregate_hash: str
    log_hash: str


class CheckpointLine(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="checkpoint"):
    """A signed checkpoint inside the exported range."""

    position: int
    log_hash: str
    signed_at: datetime
    key_id: str
    signature: str


class EndLine(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="end"):
    """The last line: the ledger's signature over everything before it."""

    lines: int
    sha256: str
    signed_at: datetime
    key_id: str
    signature: str


Line = Header | EventLine | CheckpointLine | EndLine
_encoder = msgspec.json.Encoder(decimal_format="string")
_decoder = msgspec.json.Decoder(Line)


def end_message(digest: bytes, signed_at: datetime) -> bytes:
    """What the end line's signature covers."""
    return _END + digest + signed_at.astimezone(UTC).isoformat().encode("ascii")


def export_lines(
    ledger: JobLedger,
    conn: psycopg.Connection[Any],
    key: LedgerKey,
    window_from: datetime,
    window_to: datetime,
) -> Generator[bytes, None, None]:
    """The export's lines (each ending in a newline), read in one snapshot, in batches."""
    table = sql.Identifier(ledger.recorder.events_table_name)  # type: ignore[attr-defined]
    digest = hashlib.sha256()
    count = 0

    def emit(line: Line) -> bytes:
        nonlocal count
        data = _encoder.encode(line) + b"\n"
        digest.update(data)
        count += 1
        return data

    conn.autocommit = False
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        bounds = conn.execute(
            "SELECT min(position), max(position) FROM jobledger_audit_chain "
            "WHERE recorded_at BETWEEN %s AND %s",
            (window_from, window_to),
        ).fetchone()
        first, last = (bounds[0], bounds[1]) if bounds else (None, None)
        yield emit(_header(conn, table, window_from, window_to, first, last))
        if first is not None and last is not None:
            yield from (emit(line) for line in _body(ledger, conn, table, first, last))
    finally:
        conn.rollback()
        conn.autocommit = True
    signed_at = datetime.now(UTC)
    finished = digest.digest()
    yield (
        _encoder.encode(
            EndLine(
                lines=count,
                sha256=finished.hex(),
                signed_at=signed_at,
                key_id=key.key_id,
                signature=base64.b64encode(key.sign(end_message(finished, signed_at))).decode(),
            )
        )
        + b"\n"
    )


def _header(
    conn: psycopg.Connection[Any],
    table: sql.Identifier,
    window_from: datetime,
    window_to: datetime,
    first: int | None,
    last: int | None,
) -> Header:
    before = conn.execute(
        "SELECT log_hash FROM jobledger_audit_chain WHERE position < %s "
        "ORDER BY position DESC LIMIT 1",
        (first or 0,),
    ).fetchone()
    ledger_keys = [
        LedgerKeyLine(key_id=str(row[0]), public_key=encode_public_key(bytes(row[1])))
        for row in conn.execute("SELECT key_id, public_key FROM jobledger_audit_keys ORDER BY 1")
    ]
    miner_keys: dict[tuple[str, str], MinerKeyLine] = {}
    rows = conn.execute(
        sql.SQL(
            "SELECT originator_id, topic, state FROM {} WHERE topic = ANY(%s) "
            "AND notification_id < %s ORDER BY notification_id"
        ).format(table),
        (list(MINER_KEY_TOPICS), first or 0),
    )
    for originator_id, topic, state in rows:
        data = msgspec.json.decode(bytes(state))
        miner_id, key_id = miner_id_of(originator_id), str(data.get("key_id"))
        if topic == MINER_KEY_TOPICS[0]:
            miner_keys[(miner_id, key_id)] = MinerKeyLine(
                miner_id=miner_id,
                key_id=key_id,
                public_key=str(data.get("public_key")),
                revoked=False,
            )
        elif (miner_id, key_id) in miner_keys:
            miner_keys[(miner_id, key_id)] = msgspec.structs.replace(
                miner_keys[(miner_id, key_id)], revoked=True
            )
    return Header(
        format=FORMAT,
        exported_at=datetime.now(UTC),
        window_from=window_from,
        window_to=window_to,
        first_position=first,
        last_position=last,
        previous_log_hash=(bytes(before[0]) if before else chain.GENESIS).hex(),
        ledger_keys=ledger_keys,
        miner_keys=list(miner_keys.values()),
    )


def _body(
    ledger: JobLedger,
    conn: psycopg.Connection[Any],
    table: sql.Identifier,
    first: int,
    last: int,
) -> Iterator[Line]:
    checkpoints = {
        int(row[0]): row
        for row in conn.execute(
            "SELECT position, log_hash, signed_at, key_id, signature "
            "FROM jobledger_audit_checkpoints WHERE position BETWEEN %s AND %s",
            (first, last),
        )
    }
    query = sql.SQL(
        "SELECT c.position, c.originator_id, c.originator_version, e.topic, e.state, "
        "c.event_hash, coalesce(p.aggregate_hash, %s), c.aggregate_hash, c.log_hash "
        "FROM jobledger_audit_chain c "
        "LEFT JOIN {} e ON e.notification_id = c.position "
        "LEFT JOIN jobledger_audit_chain p ON p.originator_id = c.originator_id "
        "  AND p.originator_version = c.originator_version - 1 "
        "WHERE c.position BETWEEN %s AND %s ORDER BY c.position"
    ).format(table)
    with conn.cursor(name="audit_export") as cursor:
        cursor.execute(query, (chain.GENESIS, first, last))
        while rows := cursor.fetchmany(_BATCH):
            for row in rows:
                yield _event_line(ledger, row)
                if (checkpoint := checkpoints.get(int(row[0]))) is not None:
                    yield CheckpointLine(
                        position=int(checkpoint[0]),
                        log_hash=bytes(checkpoint[1]).hex(),
                        signed_at=checkpoint[2],
                        key_id=str(checkpoint[3]),
                        signature=base64.b64encode(bytes(checkpoint[4])).decode(),
                    )


def _event_line(ledger: JobLedger, row: tuple[Any, ...]) -> EventLine:
    position, originator_id, version, topic, state, event_hash, previous, aggregate, log = row
    topic = topic or ""
    state = bytes(state) if state is not None else b""
    try:
        event = ledger.mapper.to_domain_event(
            StoredEvent(
                originator_id=originator_id, originator_version=version, topic=topic, state=state
            )
        )
        shown = relayed(position, event)
        event_type, timestamp, data, name = (
            shown.type,
            shown.timestamp,
            shown.data,
            shown.aggregate_id,
        )
    except Exception as error:  # a damaged row is exported as it is; verification flags it
        event_type, timestamp, data, name = (
            "?",
            datetime.fromtimestamp(0, UTC),
            {"unreadable": f"{type(error).__name__}: {error}"},
            str(originator_id),
        )
    return EventLine(
        position=position,
        aggregate_id=name,
        originator_id=originator_id,
        version=version,
        event_type=event_type,
        timestamp=timestamp,
        topic=topic,
        state=base64.b64encode(state).decode(),
        data=msgspec.to_builtins(data, builtin_types=(datetime,)),
        event_hash=bytes(event_hash).hex(),
        previous_aggregate_hash=bytes(previous).hex(),
        aggregate_hash=bytes(aggregate).hex(),
        log_hash=bytes(log).hex(),
    )


# ---- offline verification ---------------------------------------------------------------


def verify_export(
    lines: Iterable[bytes], *, pinned_keys: Mapping[str, bytes] | None = None, scope: str
) -> Report:
    """Verify an export from its lines alone; `pinned_keys` are ledger keys you trust."""
    report = Report(scope=scope)
    walk = _ExportWalk(report, pinned_keys)
    for number, raw in enumerate(lines, start=1):
        walk.line(number, raw)
    walk.finish()
    report.findings.sort(key=lambda f: (f.position or 0, f.kind))
    return report


class _ExportWalk:
    """The state of an export being checked, line by line."""

    def __init__(self, report: Report, pinned_keys: Mapping[str, bytes] | None) -> None:
        self._report = report
        self._pinned = pinned_keys
        self._keys: dict[str, bytes] = dict(pinned_keys or {})
        self._digest = hashlib.sha256()
        self._lines = 0
        self._header: Header | None = None
        self._end: EndLine | None = None
        self._log = chain.GENESIS
        self._position = 0
        self._links: dict[UUID, bytes] = {}
        self._receipts = ReceiptCheck()

    def line(self, number: int, raw: bytes) -> None:
        """Check one line."""
        if self._end is not None:
            self._problem(None, f"line {number} comes after the end line")
            return
        try:
            parsed = _decoder.decode(raw)
        except msgspec.DecodeError as error:
            self._problem(None, f"line {number} is not an export line: {error}")
            self._digest.update(raw)
            self._lines += 1
            return
        if isinstance(parsed, EndLine):
            self._end = parsed
            return
        self._digest.update(raw if raw.endswith(b"\n") else raw + b"\n")
        self._lines += 1
        match parsed:
            case Header():
                self._start(number, parsed)
            case EventLine():
                self._event(parsed)
            case CheckpointLine():
                self._checkpoint(parsed)

    def finish(self) -> None:
        """Check the end line against everything before it."""
        report = self._report
        report.key_ids = sorted(self._keys)
        report.receipts_verified = self._receipts.verified
        report.unsigned_completions = self._receipts.unsigned
        report.findings.extend(self._receipts.findings)
        end = self._end
        if end is None:
            self._problem(None, "the export has no end line: it is cut short")
            return
        digest = self._digest.digest()
        if end.lines != self._lines or end.sha256 != digest.hex():
            self._problem(None, "the lines before the end are not the ones the ledger signed")
        elif not self._signed(end.key_id, end.signature, end_message(digest, end.signed_at)):
            self._problem(None, "the end line's signature does not verify")
        if self._header is not None and self._header.last_position not in (None, self._position):
            self._problem(self._position, "events are missing from the end of the export")

    def _start(self, number: int, header: Header) -> None:
        if number != 1 or self._header is not None:
            self._problem(None, "the header must be the first line, once")
            return
        if header.format != FORMAT:
            self._problem(None, f"unknown export format {header.format!r}")
        self._header = header
        self._log = bytes.fromhex(header.previous_log_hash)
        self._position = (header.first_position or 1) - 1
        if self._pinned is None:
            self._keys = {k.key_id: base64.b64decode(k.public_key) for k in header.ledger_keys}
        for known in header.miner_keys:
            self._receipts.know_key(
                known.miner_id, known.key_id, known.public_key, revoked=known.revoked
            )

    def _event(self, line: EventLine) -> None:
        report = self._report
        report.events += 1
        state = base64.b64decode(line.state)
        recomputed = chain.event_hash(line.originator_id, line.version, line.topic, state)
        if recomputed.hex() != line.event_hash:
            self._finding("modified", line, "the event does not hash to the hash sealed for it")
        if line.position <= self._position:
            self._finding("reordered", line, f"position {line.position} is out of order")
        self._position = line.position
        previous = self._links.get(line.originator_id, bytes.fromhex(line.previous_aggregate_hash))
        if chain.aggregate_link(previous, recomputed).hex() != line.aggregate_hash:
            self._finding("chain", line, "the aggregate's chain link does not follow")
        self._links[line.originator_id] = bytes.fromhex(line.aggregate_hash)
        self._log = chain.log_link(self._log, line.position, recomputed)
        if self._log.hex() != line.log_hash:
            self._finding("chain", line, "the log link does not follow from the one before it")
            self._log = bytes.fromhex(line.log_hash)
        report.sealed_through = line.position
        self._receipts.observe((line.position, line.originator_id, line.version, line.topic, state))

    def _checkpoint(self, line: CheckpointLine) -> None:
        report = self._report
        report.checkpoints += 1
        message = chain.checkpoint_message(
            line.position, bytes.fromhex(line.log_hash), line.signed_at
        )
        if line.position != self._position or line.log_hash != self._log.hex():
            problem = "the chain does not lead to the link this checkpoint signed"
        elif not self._signed(line.key_id, line.signature, message):
            problem = "its signature does not verify with a trusted ledger key"
        else:
            report.signed_through = line.position
            return
        report.findings.append(
            Finding(
                kind="checkpoint",
                position=line.position,
                aggregate_id=None,
                version=None,
                detail=problem,
            )
        )

    def _signed(self, key_id: str, signature: str, message: bytes) -> bool:
        key = self._keys.get(key_id)
        return key is not None and verify_signature(key, base64.b64decode(signature), message)

    def _finding(
        self, kind: Literal["modified", "reordered", "chain"], line: EventLine, detail: str
    ) -> None:
        self._report.findings.append(
            Finding(
                kind=kind,
                position=line.position,
                aggregate_id=line.aggregate_id,
                version=line.version,
                detail=detail,
            )
        )

    def _problem(self, position: int | None, detail: str) -> None:
        self._report.findings.append(
            Finding(
                kind="export", position=position, aggregate_id=None, version=None, detail=detail
            )
        )
