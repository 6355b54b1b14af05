"""The miner agent's pure parts: what it offers, and how results travel."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from app import protocol
from app.ingestor import check_result
from app.miner.agent import AgentConfig, AgentError, inline_result, offered_capabilities
from app.miner.executors import Output

REGISTERED = {"location": "lab", "price_per_hour": 2.5, "max_concurrent": 3}
H100 = protocol.GpuInfo(
    index=0,
    name="NVIDIA H100 80GB HBM3",
    uuid="GPU-1",
    memory_total_mb=81559,
    driver="550.54",
)


def config(**changes: object) -> AgentConfig:
    return AgentConfig(api_url="http://x", nats_urls=["nats://x"], key="k", **changes)  # type: ignore[arg-type]


def test_nvml_gpus_become_capabilities_with_normalised_names() -> None:
    offered = offered_capabilities(config(), [H100, H100], REGISTERED)
    assert (offered.gpu_type, offered.gpu_count, offered.vram_gb) == ("h100", 2, 79)
    assert (offered.location, offered.price_per_hour, offered.max_concurrent) == (
        "lab",
        Decimal("2.5"),
        3,
    )


def test_a_pseudo_type_overrides_what_nvml_finds() -> None:
    offered = offered_capabilities(config(gpu_type="CPU", max_concurrent=8), [], REGISTERED)
    assert (offered.gpu_type, offered.gpu_count, offered.vram_gb) == ("cpu", 1, 0)
    assert offered.max_concurrent == 8


def test_no_gpu_and_no_type_is_refused_with_what_to_do() -> None:
    with pytest.raises(AgentError, match="--gpu-type cpu"):
        offered_capabilities(config(), [], REGISTERED)


def test_text_results_travel_as_text_and_pass_the_ledger_check() -> None:
    result = inline_result(Output(b"hello", "text/plain"))
    assert (result.encoding, result.data, result.size_bytes) == ("utf-8", "hello", 5)
    assert result.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert check_result(result) is None


def test_binary_results_travel_as_base64_and_pass_the_ledger_check() -> None:
    raw = bytes(range(256))
    result = inline_result(Output(raw))
    assert result.encoding == "base64"
    assert base64.b64decode(result.data) == raw
    assert check_result(result) is None
    encoded = protocol.encoder.encode(
        protocol.Completed(
            miner_id="miner_x",
            attempt=1,
            at=datetime(2026, 1, 1, tzinfo=UTC),
            result=result,
            metrics=protocol.Metrics(execution_seconds=1.0),
        )
    )
    assert b'"storage":"inline"' in encoded
    assert protocol.report_decoder.decode(encoded).result == result  # type: ignore[union-attr]
