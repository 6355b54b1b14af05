"""The Miner aggregate: a GPU machine registered to run jobs, and what it offers."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgspec
from eventsourcing.domain import Aggregate

from domain.errors import Conflict, InvalidJobRequest, MinerNotFound, ReceiptKeyNotFound
from domain.gpus import normalize_gpu_type

MINER_ID_PREFIX = "miner_"
_MINER_ID = re.compile(r"miner_[0-9a-f]{32}")
# A receipt key's id as app/receipts.py computes it: "ed25519:" and 32 hex digits.
_RECEIPT_KEY_ID = re.compile(r"ed25519:[0-9a-f]{32}")
# Standard base64 of a raw 32-byte Ed25519 public key: 44 characters ending in one "=".
_RECEIPT_PUBLIC_KEY = re.compile(r"[A-Za-z0-9+/]{43}=")


def miner_id_of(aggregate_id: UUID) -> str:
    """The public id of a miner: 'miner_' and the aggregate UUID in hex."""
    return MINER_ID_PREFIX + aggregate_id.hex


def miner_aggregate_id_of(miner_id: str) -> UUID:
    """The aggregate UUID behind a public miner id; malformed ids are simply not found."""
    if not _MINER_ID.fullmatch(miner_id):
        raise MinerNotFound(f"miner {miner_id!r} not found", details={"miner_id": miner_id})
    return UUID(hex=miner_id.removeprefix(MINER_ID_PREFIX))


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What a miner offers: its GPUs, where it is, its price and how many jobs it runs at once."""

    gpu_type: str
    gpu_count: int
    vram_gb: int
    location: str
    price_per_hour: Decimal
    max_concurrent: int

    def validated(self) -> Capabilities:
        """The same capabilities with the GPU type normalised; impossible values raise."""
        counts = (("gpu_count", self.gpu_count), ("max_concurrent", self.max_concurrent))
        for field, value in counts:
            if value < 1:
                raise InvalidJobRequest(f"{field} must be at least 1", details={"field": field})
        if self.vram_gb < 0 or self.price_per_hour < 0:
            raise InvalidJobRequest("vram_gb and price_per_hour cannot be negative")
        return msgspec.structs.replace(self, gpu_type=normalize_gpu_type(self.gpu_type))


def _as_event_fields(capabilities: Capabilities) -> dict[str, Any]:
    return msgspec.structs.asdict(capabilities.validated())


