"""`jobledger audit drift`: fold the log again into a scratch schema, compare with the live views.

The live views keep moving while the audit runs (the projector runs in every API
process), so both sides are compared at one log position P:

1. A scratch schema `jobledger_drift_<hex>` gets the view tables, created by the
   same `create_schema` as the live ones (the SQL in projections/tables.py names
   its tables unqualified, so a connection whose `search_path` is the scratch
   schema builds a second copy), plus an empty `live_<table>` copy of each table.
2. One REPEATABLE READ transaction locks the live tables in ACCESS SHARE mode as
   its first statement, before its snapshot exists, reads P from the live tracking
   row and copies the live rows into the `live_` tables; then it commits. The
   projector commits rows and tracking position together, so that snapshot holds
   the live views exactly as of P. The lock comes first because TRUNCATE is not
   MVCC-safe: a `projections rebuild` committed after the snapshot would otherwise
   show us emptied tables. Holding it only for the copy, not for the whole
   audit, keeps the audit from stalling schema changes and the API behind them.
3. The scratch tables are rebuilt by `tables.rebuild` from the events at positions
   1..P and no further. The event store serialises inserts with a table lock, so
   positions commit in order: the projector having reached P means every event up
   to P was committed, and stored events never change, so reading them now yields
   what the projector folded. The rebuild runs in a transaction that is rolled
   back at the end, so it never commits anything and its NOTIFY of the views'
   position never reaches the API processes.
4. In that same transaction each table is compared with its live copy: a FULL
   JOIN on the primary key, streamed in key order, then column by column in
   Python (numeric as Decimal, jsonb parsed with Decimal numbers, timestamps as
   instants, True never equal to 1).

The scratch schema is dropped with CASCADE on every way out, errors and
KeyboardInterrupt included. Miner liveness (written from heartbeats) and pending
reasons (written by the scheduler, outside the view schema) are not derived from
the log, so they are not compared.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from decimal import Decimal
from functools import partial
from typing import Any, Literal, NamedTuple

import msgspec
import psycopg
from psycopg import sql
from psycopg.types.json import set_json_loads

from app.config import Settings
from app.store import JobLedger, postgres_env
from projections import tables


class Difference(msgspec.Struct, frozen=True):
    """One row on which the live views and the rebuild disagree."""

    table: str
    key: str
    # missing: only the rebuild has the row; extra: only the live views; different: both.
    kind: Literal["missing", "extra", "different"]
    # For "different": column -> (live value, rebuilt value), as JSON-friendly values.
    columns: dict[str, tuple[Any, Any]] = {}


class DriftReport(msgspec.Struct, frozen=True):
    """The outcome of one drift check: where it was made, what it compared, what differed."""

    position: int
    tables: dict[str, int]
    differences: list[Difference]


class ViewsMissing(ValueError):
    """The database has no views to audit: no API process or rebuild ever created them."""


class _Table(NamedTuple):
    name: str
    key: tuple[str, ...]
    label: str


# Every table the projection derives from the log, with its primary key.
COMPARED = (
    _Table("jobledger_job_views", ("job_id",), "job views"),
    _Table("jobledger_job_counts", ("owner", "status"), "job counts"),
    _Table("jobledger_runtime_stats", ("model", "gpu_type"), "runtime stats"),
    _Table("jobledger_miner_views", ("miner_id",), "miner views"),
    _Table("jobledger_miner_stats", ("miner_id",), "miner stats"),
)
TRACKING_TABLE = "jobledger_projection_tracking"
# In the view schema but not derived from the log (heartbeats write it).
NOT_DERIVED = frozenset({"jobledger_miner_liveness"})
_LIVE_PREFIX = "live_"
_FETCH_ROWS = 1000


def check_drift(ledger: JobLedger, dsn: str) -> DriftReport:
    """Compare the live views with a rebuild from the log, both at the live views' position."""
    schema = f"jobledger_drift_{secrets.token_hex(8)}"
    with psycopg.connect(dsn, autocommit=True) as scratch:
        try:
            scratch.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            scratch.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            tables.create_schema(scratch)
            columns = _prepare_live_copies(scratch, schema)
            position = _copy_live_views(dsn, schema, columns)
            return _rebuild_and_compare(scratch, ledger, schema, columns, position)
        finally:
            # Closed first, so nothing it still holds can make the drop wait.
            scratch.close()
            _drop_schema(dsn, schema)


