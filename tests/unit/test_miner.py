"""The Miner aggregate: registration, what it offers, and retirement."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from domain.errors import Conflict, InvalidJobRequest
from domain.miners import Capabilities, Miner


def capabilities(**changes: Any) -> Capabilities:
    fields: dict[str, Any] = {
        "gpu_type": "NVIDIA A100-SXM4-80GB",
        "gpu_count": 8,
        "vram_gb": 80,
        "location": "eu-west",
        "price_per_hour": Decimal("0.10"),
        "max_concurrent": 2,
    }
    return Capabilities(**(fields | changes))


def registered() -> Miner:
    miner = Miner.register("rig-1", capabilities())
    miner.collect_events()
    return miner


def test_register_normalises_the_gpu_type() -> None:
    miner = Miner.register("rig-1", capabilities())
    assert miner.name == "rig-1"
    assert miner.active
    assert miner.capabilities == capabilities(gpu_type="a100")
    assert miner.miner_id == "miner_" + miner.id.hex
    [event] = miner.collect_events()
    assert isinstance(event, Miner.Registered)
    assert event.gpu_type == "a100"


@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
def test_register_rejects_an_empty_name(name: str) -> None:
    with pytest.raises(InvalidJobRequest):
        Miner.register(name, capabilities())


IMPOSSIBLE = [
    pytest.param({"gpu_count": 0}, id="no-gpus"),
    pytest.param({"gpu_count": -1}, id="negative-gpus"),
    pytest.param({"max_concurrent": 0}, id="no-concurrency"),
    pytest.param({"vram_gb": -1}, id="negative-vram"),
    pytest.param({"price_per_hour": Decimal("-0.01")}, id="negative-price"),
]


@pytest.mark.parametrize("changes", IMPOSSIBLE)
def test_register_rejects_impossible_capabilities(changes: dict[str, Any]) -> None:
    with pytest.raises(InvalidJobRequest):
        Miner.register("rig-1", capabilities(**changes))


def test_zero_vram_and_a_free_price_are_allowed() -> None:
    miner = Miner.register("rig-1", capabilities(vram_gb=0, price_per_hour=Decimal(0)))
    assert (miner.capabilities.vram_gb, miner.capabilities.price_per_hour) == (0, Decimal(0))


def test_update_capabilities_changes_what_the_miner_offers() -> None:
    miner = registered()
    miner.update_capabilities(capabilities(gpu_type="NVIDIA H100 80GB HBM3", gpu_count=4))
    assert miner.capabilities == capabilities(gpu_type="h100", gpu_count=4)
    [event] = miner.collect_events()
    assert isinstance(event, Miner.CapabilitiesUpdated)
    assert miner.version == 2


@pytest.mark.parametrize("changes", IMPOSSIBLE)
def test_impossible_updates_record_nothing(changes: dict[str, Any]) -> None:
    miner = registered()
    with pytest.raises(InvalidJobRequest):
        miner.update_capabilities(capabilities(**changes))
    assert miner.collect_events() == []
    assert miner.capabilities == capabilities(gpu_type="a100")
    assert miner.version == 1


def test_deregister_retires_the_miner() -> None:
    miner = registered()
    miner.deregister("decommissioned")
    assert not miner.active
    [event] = miner.collect_events()
    assert isinstance(event, Miner.Deregistered)
    assert event.reason == "decommissioned"


def test_a_deregistered_miner_cannot_be_updated_or_deregistered_again() -> None:
    miner = registered()
    miner.deregister("decommissioned")
    miner.collect_events()
    version = miner.version
    with pytest.raises(Conflict):
        miner.update_capabilities(capabilities(gpu_count=1))
    with pytest.raises(Conflict):
        miner.deregister("again")
    assert miner.collect_events() == []
    assert miner.version == version
    assert not miner.active
    assert miner.capabilities == capabilities(gpu_type="a100")


def test_a_miner_rebuilt_from_its_events_equals_the_live_one() -> None:
    miner = Miner.register("rig-1", capabilities())
    miner.update_capabilities(capabilities(gpu_type="RTX 4090", vram_gb=24))
    miner.deregister("moved")
    copy = None
    for event in miner.collect_events():
        copy = event.mutate(copy)
    assert copy == miner
    assert isinstance(copy, Miner)
    assert copy.capabilities.gpu_type == "rtx4090"
    assert not copy.active
