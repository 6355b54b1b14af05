"""Signed receipts on a real PostgreSQL ledger: what completions are accepted, and re-verified."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app import protocol
from app.blobs import BlobInfo
from app.ingestor import Outcome, apply_report, apply_reports
from app.receipts import (
    ReceiptClaims,
    check_claims,
    decode_public_key,
    encode_public_key,
    key_id_of,
    raw_public_key,
    sign_claims,
    verify_receipt,
)
from app.store import JobLedger, event_type_name
from domain.jobs import RequeueCause, job_id_of
from domain.miners import Miner, miner_id_of
from tests.integration.test_reports import MAX_ATTEMPTS, OUTPUT, Scene, inline, make_scene, now

METRICS = protocol.Metrics(execution_seconds=0.25, gpu_seconds=0.25)


def give_key(ledger: JobLedger, miner_id: str) -> Ed25519PrivateKey:
    """A new receipt key, registered for the miner as the API does."""
    key = Ed25519PrivateKey.generate()
    raw = raw_public_key(key)
    ledger.change_miner(
        miner_id, lambda miner: miner.register_key(key_id_of(raw), encode_public_key(raw))
    )
    return key


def claims_for(
    job_id: str,
    miner_id: str,
    result: protocol.InlineResult | protocol.StoredResult,
    *,
    attempt: int = 1,
    metrics: protocol.Metrics = METRICS,
) -> ReceiptClaims:
    finished = now()
    return ReceiptClaims(
        job_id=job_id,
        attempt=attempt,
        miner_id=miner_id,
        result_sha256=result.sha256,
        result_size_bytes=result.size_bytes,
        metrics=metrics,
        started_at=finished - timedelta(seconds=metrics.execution_seconds),
        finished_at=finished,
    )


def signed_completion(
    key: Ed25519PrivateKey | None,
    job_id: str,
    miner_id: str,
    *,
    attempt: int = 1,
    result: protocol.InlineResult | protocol.StoredResult | None = None,
    receipt: protocol.Receipt | None = None,
) -> protocol.Completed:
    """The holder's completion, signed by `key` unless a `receipt` is given (or no key)."""
    result = result or inline()
    if receipt is None and key is not None:
        receipt = sign_claims(key, claims_for(job_id, miner_id, result, attempt=attempt))
    return protocol.Completed(
        miner_id=miner_id,
        attempt=attempt,
        at=now(),
        result=result,
        metrics=METRICS,
        receipt=receipt,
    )


@dataclass
class Signed:
    scene: Scene
    key: Ed25519PrivateKey

    def complete(self, **changes: Any) -> Outcome:
        return self.scene.report(
            signed_completion(self.key, self.scene.job_id, self.scene.miner, **changes)
        )

    def rejections(self) -> list[dict[str, Any]]:
        return [
            e.data
            for e in self.scene.ledger.job_events(self.scene.job_id, owner=None)
            if e.type == "JobReportRejected"
        ]

    def assert_refused(self, outcome: Outcome, problem: str) -> None:
        """Recorded as a rejected completion; the attempt still runs, nothing else changed."""
        assert outcome is Outcome.REJECTED
        [rejection] = self.rejections()
        assert rejection["kind"] == "completed"
        assert rejection["reason"].startswith("receipt: "), rejection["reason"]
        assert problem in rejection["reason"], rejection["reason"]
        row = self.scene.ledger.job_row(self.scene.job_id, owner=None)
        assert (row.status, row.miner_id, row.attempt, row.result, row.cost) == (
            "running",
            self.scene.miner,
            1,
            None,
            None,
        )
        assert self.scene.terminal_events() == []


@pytest.fixture
def signed(ledger: JobLedger) -> Signed:
    scene = make_scene(ledger)
    key = give_key(ledger, scene.miner)
    scene.report(protocol.Started(miner_id=scene.miner, attempt=1, at=now()))
    return Signed(scene, key)


