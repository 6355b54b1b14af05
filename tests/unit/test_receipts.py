"""Signed miner receipts: signing, verifying, checking claims; and the Miner's receipt keys."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app import protocol
from app.receipts import (
    SIGNED_PREFIX,
    InvalidReceipt,
    ReceiptClaims,
    check_claims,
    decode_public_key,
    encode_public_key,
    key_id_of,
    raw_public_key,
    sign_claims,
    verify_receipt,
)
from app.relay import aggregate_id_of_event
from domain.errors import Conflict, InvalidJobRequest, NotFound, ReceiptKeyNotFound
from domain.miners import Miner
from tests.unit.job_builders import RIG

JOB = "job_" + "ab" * 16
MINER = "miner_" + "cd" * 16
SHA = hashlib.sha256(b"the result").hexdigest()
START = datetime(2026, 2, 13, 10, 0, 0, 123456, tzinfo=UTC)


def claims(**changes: Any) -> ReceiptClaims:
    fields: dict[str, Any] = {
        "job_id": JOB,
        "attempt": 1,
        "miner_id": MINER,
        "result_sha256": SHA,
        "result_size_bytes": 10,
        "metrics": protocol.Metrics(execution_seconds=2.5, gpu_seconds=2.5),
        "started_at": START,
        "finished_at": START + timedelta(seconds=2.5),
    }
    return ReceiptClaims(**(fields | changes))


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public(key: Ed25519PrivateKey) -> bytes:
    return raw_public_key(key)


def check(found: ReceiptClaims, **changes: Any) -> None:
    expected: dict[str, Any] = {
        "job_id": JOB,
        "attempt": 1,
        "miner_id": MINER,
        "result_sha256": SHA,
        "result_size_bytes": 10,
    }
    check_claims(found, **(expected | changes))


def test_a_signed_receipt_verifies_to_its_claims(key: Ed25519PrivateKey) -> None:
    receipt = sign_claims(key, claims())
    assert receipt.key_id == key_id_of(public(key))
    assert len(base64.b64decode(receipt.signature)) == 64
    found = verify_receipt(receipt, public(key))
    assert found == claims()
    check(found)


def test_the_signature_covers_the_prefix_and_the_claims_text_as_sent(
    key: Ed25519PrivateKey,
) -> None:
    receipt = sign_claims(key, claims())
    assert receipt.claims == msgspec.json.encode(claims()).decode()
    signature = base64.b64decode(receipt.signature)
    key.public_key().verify(signature, SIGNED_PREFIX + receipt.claims.encode())


def test_a_receipt_survives_the_wire_inside_a_completion(key: Ed25519PrivateKey) -> None:
    completed = protocol.Completed(
        miner_id=MINER,
        attempt=1,
        at=START,
        result=protocol.StoredResult(location="local:results/x", size_bytes=10, sha256=SHA),
        metrics=claims().metrics,
        receipt=sign_claims(key, claims()),
    )
    decoded = protocol.report_decoder.decode(protocol.encoder.encode(completed))
    assert isinstance(decoded, protocol.Completed) and decoded.receipt is not None
    assert verify_receipt(decoded.receipt, public(key)) == claims()


def test_verification_uses_the_text_as_sent_never_a_re_encoding(key: Ed25519PrivateKey) -> None:
    # Same facts, other spacing and field order: a different text, so not what was signed.
    receipt = sign_claims(key, claims())
    respaced = json.dumps(dict(reversed(json.loads(receipt.claims).items())), indent=1)
    with pytest.raises(InvalidReceipt, match="signature does not match"):
        verify_receipt(msgspec.structs.replace(receipt, claims=respaced), public(key))

    # And a text signed in another layout verifies as it is.
    text = respaced.encode()
    signed = protocol.Receipt(
        key_id=key_id_of(public(key)),
        claims=respaced,
        signature=base64.b64encode(key.sign(SIGNED_PREFIX + text)).decode(),
    )
    assert verify_receipt(signed, public(key)) == claims()


def test_tampered_claims_are_refused(key: Ed25519PrivateKey) -> None:
    receipt = sign_claims(key, claims())
    tampered = receipt.claims.replace('"attempt":1', '"attempt":2')
    assert tampered != receipt.claims
    with pytest.raises(InvalidReceipt, match="signature does not match"):
        verify_receipt(msgspec.structs.replace(receipt, claims=tampered), public(key))


def test_a_tampered_signature_is_refused(key: Ed25519PrivateKey) -> None:
    receipt = sign_claims(key, claims())
    raw = bytearray(base64.b64decode(receipt.signature))
    raw[0] ^= 1
    flipped = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(InvalidReceipt, match="signature does not match"):
        verify_receipt(msgspec.structs.replace(receipt, signature=flipped), public(key))


@pytest.mark.parametrize(
    ("signature", "problem"),
    [("not base64!", "not standard base64"), (base64.b64encode(b"short").decode(), "64 bytes")],
)
def test_a_malformed_signature_is_refused(
    key: Ed25519PrivateKey, signature: str, problem: str
) -> None:
    receipt = msgspec.structs.replace(sign_claims(key, claims()), signature=signature)
    with pytest.raises(InvalidReceipt, match=problem):
        verify_receipt(receipt, public(key))


def test_a_receipt_signed_by_another_key_is_refused(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    # Signed by `other` but naming `key`: the key id matches, the signature does not.
    forged = msgspec.structs.replace(sign_claims(other, claims()), key_id=key_id_of(public(key)))
    with pytest.raises(InvalidReceipt, match="signature does not match"):
        verify_receipt(forged, public(key))


def test_a_receipt_naming_another_key_is_refused(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    receipt = sign_claims(other, claims())
    with pytest.raises(InvalidReceipt, match=f"names key {receipt.key_id}"):
        verify_receipt(receipt, public(key))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"job_id": "job_" + "ef" * 16}, "job_id"),
        ({"attempt": 2}, "attempt"),
        ({"miner_id": "miner_" + "01" * 16}, "miner_id"),
        ({"result_sha256": "0" * 64}, "result_sha256"),
        ({"result_size_bytes": 11}, "result_size_bytes"),
    ],
)
def test_claims_about_something_else_are_refused_naming_the_field(
    key: Ed25519PrivateKey, changes: dict[str, Any], field: str
) -> None:
    found = verify_receipt(sign_claims(key, claims()), public(key))
    with pytest.raises(InvalidReceipt, match=f"receipt's {field} is"):
        check(found, **changes)


def test_the_first_differing_field_is_named() -> None:
    with pytest.raises(InvalidReceipt, match="job_id"):
        check(claims(), job_id="job_" + "ef" * 16, attempt=9)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda c: c | {"extra": 1}, id="unknown-field"),
        pytest.param(lambda c: c | {"metrics": c["metrics"] | {"watts": 300}}, id="unknown-metric"),
        pytest.param(lambda c: c | {"attempt": "1"}, id="wrong-type"),
        pytest.param(lambda c: {k: v for k, v in c.items() if k != "finished_at"}, id="missing"),
    ],
)
def test_signed_claims_that_do_not_decode_strictly_are_refused(
    key: Ed25519PrivateKey, edit: Any
) -> None:
    text = json.dumps(edit(msgspec.to_builtins(claims())))
    receipt = protocol.Receipt(
        key_id=key_id_of(public(key)),
        claims=text,
        signature=base64.b64encode(key.sign(SIGNED_PREFIX + text.encode())).decode(),
    )
    with pytest.raises(InvalidReceipt, match="claims are malformed"):
        verify_receipt(receipt, public(key))


def test_public_keys_round_trip_through_base64(key: Ed25519PrivateKey) -> None:
    raw = public(key)
    text = encode_public_key(raw)
    assert decode_public_key(text) == raw
    assert key_id_of(raw) == "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64 at all",
        base64.b64encode(b"x" * 31).decode(),
        base64.b64encode(b"x" * 33).decode(),
        base64.urlsafe_b64encode(b"\xff" * 32).decode(),
    ],
)
def test_garbage_is_not_a_public_key(text: str) -> None:
    with pytest.raises(InvalidReceipt):
        decode_public_key(text)


def test_a_signed_completion_has_its_own_message_id(key: Ed25519PrivateKey) -> None:
    def completed(receipt: protocol.Receipt | None) -> protocol.Completed:
        return protocol.Completed(
            miner_id=MINER,
            attempt=1,
            at=START,
            result=protocol.StoredResult(location="local:x", size_bytes=10, sha256=SHA),
            metrics=claims().metrics,
            receipt=receipt,
        )

    genuine = sign_claims(key, claims())
    forged = sign_claims(Ed25519PrivateKey.generate(), claims())
    assert protocol.report_msg_id(JOB, completed(None)) == f"{JOB}:1:completed"
    genuine_id = protocol.report_msg_id(JOB, completed(genuine))
    assert genuine_id.startswith(f"{JOB}:1:completed:")
    # A retry of the same completion keeps its id; another completion cannot take it.
    assert protocol.report_msg_id(JOB, completed(sign_claims(key, claims()))) == genuine_id
    assert protocol.report_msg_id(JOB, completed(forged)) != genuine_id


# ---- the Miner's receipt keys ---------------------------------------------------------


def miner() -> Miner:
    registered = Miner.register("rig", RIG)
    registered.collect_events()
    return registered


def key_fields() -> tuple[str, str]:
    raw = raw_public_key(Ed25519PrivateKey.generate())
    return key_id_of(raw), encode_public_key(raw)


def test_a_miner_registers_keys_once_and_revokes_them_for_good() -> None:
    rig = miner()
    assert not rig.has_keys
    key_id, public_key = key_fields()
    rig.register_key(key_id, public_key)
    rig.register_key(key_id, public_key)  # again: nothing recorded
    assert [type(e).__name__ for e in rig.collect_events()] == ["KeyRegistered"]
    assert (rig.keys, rig.has_keys) == ({key_id: public_key}, True)

    rig.revoke_key(key_id, "leaked")
    rig.revoke_key(key_id, "leaked again")  # again: nothing recorded
    assert [type(e).__name__ for e in rig.collect_events()] == ["KeyRevoked"]
    assert (rig.keys, rig.revoked_keys, rig.has_keys) == ({}, {key_id}, True)
    assert rig.registered_keys == {key_id: public_key}

    with pytest.raises(Conflict, match="revoked"):
        rig.register_key(key_id, public_key)
    assert rig.collect_events() == []


def test_an_unknown_key_cannot_be_revoked() -> None:
    rig = miner()
    with pytest.raises(ReceiptKeyNotFound) as missing:
        rig.revoke_key("ed25519:" + "0" * 32, "why not")
    assert isinstance(missing.value, NotFound)
    assert rig.collect_events() == []


def test_a_deregistered_miner_registers_no_key_but_may_still_revoke() -> None:
    rig = miner()
    key_id, public_key = key_fields()
    rig.register_key(key_id, public_key)
    rig.deregister("retired")
    with pytest.raises(Conflict, match="deregistered"):
        rig.register_key(*key_fields())
    rig.revoke_key(key_id, "retired")
    assert rig.revoked_keys == {key_id}


@pytest.mark.parametrize(
    ("key_id", "public_key"),
    [
        ("rsa:" + "0" * 32, encode_public_key(b"\0" * 32)),
        ("ed25519:" + "0" * 32, "short"),
    ],
)
def test_malformed_key_fields_are_refused(key_id: str, public_key: str) -> None:
    with pytest.raises(InvalidJobRequest):
        miner().register_key(key_id, public_key)


def test_a_miner_rebuilt_from_its_events_has_the_same_keys() -> None:
    rig = Miner.register("rig", RIG)
    first, second = key_fields(), key_fields()
    rig.register_key(*first)
    rig.register_key(*second)
    rig.revoke_key(first[0], "rotated")
    events = rig.collect_events()
    rebuilt: Miner | None = None
    for event in events:
        rebuilt = event.mutate(rebuilt)
    assert rebuilt is not None
    assert (rebuilt.keys, rebuilt.revoked_keys) == ({second[0]: second[1]}, {first[0]})
    assert list(rebuilt.registered_keys) == [first[0], second[0]]
    # The relay publishes key events under the miner's id like its other events.
    assert {aggregate_id_of_event(event) for event in events} == {rig.miner_id}
