"""`jobledger audit verify`: check the database's log, one job, or an export file offline."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
import psycopg

from app.audit.export import verify_export
from app.audit.findings import Report
from app.audit.signing import decode_key
from app.config import Settings
from app.receipts import key_id_of


def pinned_key(value: str | None) -> dict[str, bytes] | None:
    """The trusted ledger key from --key: a file holding base64 or PEM, or the base64 itself."""
    if value is None:
        return None
    path = Path(value)
    text = path.read_text() if path.is_file() else value
    raw = decode_key(text)
    return {key_id_of(raw): raw}


def print_report(report: Report, *, as_json: bool) -> None:
    """The report for people (one line per finding, then a summary) or as JSON."""
    if as_json:
        print(msgspec.json.format(msgspec.json.encode(report), indent=2).decode())
        return
    for finding in report.findings:
        where = f"position {finding.position}" if finding.position is not None else "export"
        what = f" {finding.aggregate_id}" if finding.aggregate_id else ""
        version = f" v{finding.version}" if finding.version is not None else ""
        print(f"{finding.kind.upper():10} {where}{what}{version}: {finding.detail}")
    keys = ", ".join(report.key_ids) or "none"
    print(
        f"{report.scope}: {report.events} events, sealed through position "
        f"{report.sealed_through} ({report.unsealed} not sealed yet), {report.checkpoints} "
        f"checkpoints, signed through position {report.signed_through} by {keys}; "
        f"{report.receipts_verified} receipts verified, {report.unsigned_completions} "
        f"unsigned completions"
    )
    print(f"{len(report.findings)} findings" if report.findings else "no findings")


def run_verify(
    settings: Settings,
    *,
    job_id: str | None,
    export_file: str | None,
    key: str | None,
    as_json: bool,
) -> int:
    """Verify and print; 0 when nothing was found, 1 when something was."""
    pinned = pinned_key(key)
    if export_file is not None:
        if job_id is not None:
            raise ValueError("--job and --file do not go together: an export is checked whole")
        with open(export_file, "rb") as lines:
            report = verify_export(lines, pinned_keys=pinned, scope=export_file)
        if pinned is None:
            print(
                "note: checked against the keys the export itself names; pass --key with the "
                "key from GET /v1/audit/key to trust only that one",
                file=sys.stderr,
            )
    else:
        from app.audit.verify import verify_job, verify_ledger
        from app.cli import ledger_database
        from app.store import JobLedger, postgres_env

        with ledger_database(settings) as dsn:
            ledger = JobLedger(postgres_env(dsn))
            table = ledger.recorder.events_table_name  # type: ignore[attr-defined]
            ledger.close()
            with psycopg.connect(dsn, autocommit=True) as conn:
                report = (
                    verify_ledger(conn, table, pinned_keys=pinned)
                    if job_id is None
                    else verify_job(conn, table, job_id, pinned_keys=pinned)
                )
    print_report(report, as_json=as_json)
    return 0 if report.ok else 1