def completed_data(scene: Scene) -> dict[str, Any]:
    [done] = [
        e.data
        for e in scene.ledger.job_events(scene.job_id, owner=None)
        if e.type == "JobCompleted"
    ]
    return done


def test_a_valid_receipt_completes_the_job_and_is_recorded(signed: Signed) -> None:
    report = signed_completion(signed.key, signed.scene.job_id, signed.scene.miner)
    assert signed.scene.report(report) is Outcome.APPLIED
    assert signed.scene.status() == "completed"
    assert report.receipt is not None
    assert completed_data(signed.scene)["receipt"] == protocol.to_builtins(report.receipt)


def test_the_stored_receipt_verifies_again_from_the_event_data(signed: Signed) -> None:
    assert signed.complete() is Outcome.APPLIED
    data = completed_data(signed.scene)
    miner = signed.scene.ledger.miner(data["miner_id"])
    receipt = msgspec.convert(data["receipt"], protocol.Receipt)
    claims = verify_receipt(receipt, decode_public_key(miner.keys[receipt.key_id]))
    check_claims(
        claims,
        job_id=signed.scene.job_id,
        attempt=data["attempt"],
        miner_id=data["miner_id"],
        result_sha256=data["result"]["sha256"],
        result_size_bytes=data["result"]["size_bytes"],
    )
    assert msgspec.to_builtins(claims.metrics) == data["metrics"]


def test_an_auditor_reverifies_every_receipt_from_the_exported_log_alone(
    ledger: JobLedger,
) -> None:
    """Keys come from MinerKeyRegistered events, receipts from JobCompleted: nothing else."""
    scenes = [make_scene(ledger) for _ in range(2)]
    for scene in scenes:
        key = give_key(ledger, scene.miner)
        assert scene.report(signed_completion(key, scene.job_id, scene.miner)) is Outcome.APPLIED

    exported = [
        (event_type_name(event), event) for batch in ledger.read_whole_log() for _, event in batch
    ]
    keys = {
        (miner_id_of(event.originator_id), event.key_id): event.public_key
        for name, event in exported
        if name == "MinerKeyRegistered"
    }
    verified = []
    for name, event in exported:
        if name != "JobCompleted":
            continue
        receipt = msgspec.convert(event.receipt, protocol.Receipt)
        claims = verify_receipt(receipt, decode_public_key(keys[(event.miner_id, receipt.key_id)]))
        check_claims(
            claims,
            job_id=job_id_of(event.originator_id),
            attempt=event.attempt,
            miner_id=event.miner_id,
            result_sha256=event.result["sha256"],
            result_size_bytes=event.result["size_bytes"],
        )
        verified.append(job_id_of(event.originator_id))
    assert sorted(verified) == sorted(scene.job_id for scene in scenes)


def test_a_bad_signature_is_rejected_and_a_valid_completion_still_counts(
    signed: Signed,
) -> None:
    report = signed_completion(signed.key, signed.scene.job_id, signed.scene.miner)
    assert report.receipt is not None
    raw = bytearray(base64.b64decode(report.receipt.signature))
    raw[-1] ^= 0x80
    broken = msgspec.structs.replace(report.receipt, signature=base64.b64encode(raw).decode())
    outcome = signed.scene.report(msgspec.structs.replace(report, receipt=broken))
    signed.assert_refused(outcome, "signature does not match")

    assert signed.scene.report(report) is Outcome.APPLIED
    assert signed.scene.status() == "completed"


def test_a_completion_without_a_receipt_from_a_miner_with_a_key_is_rejected(
    signed: Signed,
) -> None:
    unsigned = signed_completion(None, signed.scene.job_id, signed.scene.miner)
    signed.assert_refused(signed.scene.report(unsigned), "must be signed")