def _drop_schema(dsn: str, schema: str) -> None:
    """Drop the scratch schema and all in it, from a fresh connection: the old one may be broken."""
    with psycopg.connect(dsn, autocommit=True) as cleanup:
        cleanup.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _prepare_live_copies(
    scratch: psycopg.Connection[Any], schema: str
) -> dict[str, tuple[str, ...]]:
    """Check the scratch schema holds only tables we know, add the live copies; their columns."""
    found = {
        name
        for (name,) in scratch.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
        )
    }
    known = {t.name for t in COMPARED} | NOT_DERIVED | {TRACKING_TABLE}
    if found != known:
        raise RuntimeError(
            f"the view schema's tables changed (unknown: {sorted(found - known)}, "
            f"gone: {sorted(known - found)}): teach app/audit/drift.py whether they "
            "derive from the log"
        )
    columns: dict[str, tuple[str, ...]] = {}
    for table in COMPARED:
        columns[table.name] = tuple(
            name
            for (name,) in scratch.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                (schema, table.name),
            )
        )
        scratch.execute(
            sql.SQL("CREATE TABLE {} (LIKE {})").format(
                sql.Identifier(schema, _LIVE_PREFIX + table.name),
                sql.Identifier(schema, table.name),
            )
        )
    return columns


def _copy_live_views(dsn: str, schema: str, columns: dict[str, tuple[str, ...]]) -> int:
    """Copy the live views into the scratch schema from one snapshot; the position they hold."""
    live_tables = sql.SQL(", ").join(
        sql.Identifier(name) for name in (TRACKING_TABLE, *(t.name for t in COMPARED))
    )
    with psycopg.connect(dsn, autocommit=True) as live:
        live.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with live.transaction():
            try:
                # Before the snapshot exists (it is taken by the first query, not by LOCK).
                live.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(live_tables))
            except psycopg.errors.UndefinedTable as error:
                raise ViewsMissing(f"no views to audit: {error}") from None
            found = live.execute(
                "SELECT position FROM jobledger_projection_tracking WHERE projection = %s",
                (tables.PROJECTION_NAME,),
            ).fetchone()
            if found is None:
                raise ViewsMissing(f"no views to audit: no {tables.PROJECTION_NAME!r} tracking row")
            for table in COMPARED:
                names = sql.SQL(", ").join(map(sql.Identifier, columns[table.name]))
                live.execute(
                    sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(
                        sql.Identifier(schema, _LIVE_PREFIX + table.name),
                        names,
                        names,
                        sql.Identifier(table.name),
                    )
                )
            return int(found[0])


def _log_until(ledger: JobLedger, position: int) -> Iterator[list[tuple[int, Any]]]:
    """The log in batches, up to and including `position` and nothing after it."""
    if position <= 0:
        return
    for batch in ledger.read_whole_log():
        kept = [(seq, event) for seq, event in batch if seq <= position]
        if kept:
            yield kept
        if batch[-1][0] >= position:
            return


def _rebuild_and_compare(
    scratch: psycopg.Connection[Any],
    ledger: JobLedger,
    schema: str,
    columns: dict[str, tuple[str, ...]],
    position: int,
) -> DriftReport:
    """Rebuild the scratch views up to `position` and compare them with the live copies."""
    # jsonb numbers as Decimal, so they compare exactly, like numeric columns.
    set_json_loads(partial(json.loads, parse_float=Decimal), scratch)
    differences: list[Difference] = []
    counts: dict[str, int] = {}
    with scratch.transaction(force_rollback=True):
        rebuilt_position = tables.rebuild(scratch, _log_until(ledger, position))
        if rebuilt_position != position:
            # The live tracking row names a position the log does not reach.
            differences.append(
                Difference(
                    TRACKING_TABLE,
                    tables.PROJECTION_NAME,
                    "different",
                    {"position": (position, rebuilt_position)},
                )
            )
        for table in COMPARED:
            counts[table.name] = _compare_table(
                scratch, schema, table, columns[table.name], differences
            )
    return DriftReport(position=position, tables=counts, differences=differences)


