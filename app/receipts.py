"""Signed miner receipts: a completion's facts, signed with an Ed25519 key the miner registered.

A receipt is `protocol.Receipt`: the claims as JSON text, the id of the signing key and
the signature. The signed bytes are `SIGNED_PREFIX + claims` (the text as sent, UTF-8),
so anyone holding the exported events can check a completion later without trusting
how the ledger re-encodes anything. docs/protocol.md ("Receipts") is the prose form.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import datetime
from typing import Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from app import protocol

# What is signed starts with this, so a receipt signature can never pass for anything else.
SIGNED_PREFIX: Final = b"jobledger-receipt-v1\n"
KEY_ID_PREFIX: Final = "ed25519:"
PUBLIC_KEY_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64


class ReceiptClaims(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a miner vouches for with a receipt: which attempt, which result, what it cost."""

    job_id: str
    attempt: int
    miner_id: str
    result_sha256: str
    result_size_bytes: int
    metrics: protocol.Metrics
    started_at: datetime
    finished_at: datetime


class InvalidReceipt(Exception):
    """Why a receipt does not prove what it claims (message for people)."""


_claims_decoder = msgspec.json.Decoder(ReceiptClaims)


def key_id_of(public_key: bytes) -> str:
    """The id of a public key: 'ed25519:' and the first 32 hex digits of its SHA-256."""
    return KEY_ID_PREFIX + hashlib.sha256(public_key).hexdigest()[:32]


def encode_public_key(public_key: bytes) -> str:
    """A raw 32-byte public key as standard base64, as the ledger records it."""
    return base64.b64encode(public_key).decode("ascii")


def decode_public_key(text: str) -> bytes:
    """The raw 32-byte key behind its base64 text; anything else is InvalidReceipt."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidReceipt("the public key is not standard base64") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise InvalidReceipt(
            f"an Ed25519 public key is {PUBLIC_KEY_BYTES} raw bytes, this one is {len(raw)}"
        )
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as error:
        raise InvalidReceipt(f"not an Ed25519 public key: {error}") from None
    return raw


def raw_public_key(private_key: Ed25519PrivateKey) -> bytes:
    """The raw 32 bytes of a private key's public half."""
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign_claims(private_key: Ed25519PrivateKey, claims: ReceiptClaims) -> protocol.Receipt:
    """A receipt for `claims`, signed by `private_key`."""
    text = msgspec.json.encode(claims)
    signature = private_key.sign(SIGNED_PREFIX + text)
    return protocol.Receipt(
        key_id=key_id_of(raw_public_key(private_key)),
        claims=text.decode("utf-8"),
        signature=base64.b64encode(signature).decode("ascii"),
    )


def verify_receipt(receipt: protocol.Receipt, public_key: bytes) -> ReceiptClaims:
    """The claims a receipt proves, checked against `public_key`; InvalidReceipt otherwise.

    The signature is checked over the claims text exactly as sent, then the text is
    decoded strictly (an unknown field is refused even when it was signed).
    """
    expected = key_id_of(public_key)
    if receipt.key_id != expected:
        raise InvalidReceipt(f"the receipt names key {receipt.key_id}, not {expected}")
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError as error:
        raise InvalidReceipt(f"not an Ed25519 public key: {error}") from None
    try:
        signature = base64.b64decode(receipt.signature.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidReceipt("the signature is not standard base64") from None
    if len(signature) != SIGNATURE_BYTES:
        raise InvalidReceipt(
            f"an Ed25519 signature is {SIGNATURE_BYTES} bytes, this one is {len(signature)}"
        )
    try:
        key.verify(signature, SIGNED_PREFIX + receipt.claims.encode("utf-8"))
    except (InvalidSignature, UnicodeEncodeError):
        raise InvalidReceipt(
            f"the signature does not match the claims (key {receipt.key_id})"
        ) from None
    try:
        return _claims_decoder.decode(receipt.claims)
    except msgspec.DecodeError as error:
        raise InvalidReceipt(f"the claims are malformed: {error}") from None


def check_claims(
    claims: ReceiptClaims,
    *,
    job_id: str,
    attempt: int,
    miner_id: str,
    result_sha256: str,
    result_size_bytes: int,
) -> None:
    """Refuse claims about another job, attempt, miner or result, naming the first difference."""
    expected: tuple[tuple[str, object, object], ...] = (
        ("job_id", claims.job_id, job_id),
        ("attempt", claims.attempt, attempt),
        ("miner_id", claims.miner_id, miner_id),
        ("result_sha256", claims.result_sha256, result_sha256),
        ("result_size_bytes", claims.result_size_bytes, result_size_bytes),
    )
    for field, claimed, actual in expected:
        if claimed != actual:
            raise InvalidReceipt(f"the receipt's {field} is {claimed!r}, not {actual!r}")