class Miner(Aggregate):
    """A registered miner; deregistered miners receive no more work."""

    class Registered(Aggregate.Created):
        name: str
        gpu_type: str
        gpu_count: int
        vram_gb: int
        location: str
        price_per_hour: Decimal
        max_concurrent: int

    class CapabilitiesUpdated(Aggregate.Event):
        gpu_type: str
        gpu_count: int
        vram_gb: int
        location: str
        price_per_hour: Decimal
        max_concurrent: int

        def apply(self, aggregate: Any) -> None:
            """Replace what the miner offers."""
            miner: Miner = aggregate
            miner.capabilities = Capabilities(
                gpu_type=self.gpu_type,
                gpu_count=self.gpu_count,
                vram_gb=self.vram_gb,
                location=self.location,
                price_per_hour=self.price_per_hour,
                max_concurrent=self.max_concurrent,
            )

    class Deregistered(Aggregate.Event):
        reason: str

        def apply(self, aggregate: Any) -> None:
            """Retire the miner for good."""
            miner: Miner = aggregate
            miner.active = False

    class KeyRegistered(Aggregate.Event):
        """The miner will sign its completions' receipts with this Ed25519 key."""

        key_id: str
        # Standard base64 of the raw 32-byte public key.
        public_key: str

        def apply(self, aggregate: Any) -> None:
            """Trust the key for the miner's receipts from now on."""
            miner: Miner = aggregate
            miner.keys[self.key_id] = self.public_key
            miner.registered_keys[self.key_id] = self.public_key

    class KeyRevoked(Aggregate.Event):
        """Receipts signed with this key are refused from now on; it never comes back."""

        key_id: str
        reason: str

        def apply(self, aggregate: Any) -> None:
            """Stop trusting the key for good."""
            miner: Miner = aggregate
            miner.keys.pop(self.key_id, None)
            miner.revoked_keys.add(self.key_id)

    def __init__(
        self,
        *,
        name: str,
        gpu_type: str,
        gpu_count: int,
        vram_gb: int,
        location: str,
        price_per_hour: Decimal,
        max_concurrent: int,
    ) -> None:
        self.name = name
        self.capabilities = Capabilities(
            gpu_type=gpu_type,
            gpu_count=gpu_count,
            vram_gb=vram_gb,
            location=location,
            price_per_hour=price_per_hour,
            max_concurrent=max_concurrent,
        )
        self.active = True
        # Receipt keys: the active ones (key id -> base64 public key), the revoked ids,
        # and every key ever registered, in registration order (for listing).
        self.keys: dict[str, str] = {}
        self.revoked_keys: set[str] = set()
        self.registered_keys: dict[str, str] = {}

    @classmethod
    def register(cls, name: str, capabilities: Capabilities) -> Miner:
        """A new miner offering `capabilities`."""
        if not name.strip():
            raise InvalidJobRequest("name must not be empty", details={"field": "name"})
        return cls(name=name, **_as_event_fields(capabilities))

    @property
    def miner_id(self) -> str:
        """The public id miners and clients see."""
        return miner_id_of(self.id)

    def update_capabilities(self, capabilities: Capabilities) -> None:
        """Change what the miner offers; only while it is registered."""
        self._require_active("update")
        self.trigger_event(self.CapabilitiesUpdated, **_as_event_fields(capabilities))

    def deregister(self, reason: str) -> None:
        """Retire the miner; its assignments are requeued by the scheduler."""
        self._require_active("deregister")
        self.trigger_event(self.Deregistered, reason=reason)

    @property
    def has_keys(self) -> bool:
        """True once the miner registered any receipt key: its completions must carry receipts."""
        return bool(self.registered_keys)

    def register_key(self, key_id: str, public_key: str) -> None:
        """Trust a receipt key; an active key again records nothing, a revoked one is refused."""
        self._require_active("register a key for")
        if not _RECEIPT_KEY_ID.fullmatch(key_id):
            raise InvalidJobRequest(
                f"a receipt key id is 'ed25519:' and 32 hex digits, not {key_id!r}",
                details={"field": "key_id"},
            )
        if not _RECEIPT_PUBLIC_KEY.fullmatch(public_key):
            raise InvalidJobRequest(
                "a receipt public key is the standard base64 of 32 raw bytes",
                details={"field": "public_key"},
            )
        if key_id in self.revoked_keys:
            raise Conflict(
                f"key {key_id} of miner {self.miner_id} was revoked and cannot be registered "
                "again; make a new key",
                details={"key_id": key_id},
            )
        if key_id in self.keys:
            if self.keys[key_id] != public_key:
                raise Conflict(
                    f"key {key_id} of miner {self.miner_id} is registered with another public key",
                    details={"key_id": key_id},
                )
            return
        self.trigger_event(self.KeyRegistered, key_id=key_id, public_key=public_key)

    def revoke_key(self, key_id: str, reason: str) -> None:
        """Stop trusting a receipt key for good; revoking it again records nothing.

        Allowed after deregistration too: withdrawing trust is always safe.
        """
        if key_id in self.revoked_keys:
            return
        if key_id not in self.keys:
            raise ReceiptKeyNotFound(
                f"miner {self.miner_id} has no receipt key {key_id!r}",
                details={"miner_id": self.miner_id, "key_id": key_id},
            )
        self.trigger_event(self.KeyRevoked, key_id=key_id, reason=reason)

    def _require_active(self, command: str) -> None:
        if not self.active:
            raise Conflict(f"cannot {command} miner {self.miner_id}: it is deregistered")


# Every event class of the Miner aggregate, for consumers that route events by aggregate.
MINER_AGGREGATE_EVENTS = (
    Miner.Registered,
    Miner.CapabilitiesUpdated,
    Miner.Deregistered,
    Miner.KeyRegistered,
    Miner.KeyRevoked,
)
