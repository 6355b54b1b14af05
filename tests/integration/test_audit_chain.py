"""The hash chains on a real event store: a clean ledger verifies, every kind of tampering shows."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from app.audit import chain
from app.audit.export import export_lines, verify_export
from app.audit.findings import Report
from app.audit.sealer import Sealer, create_schema
from app.audit.signing import LedgerKey
from app.audit.verify import verify_job, verify_ledger
from app.store import JobLedger, postgres_env
from domain.jobs import aggregate_id_of
from tests.integration.helpers import run_to_completion, spec
from tests.unit.job_builders import RIG


@dataclass
class Scene:
    ledger: JobLedger
    conn: psycopg.Connection[Any]
    sealer: Sealer
    key: LedgerKey
    table: str
    jobs: list[str]

    def seal(self) -> None:
        self.sealer.catch_up(self.conn, checkpoint=True)

    def verify(self, **pinned: Any) -> Report:
        return verify_ledger(self.conn, self.table, **pinned)

    def execute(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        cursor = self.conn.execute(query.replace("EVENTS", self.table), params)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
def scene(database_url: str, tmp_path: Path) -> Iterator[Scene]:
    ledger = JobLedger(postgres_env(database_url))
    key = LedgerKey.load_or_create(tmp_path / "audit.pem")
    with psycopg.connect(database_url, autocommit=True) as conn:
        create_schema(conn)
        sealer = Sealer(ledger, database_url, key)
        table = ledger.recorder.events_table_name  # type: ignore[attr-defined]
        jobs = []
        for n in range(6):
            job_id = ledger.submit(owner="alice", spec=spec(), idempotency_key=None).job_id
            jobs.append(job_id)
            if n % 2 == 0:
                run_to_completion(ledger, job_id)
            if n == 2:
                # A gap in the positions, as a rolled-back write leaves one.
                conn.execute(
                    f"SELECT nextval(pg_get_serial_sequence('{table}', 'notification_id'))"
                )
        ledger.register_miner("rig", RIG)
        scene = Scene(ledger, conn, sealer, key, table, jobs)
        scene.seal()
        yield scene
    ledger.close()


def test_a_clean_ledger_verifies_with_no_findings(scene: Scene) -> None:
    report = scene.verify()
    assert report.findings == []
    assert report.events == scene.ledger.head() - 1  # one position is the gap
    assert report.sealed_through == scene.ledger.head()
    assert report.signed_through == scene.ledger.head() and report.checkpoints >= 1
    assert report.key_ids == [scene.key.key_id]
    for job_id in scene.jobs:
        assert verify_job(scene.conn, scene.table, job_id).findings == []


def test_new_events_are_unsealed_until_the_sealer_covers_them(scene: Scene) -> None:
    scene.ledger.submit(owner="alice", spec=spec(), idempotency_key=None)
    report = scene.verify()
    assert (report.findings, report.unsealed) == ([], 1)
    scene.seal()
    assert (scene.verify().findings, scene.verify().unsealed) == ([], 0)


def kinds(report: Report) -> set[tuple[str, int | None]]:
    return {(finding.kind, finding.position) for finding in report.findings}


def test_a_modified_event_is_found_by_position_and_job(scene: Scene) -> None:
    [(position, version)] = scene.execute(
        "SELECT notification_id, originator_version FROM EVENTS "
        "WHERE topic LIKE '%%Job.Completed' ORDER BY notification_id LIMIT 1"
    )
    scene.execute(
        "UPDATE EVENTS SET state = convert_to(replace(convert_from(state, 'UTF8'), "
        "'\"0.05\"', '\"0.01\"'), 'UTF8') "
        "WHERE notification_id = %s",
        position,
    )
    report = scene.verify()
    [finding] = report.findings
    assert (finding.kind, finding.position, finding.version) == ("modified", position, version)
    assert finding.aggregate_id in scene.jobs
    assert [f.kind for f in verify_job(scene.conn, scene.table, finding.aggregate_id).findings] == [
        "modified"
    ]


def test_a_deleted_event_is_found(scene: Scene) -> None:
    position = scene.ledger.head() - 3
    scene.execute("DELETE FROM EVENTS WHERE notification_id = %s", position)
    assert kinds(scene.verify()) == {("deleted", position)}


def test_an_event_inserted_among_sealed_ones_is_found(scene: Scene) -> None:
    [(gap,)] = scene.execute(
        "SELECT s.i FROM generate_series(1, %s) AS s(i) "
        "WHERE NOT EXISTS (SELECT 1 FROM EVENTS WHERE notification_id = s.i)",
        scene.ledger.head(),
    )
    scene.execute(
        "INSERT INTO EVENTS (originator_id, originator_version, topic, state, notification_id) "
        "SELECT originator_id, originator_version + 100, topic, state, %s FROM EVENTS "
        "WHERE notification_id = 1",
        gap,
    )
    assert kinds(scene.verify()) == {("inserted", gap)}


def test_reordered_events_are_found(scene: Scene) -> None:
    head = scene.ledger.head()
    first, second = head - 1, head - 4
    scene.execute("UPDATE EVENTS SET notification_id = -1 WHERE notification_id = %s", first)
    scene.execute(
        "UPDATE EVENTS SET notification_id = %s WHERE notification_id = %s", first, second
    )
    scene.execute("UPDATE EVENTS SET notification_id = %s WHERE notification_id = -1", second)
    assert kinds(scene.verify()) == {("reordered", first), ("reordered", second)}


def test_an_edited_chain_row_and_a_rewritten_chain_are_found(scene: Scene) -> None:
    position = scene.ledger.head() - 2
    scene.execute(
        "UPDATE jobledger_audit_chain SET event_hash = %s WHERE position = %s",
        bytes(32),
        position,
    )
    assert ("chain", position) in kinds(scene.verify())


def test_a_consistently_rewritten_chain_fails_its_signed_checkpoint(scene: Scene) -> None:
    """Someone who edits an event and recomputes every link after it cannot re-sign."""
    position = 1  # a JobSubmitted: its owner is changed
    scene.execute(
        "UPDATE EVENTS SET state = convert_to(replace(convert_from(state, 'UTF8'), "
        "'alice', 'mallory'), 'UTF8') "
        "WHERE notification_id = %s",
        position,
    )
    rows = scene.execute(
        "SELECT notification_id, originator_id, originator_version, topic, state FROM EVENTS "
        "WHERE notification_id >= %s ORDER BY notification_id",
        position,
    )
    before = scene.execute(
        "SELECT log_hash FROM jobledger_audit_chain WHERE position < %s "
        "ORDER BY position DESC LIMIT 1",
        position,
    )
    log_hash = bytes(before[0][0]) if before else chain.GENESIS
    for at, originator_id, version, topic, state in rows:
        event = chain.event_hash(originator_id, version, topic, bytes(state))
        log_hash = chain.log_link(log_hash, at, event)
        [(previous,)] = scene.execute(
            "SELECT coalesce((SELECT aggregate_hash FROM jobledger_audit_chain "
            "WHERE originator_id = %s AND originator_version = %s), %s)",
            originator_id,
            version - 1,
            chain.GENESIS,
        )
        scene.execute(
            "UPDATE jobledger_audit_chain SET event_hash = %s, aggregate_hash = %s, "
            "log_hash = %s WHERE position = %s",
            event,
            chain.aggregate_link(bytes(previous), event),
            log_hash,
            at,
        )
    found = kinds(scene.verify())
    assert {kind for kind, _ in found} == {"checkpoint"}, found


def test_a_forged_checkpoint_signature_is_found(scene: Scene, tmp_path: Path) -> None:
    other = LedgerKey.load_or_create(tmp_path / "someone-else.pem")
    report = scene.verify(pinned_keys={other.key_id: other.public_key})
    assert {f.kind for f in report.findings} == {"checkpoint"}
    scene.execute("UPDATE jobledger_audit_checkpoints SET signature = %s", bytes(64))
    assert {f.kind for f in scene.verify().findings} == {"checkpoint"}


def test_a_thousand_random_single_byte_changes_are_all_found(scene: Scene) -> None:
    rows = scene.execute("SELECT notification_id, topic, state FROM EVENTS")
    chooser = random.Random(20261129)
    missed = []
    for _ in range(1000):
        position, topic, state = chooser.choice(rows)
        column, original = chooser.choice([("state", bytes(state)), ("topic", topic.encode())])
        index = chooser.randrange(len(original))
        changed = bytearray(original)
        if column == "topic":  # text must stay valid: another printable ASCII character
            changed[index] = chooser.choice([c for c in range(32, 127) if c != original[index]])
            scene.execute(
                "UPDATE EVENTS SET topic = %s WHERE notification_id = %s",
                changed.decode("ascii"),
                position,
            )
        else:
            changed[index] = (changed[index] + chooser.randrange(1, 256)) % 256
            scene.execute(
                "UPDATE EVENTS SET state = %s WHERE notification_id = %s", bytes(changed), position
            )
        if ("modified", position) not in kinds(scene.verify()):
            missed.append((position, column, index))
        scene.execute(
            f"UPDATE EVENTS SET {column} = %s WHERE notification_id = %s",
            original if column == "state" else topic,
            position,
        )
    assert missed == []
    assert scene.verify().findings == []


# ---- exports, verified offline ---------------------------------------------------------

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def export(scene: Scene, start: datetime = EPOCH, end: datetime | None = None) -> list[bytes]:
    with psycopg.connect(scene.conn.info.dsn, autocommit=True) as conn:
        return list(export_lines(scene.ledger, conn, scene.key, start, end or datetime.now(UTC)))


def offline(lines: list[bytes], key: LedgerKey | None = None) -> Report:
    pinned = {key.key_id: key.public_key} if key else None
    return verify_export(lines, pinned_keys=pinned, scope="test.ndjson")


def test_an_export_verifies_offline_with_the_ledger_key(scene: Scene) -> None:
    lines = export(scene)
    report = offline(lines, scene.key)
    assert report.findings == []
    assert report.events == scene.verify().events
    assert report.signed_through == scene.ledger.head()
    assert json.loads(lines[0])["type"] == "header" and json.loads(lines[-1])["type"] == "end"


def test_a_window_export_starts_from_the_link_before_it(scene: Scene) -> None:
    [(middle,)] = scene.execute(
        "SELECT recorded_at FROM jobledger_audit_chain ORDER BY position OFFSET 5 LIMIT 1"
    )
    lines = export(scene, start=middle)
    header = json.loads(lines[0])
    assert header["first_position"] > 1 and header["previous_log_hash"] != "00" * 32
    assert offline(lines, scene.key).findings == []


def test_a_changed_dropped_or_moved_line_breaks_the_export(scene: Scene) -> None:
    lines = export(scene)
    event_at = next(i for i, line in enumerate(lines) if b'"type":"event"' in line)
    record = json.loads(lines[event_at])
    state = bytearray(base64.b64decode(record["state"]))
    state[-2] ^= 1
    record["state"] = base64.b64encode(bytes(state)).decode()
    changed = [*lines]
    changed[event_at] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    assert {"modified", "export"} <= {f.kind for f in offline(changed, scene.key).findings}
    dropped = lines[:event_at] + lines[event_at + 1 :]
    assert offline(dropped, scene.key).findings
    moved = [*lines]
    moved[event_at], moved[event_at + 1] = moved[event_at + 1], moved[event_at]
    assert offline(moved, scene.key).findings
    assert offline(lines[:-1], scene.key).findings  # cut short: no end line


def test_an_export_signed_by_another_key_is_not_trusted(scene: Scene, tmp_path: Path) -> None:
    other = LedgerKey.load_or_create(tmp_path / "other.pem")
    report = offline(export(scene), other)
    assert report.findings and {f.kind for f in report.findings} <= {"checkpoint", "export"}


# ---- receipts, re-verified from the log and from an export -----------------------------


def test_receipts_are_reverified_from_the_log_and_from_an_export(scene: Scene) -> None:
    from tests.integration.test_receipts_ledger import give_key, signed_completion
    from tests.integration.test_reports import make_scene

    signed = make_scene(scene.ledger)
    key = give_key(scene.ledger, signed.miner)
    signed.report(signed_completion(key, signed.job_id, signed.miner))
    unsigned = make_scene(scene.ledger)  # its miner registered no key: accepted unsigned
    unsigned.report(signed_completion(None, unsigned.job_id, unsigned.miner))
    scene.seal()
    report = scene.verify()
    assert (report.findings, report.receipts_verified) == ([], 1)
    assert report.unsigned_completions == 1 + len(scene.jobs) // 2  # run_to_completion's
    assert verify_job(scene.conn, scene.table, signed.job_id).receipts_verified == 1
    # An export starting after the key was registered still carries it, in its header.
    [(after_key,)] = scene.execute(
        "SELECT recorded_at FROM jobledger_audit_chain c JOIN EVENTS e "
        "ON e.notification_id = c.position WHERE e.topic LIKE '%%Job.Completed' "
        "ORDER BY c.position DESC LIMIT 1 OFFSET 1"
    )
    lines = export(scene, start=after_key)
    assert json.loads(lines[0])["miner_keys"]
    exported = offline(lines, scene.key)
    assert (exported.findings, exported.receipts_verified) == ([], 1)


def test_a_receipt_edited_in_the_database_is_found(scene: Scene) -> None:
    from tests.integration.test_receipts_ledger import give_key, signed_completion
    from tests.integration.test_reports import make_scene

    signed = make_scene(scene.ledger)
    key = give_key(scene.ledger, signed.miner)
    signed.report(signed_completion(key, signed.job_id, signed.miner))
    scene.seal()
    [(position, state)] = scene.execute(
        "SELECT notification_id, state FROM EVENTS "
        "WHERE topic LIKE '%%Job.Completed' AND originator_id = %s",
        aggregate_id_of(signed.job_id),
    )
    # The claims travel as a JSON string inside the event: its quotes are escaped there.
    claimed = b'\\"attempt\\":1'
    assert claimed in bytes(state)
    edited = bytes(state).replace(claimed, b'\\"attempt\\":2')
    scene.execute("UPDATE EVENTS SET state = %s WHERE notification_id = %s", edited, position)
    kinds_found = {f.kind for f in scene.verify().findings}
    assert kinds_found == {"modified", "receipt"}, kinds_found