def test_a_receipt_replayed_from_another_job_is_rejected(signed: Signed) -> None:
    scene = signed.scene
    other = make_scene(scene.ledger)
    # The same miner holds the other job too, and the result bytes are the same.
    scene.ledger.change_job(other.job_id, lambda job: job.requeue(RequeueCause.MINER_ERROR))
    scene.ledger.change_job(other.job_id, lambda job: job.assign(scene.miner))
    elsewhere = sign_claims(signed.key, claims_for(other.job_id, scene.miner, inline(), attempt=2))
    replayed = signed_completion(None, scene.job_id, scene.miner, receipt=elsewhere)
    signed.assert_refused(scene.report(replayed), "job_id")


def test_a_receipt_replayed_from_an_earlier_attempt_is_rejected(ledger: JobLedger) -> None:
    scene = make_scene(ledger)
    key = give_key(ledger, scene.miner)
    earlier = sign_claims(key, claims_for(scene.job_id, scene.miner, inline(), attempt=1))
    ledger.change_job(
        scene.job_id, lambda job: job.give_back(RequeueCause.LOST_BY_MINER, max_attempts=3)
    )
    ledger.change_job(scene.job_id, lambda job: job.assign(scene.miner))

    replayed = signed_completion(None, scene.job_id, scene.miner, attempt=2, receipt=earlier)
    assert scene.report(replayed) is Outcome.REJECTED
    [rejection] = [
        e.data for e in ledger.job_events(scene.job_id, owner=None) if e.type == "JobReportRejected"
    ]
    assert "attempt" in rejection["reason"]
    assert (scene.status(), ledger.job(scene.job_id).attempt) == ("assigned", 2)


def test_claims_about_another_result_or_other_metrics_are_rejected(signed: Signed) -> None:
    scene = signed.scene
    other_bytes = sign_claims(
        signed.key, claims_for(scene.job_id, scene.miner, inline("something else\n"))
    )
    outcome = scene.report(signed_completion(None, scene.job_id, scene.miner, receipt=other_bytes))
    signed.assert_refused(outcome, "result_sha256")

    cheaper = protocol.Metrics(execution_seconds=0.01)
    other_metrics = sign_claims(
        signed.key, claims_for(scene.job_id, scene.miner, inline(), metrics=cheaper)
    )
    again = signed_completion(None, scene.job_id, scene.miner, receipt=other_metrics)
    assert scene.report(again) is Outcome.REJECTED  # recorded once per (miner, attempt, kind)
    assert scene.status() == "running"


def test_a_receipt_by_a_revoked_key_is_rejected(signed: Signed) -> None:
    key_id = key_id_of(raw_public_key(signed.key))
    signed.scene.ledger.change_miner(
        signed.scene.miner, lambda miner: miner.revoke_key(key_id, "leaked")
    )
    signed.assert_refused(signed.complete(), "revoked")


def test_a_receipt_by_another_miners_key_is_rejected(signed: Signed) -> None:
    stranger = give_key(signed.scene.ledger, signed.scene.other)
    report = signed_completion(stranger, signed.scene.job_id, signed.scene.miner)
    signed.assert_refused(signed.scene.report(report), "not a key of miner")


def test_a_receipt_is_checked_before_the_result(signed: Signed) -> None:
    """A completion nobody vouches for cannot fail the job with a bad result either."""
    scene = signed.scene
    bad = inline(sha256=hashlib.sha256(b"other").hexdigest())
    unsigned = signed_completion(None, scene.job_id, scene.miner, result=bad)
    signed.assert_refused(scene.report(unsigned), "must be signed")


def test_a_miner_without_keys_completes_unsigned(ledger: JobLedger) -> None:
    scene = make_scene(ledger)
    assert scene.report(signed_completion(None, scene.job_id, scene.miner)) is Outcome.APPLIED
    assert scene.status() == "completed"
    assert completed_data(scene)["receipt"] is None


