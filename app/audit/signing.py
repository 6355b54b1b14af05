"""The ledger's Ed25519 key: it signs audit checkpoints and exports.

Keys are named and written as miners' receipt keys are (app/receipts.py).

The private key lives in a file outside the database (`JOBLEDGER_AUDIT_KEY_FILE`, by
default `$JOBLEDGER_HOME/keys/audit-ed25519.pem`), created on first start with mode
0600. Someone who can rewrite the database but not read this file cannot forge a
checkpoint. Several API processes must share the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from app.receipts import InvalidReceipt, decode_public_key, key_id_of, raw_public_key

ALGORITHM = "Ed25519"


def decode_key(text: str) -> bytes:
    """A public key from base64 (raw 32 bytes) or a PEM block; ValueError otherwise."""
    stripped = text.strip()
    if stripped.startswith("-----BEGIN"):
        loaded = serialization.load_pem_public_key(stripped.encode("ascii"))
        if not isinstance(loaded, Ed25519PublicKey):
            raise ValueError("the PEM block is not an Ed25519 public key")
        return loaded.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        return decode_public_key(stripped)
    except InvalidReceipt as why:
        raise ValueError(f"{why} (give the key in base64, or as a PEM block)") from None


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True if `signature` is the key's signature of `message`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class LedgerKey:
    """The ledger's signing key and the names others know it by."""

    private_key: Ed25519PrivateKey
    public_key: bytes
    key_id: str

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message`."""
        return self.private_key.sign(message)

    def public_pem(self) -> str:
        """The public key as a PEM block (SubjectPublicKeyInfo)."""
        return (
            self.private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )

    @classmethod
    def load_or_create(cls, path: Path) -> LedgerKey:
        """The key in `path`, created (mode 0600) if the file does not exist yet."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            # Written aside, then linked into place: a racing process sees no half file.
            temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(pem)
                file.flush()
                os.fsync(file.fileno())
            try:
                os.link(temp, path)
            except FileExistsError:
                pass  # another process created it first: use theirs
            finally:
                temp.unlink()
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        public = raw_public_key(loaded)
        return cls(private_key=loaded, public_key=public, key_id=key_id_of(public))