def _compare_table(
    scratch: psycopg.Connection[Any],
    schema: str,
    table: _Table,
    columns: tuple[str, ...],
    differences: list[Difference],
) -> int:
    """Append the differences between a live copy and its rebuild; the number of keys compared."""
    width = len(columns)
    query = sql.SQL(
        "SELECT {live_present}, {rebuilt_present}, {live_columns}, {rebuilt_columns} "
        "FROM {live} AS l FULL JOIN {rebuilt} AS r ON {join} ORDER BY {order}"
    ).format(
        live_present=sql.SQL("l.{} IS NOT NULL").format(sql.Identifier(table.key[0])),
        rebuilt_present=sql.SQL("r.{} IS NOT NULL").format(sql.Identifier(table.key[0])),
        live_columns=sql.SQL(", ").join(sql.Identifier("l", c) for c in columns),
        rebuilt_columns=sql.SQL(", ").join(sql.Identifier("r", c) for c in columns),
        live=sql.Identifier(schema, _LIVE_PREFIX + table.name),
        rebuilt=sql.Identifier(schema, table.name),
        join=sql.SQL(" AND ").join(
            sql.SQL("l.{0} = r.{0}").format(sql.Identifier(k)) for k in table.key
        ),
        order=sql.SQL(", ").join(
            sql.SQL("coalesce(l.{0}, r.{0})").format(sql.Identifier(k)) for k in table.key
        ),
    )
    key_indexes = [columns.index(k) for k in table.key]
    compared = 0
    with scratch.cursor(name=f"drift_{table.name}") as rows:
        rows.itersize = _FETCH_ROWS
        rows.execute(query)
        for in_live, in_rebuilt, *values in rows:
            compared += 1
            live, rebuilt = values[:width], values[width:]
            present = live if in_live else rebuilt
            key = "/".join(str(present[i]) for i in key_indexes)
            if not in_live:
                differences.append(Difference(table.name, key, "missing"))
            elif not in_rebuilt:
                differences.append(Difference(table.name, key, "extra"))
            elif changed := {
                column: (msgspec.to_builtins(a), msgspec.to_builtins(b))
                for column, a, b in zip(columns, live, rebuilt, strict=True)
                if not _same(a, b)
            }:
                differences.append(Difference(table.name, key, "different", changed))
    return compared


def _same(live: Any, rebuilt: Any) -> bool:
    """Equal values of the same kind: numbers by value, but True is never 1."""
    if isinstance(live, dict) and isinstance(rebuilt, dict):
        return live.keys() == rebuilt.keys() and all(_same(v, rebuilt[k]) for k, v in live.items())
    if isinstance(live, list) and isinstance(rebuilt, list):
        return len(live) == len(rebuilt) and all(map(_same, live, rebuilt))
    if isinstance(live, bool) or isinstance(rebuilt, bool):
        return live is rebuilt
    return bool(live == rebuilt)


def _shown(value: Any) -> str:
    """A value as a person reads it: text as it is, anything else as JSON."""
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def describe(difference: Difference) -> str:
    """One line for a person: which row of which table, and how it differs."""
    head = f"{difference.table} {difference.key}"
    if difference.kind == "missing":
        return f"{head}: missing from the live views (the rebuild has it)"
    if difference.kind == "extra":
        return f"{head}: extra in the live views (the rebuild has no such row)"
    changes = ", ".join(
        f"{column} live={_shown(live)} rebuilt={_shown(rebuilt)}"
        for column, (live, rebuilt) in difference.columns.items()
    )
    return f"{head}: {changes}"


def summary(report: DriftReport) -> str:
    """The closing line: what was compared, at which position, and the verdict."""
    compared = ", ".join(f"{report.tables[t.name]} {t.label}" for t in COMPARED)
    found = len(report.differences)
    verdict = "no drift" if found == 0 else f"{found} difference{'s' if found > 1 else ''}"
    return f"compared {compared} at log position {report.position}: {verdict}"


def run_drift(settings: Settings, *, as_json: bool = False) -> int:
    """Check for drift and print the report; 0 when the views match the log, 1 when not."""
    # app.cli is the composition root and dispatches to this module: import it lazily.
    from app.cli import ledger_database

    with ledger_database(settings) as dsn:
        ledger = JobLedger(postgres_env(dsn))
        try:
            report = check_drift(ledger, dsn)
        finally:
            ledger.close()
    if as_json:
        print(msgspec.json.encode(report).decode())
    else:
        for difference in report.differences:
            print(describe(difference))
        print(summary(report))
    return 1 if report.differences else 0
