"""The Miner aggregate: a GPU machine registered to run jobs, and what it offers."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgspec
from eventsourcing.domain import Aggregate

from domain.errors import Conflict, InvalidJobRequest, MinerNotFound
from domain.gpus import normalize_gpu_type

MINER_ID_PREFIX = "miner_"
_MINER_ID = re.compile(r"miner_[0-9a-f]{32}")


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

    def _require_active(self, command: str) -> None:
        if not self.active:
            raise Conflict(f"cannot {command} miner {self.miner_id}: it is deregistered")
