"""Re-verify miners' signed receipts from stored events alone, in log order.

Fed every stored event row in position order (from the database or from an export), it
tracks which keys each miner had registered and revoked at that point of the log, and
checks every completion's receipt against the key it names: the signature over the
exact claims, and claims that match the completion (job, attempt, miner, result digest
and size). A completion without a receipt is counted as unsigned; from a miner that had
registered a key it is a finding, since the ledger should have refused it.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import msgspec

from app import protocol
from app.audit.findings import Finding
from app.receipts import InvalidReceipt, check_claims, decode_public_key, verify_receipt
from domain.jobs import job_id_of
from domain.miners import miner_id_of

_KEY_REGISTERED = "domain.miners:Miner.KeyRegistered"
_KEY_REVOKED = "domain.miners:Miner.KeyRevoked"
_COMPLETED = "domain.jobs:Job.Completed"
# The events that change which keys a miner signs with.
MINER_KEY_TOPICS = (_KEY_REGISTERED, _KEY_REVOKED)


class ReceiptCheck:
    """Miner keys as of the events seen so far, and what the receipts of completions say."""

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str], bytes] = {}
        self._revoked: set[tuple[str, str]] = set()
        self._miners_with_keys: set[str] = set()
        self.verified = 0
        self.unsigned = 0
        self.findings: list[Finding] = []

    def know_key(self, miner_id: str, key_id: str, public_key: str, *, revoked: bool) -> None:
        """A key registered before the first event seen (an export's context)."""
        self._miners_with_keys.add(miner_id)
        if revoked:
            self._revoked.add((miner_id, key_id))
        else:
            self._keys[(miner_id, key_id)] = decode_public_key(public_key)

    def observe(self, row: tuple[Any, ...]) -> None:
        """Take in one stored event (position, originator id, version, topic, state)."""
        position, originator_id, version, topic, state = row
        if topic not in (_KEY_REGISTERED, _KEY_REVOKED, _COMPLETED):
            return
        try:
            data = json.loads(bytes(state))
        except ValueError:
            return  # a damaged row: the chain check reports it
        if topic == _COMPLETED:
            self._completion(position, originator_id, version, data)
            return
        miner_id = miner_id_of(originator_id)
        key = (miner_id, str(data.get("key_id")))
        if topic == _KEY_REVOKED:
            self._keys.pop(key, None)
            self._revoked.add(key)
            return
        self._miners_with_keys.add(miner_id)
        try:
            self._keys[key] = decode_public_key(str(data.get("public_key")))
        except (InvalidReceipt, ValueError):
            self._finding(position, miner_id, version, f"key {key[1]} is not a valid public key")

    def _completion(
        self, position: int, originator_id: UUID, version: int, data: dict[str, Any]
    ) -> None:
        job_id = job_id_of(originator_id)
        miner_id = str(data.get("miner_id"))
        receipt = data.get("receipt")
        if receipt is None:
            self.unsigned += 1
            if miner_id in self._miners_with_keys:
                self._finding(
                    position, job_id, version, f"no receipt, though {miner_id} had a signing key"
                )
            return
        try:
            parsed = msgspec.convert(receipt, protocol.Receipt)
            key = self._keys.get((miner_id, parsed.key_id))
            if key is None:
                state = "revoked" if (miner_id, parsed.key_id) in self._revoked else "unknown"
                raise InvalidReceipt(f"signed with {state} key {parsed.key_id} of {miner_id}")
            claims = verify_receipt(parsed, key)
            result = data.get("result") or {}
            check_claims(
                claims,
                job_id=job_id,
                attempt=int(data.get("attempt", 0)),
                miner_id=miner_id,
                result_sha256=str(result.get("sha256")),
                result_size_bytes=int(result.get("size_bytes", -1)),
            )
            if msgspec.to_builtins(claims.metrics) != data.get("metrics"):
                raise InvalidReceipt("the receipt's metrics are not the completion's")
        except (InvalidReceipt, msgspec.ValidationError, ValueError) as error:
            self._finding(position, job_id, version, f"receipt does not verify: {error}")
            return
        self.verified += 1

    def _finding(self, position: int, aggregate_id: str, version: int, detail: str) -> None:
        self.findings.append(
            Finding(
                kind="receipt",
                position=position,
                aggregate_id=aggregate_id,
                version=version,
                detail=detail,
            )
        )