def test_a_miner_without_keys_cannot_send_a_receipt_it_cannot_back(ledger: JobLedger) -> None:
    scene = make_scene(ledger)
    unregistered = Ed25519PrivateKey.generate()
    report = signed_completion(unregistered, scene.job_id, scene.miner)
    assert scene.report(report) is Outcome.REJECTED
    assert scene.status() == "assigned"


def test_a_stored_result_is_vouched_for_by_its_size_and_digest(ledger: JobLedger) -> None:
    scene = make_scene(ledger)
    key = give_key(ledger, scene.miner)
    data = OUTPUT.encode()
    location = f"local:results/{scene.job_id}/attempt-1/result.txt"
    sha = hashlib.sha256(data).hexdigest()
    ledger.change_job(
        scene.job_id,
        lambda job: job.store_result(
            miner_id=scene.miner,
            attempt=1,
            location=location,
            size_bytes=len(data),
            sha256=sha,
            content_type="text/plain",
        ),
    )
    blobs = {location: BlobInfo(size_bytes=len(data), sha256=sha, content_type="text/plain")}
    stored = protocol.StoredResult(location=location, size_bytes=len(data), sha256=sha)

    wrong_size = sign_claims(
        key,
        ReceiptClaims(
            **msgspec.structs.asdict(claims_for(scene.job_id, scene.miner, stored))
            | {"result_size_bytes": len(data) + 1}
        ),
    )
    refused = signed_completion(None, scene.job_id, scene.miner, result=stored, receipt=wrong_size)
    outcome = apply_report(ledger, scene.job_id, refused, max_attempts=MAX_ATTEMPTS, blobs=blobs)
    assert outcome is Outcome.REJECTED

    report = signed_completion(key, scene.job_id, scene.miner, result=stored)
    outcome = apply_report(ledger, scene.job_id, report, max_attempts=MAX_ATTEMPTS, blobs=blobs)
    assert outcome is Outcome.APPLIED
    assert scene.status() == "completed"
    assert completed_data(scene)["receipt"]["key_id"] == key_id_of(raw_public_key(key))


def test_a_batch_checks_each_completion_against_its_own_job(ledger: JobLedger) -> None:
    first = make_scene(ledger)
    second = make_scene(ledger)
    ledger.change_job(second.job_id, lambda job: job.requeue(RequeueCause.MINER_ERROR))
    ledger.change_job(second.job_id, lambda job: job.assign(first.miner))
    key = give_key(ledger, first.miner)
    good = signed_completion(key, first.job_id, first.miner)
    # The first job's receipt, sent again as the second job's completion, in the same batch.
    stolen = signed_completion(None, second.job_id, first.miner, attempt=2, receipt=good.receipt)
    outcomes = apply_reports(
        ledger, [(first.job_id, good), (second.job_id, stolen)], max_attempts=MAX_ATTEMPTS
    )
    assert outcomes == [Outcome.APPLIED, Outcome.REJECTED]
    assert (first.status(), second.status()) == ("completed", "assigned")


def test_key_events_are_the_miners_own(ledger: JobLedger) -> None:
    scene = make_scene(ledger)
    key = give_key(ledger, scene.miner)
    key_id = key_id_of(raw_public_key(key))
    ledger.change_miner(scene.miner, lambda miner: miner.revoke_key(key_id, "rotated"))
    events: list[Any] = [
        event
        for batch in ledger.read_whole_log()
        for _, event in batch
        if isinstance(event, Miner.KeyRegistered | Miner.KeyRevoked)
    ]
    assert [event_type_name(e) for e in events] == ["MinerKeyRegistered", "MinerKeyRevoked"]
    assert {miner_id_of(e.originator_id) for e in events} == {scene.miner}
    miner = ledger.miner(scene.miner)
    # Still listed, never trusted again; the miner must sign with keys from now on.
    assert (miner.keys, list(miner.registered_keys), miner.revoked_keys) == ({}, [key_id], {key_id})
    assert miner.has_keys
