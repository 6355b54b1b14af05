"""Point-in-time reads: a job rebuilt from its own events as it stood at a time or event number.

The views hold only the latest state; the log holds every state. Replaying a job's
first N events through the same pure fold the projector uses shows it exactly as
the status view showed it right after event N.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec

from app.config import Settings
from app.store import JobLedger, postgres_env
from domain.errors import InvalidJobRequest, JobNotFound
from projections.jobs import JobRow, fold

_SEQUENCE = re.compile(r"[0-9]+")
# RFC 3339 with a mandatory offset, as the history bounds take it; a bare date is not a moment.
_MOMENT = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)
# "...T12:00:00+02:00" sent unencoded in a URL query arrives as "...T12:00:00 02:00".
_PLUS_DECODED = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})? \d{2}:\d{2}", re.ASCII
)
_SHOWN_CHARS = 64
_JSON = msgspec.json.Encoder(decimal_format="number")


def parse_as_of(text: str) -> int | datetime:
    """An event sequence number (digits) or an RFC 3339 time with an offset; else a 422."""
    try:
        if _SEQUENCE.fullmatch(text):
            return int(text)
        if _MOMENT.fullmatch(text):
            # Kept in its own offset: aware datetimes compare as instants, and converting
            # 0001-01-01T00:00:00+05:00 to UTC would overflow.
            return datetime.fromisoformat(text.upper().replace(" ", "T"))
    except ValueError:
        pass  # shaped right but impossible: 2026-02-30T00:00:00Z, a leap second, 5000 digits
    shown = text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."
    hint = ""
    if _PLUS_DECODED.fullmatch(text):
        hint = " (a '+' in a URL query string means a space: write the offset as %2B02:00)"
    raise InvalidJobRequest(
        "as_of must be an event sequence number (0, 1, 2, ...) or an RFC 3339 time with an "
        f"offset (2026-11-29T12:00:00Z or 2026-11-29T14:00:00+02:00), got {shown!r}{hint}",
        details={"field": "as_of"},
    )


def job_as_of(
    ledger: JobLedger, job_id: str, as_of: int | datetime, *, owner: str | None
) -> tuple[JobRow, int]:
    """The job as it stood at `as_of`, folded from its events, and the sequence that reflects.

    A sequence N is the state right after the job's event N; a time is the state after
    the last event stamped at or before it. A sequence past the last event, or a time
    after it (the future too), is simply the current state. Sequence 0 or a time before
    the submission is JobNotFound saying the job did not exist yet; an unknown job, or
    someone else's (`owner` given), is JobNotFound as the status route answers it.
    """
    events = ledger.job_history(job_id, owner=owner)
    sequence = _sequence_at(events, as_of, job_id)
    row: JobRow | None = None
    for event in events:
        if event.originator_version > sequence:
            break
        # The log position is the projector's business; 0 as in the ledger's own fold.
        row = fold(row, event, 0)
    assert row is not None  # _sequence_at returns at least the submission's sequence
    return row, sequence


def run_replay(settings: Settings, job_id: str, as_of: str, *, as_json: bool = False) -> int:
    """`jobledger audit replay`: print a job as it stood at `as_of` and the events up to it."""
    from app.api.jobs import status_view
    from app.cli import ledger_database

    try:
        moment = parse_as_of(as_of)
    except InvalidJobRequest as error:
        print(f"jobledger: {error.message}", file=sys.stderr)
        return 2
    with ledger_database(settings) as dsn:
        ledger = JobLedger(postgres_env(dsn))
        try:
            row, sequence = job_as_of(ledger, job_id, moment, owner=None)
            records = ledger.job_events(job_id, owner=None)
        except JobNotFound as error:
            print(f"jobledger: {error.message}", file=sys.stderr)
            return 1
        finally:
            ledger.close()
    shown = [record for record in records if record.sequence <= sequence]
    view = status_view(row)
    if as_json:
        document = {"job": view, "sequence": sequence, "events": shown}
        print(msgspec.json.format(_JSON.encode(document), indent=2).decode())
        return 0
    reached = shown[-1]
    print(
        f"job {job_id} as of {as_of} (event {sequence} of {records[-1].sequence}: "
        f"{reached.type} at {msgspec.to_builtins(reached.timestamp)})"
    )
    fields: dict[str, Any] = msgspec.to_builtins(view)
    del fields["job_id"], fields["pending_reason"]  # in the heading; not part of the history
    width = max(len(name) for name in fields) + 2
    for name, value in fields.items():
        print(f"  {name + ':':<{width}}{_human(value)}")
    for record in shown:
        print(f"{record.sequence} {record.type} {_JSON.encode(record.data).decode()}")
    return 0


def _human(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return _JSON.encode(value).decode()
    return str(value)


def _sequence_at(events: Sequence[Any], as_of: int | datetime, job_id: str) -> int:
    """The sequence of the last event at or before `as_of` (at most the job's last event)."""
    if isinstance(as_of, datetime):
        if as_of.utcoffset() is None:
            raise InvalidJobRequest(
                "as_of must be a time with an offset (2026-11-29T12:00:00Z)",
                details={"field": "as_of"},
            )
        # Not a prefix scan: with clocks that stepped back, a later event may bear an
        # earlier stamp, and "the last event at or before" is the highest such sequence.
        reached = [event.originator_version for event in events if event.timestamp <= as_of]
        if reached:
            return int(max(reached))
        raise _not_yet(job_id, as_of.isoformat(), events[0])
    if as_of < 0:
        raise InvalidJobRequest(
            f"as_of sequence cannot be negative, got {as_of}", details={"field": "as_of"}
        )
    if as_of == 0:
        raise _not_yet(job_id, "sequence 0", events[0])
    return min(as_of, int(events[-1].originator_version))


def _not_yet(job_id: str, when: str, submitted: Any) -> JobNotFound:
    return JobNotFound(
        f"job {job_id} did not exist yet as of {when}: it was submitted at "
        f"{submitted.timestamp.isoformat()} (sequence {submitted.originator_version})",
        details={"job_id": job_id, "as_of": when},
    )
