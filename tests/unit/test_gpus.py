"""GPU names from NVML or clients map to the short names the ledger prices and schedules by."""

from __future__ import annotations

import pytest

from domain.gpus import normalize_gpu_type


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("Tesla V100-SXM2-16GB", "v100"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A10G", "a10"),
        ("NVIDIA GeForce RTX 3090", "rtx3090"),
        ("RTX 4090", "rtx4090"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L4", "l4"),
        ("v100", "v100"),
        ("V100", "v100"),
        ("Tesla T4", "t4"),
    ],
)
def test_gpu_names_normalise_to_their_short_name(name: str, canonical: str) -> None:
    assert normalize_gpu_type(name) == canonical


@pytest.mark.parametrize("canonical", ["h100", "a100", "a10", "l40s", "l4", "rtx3090", "t4"])
def test_short_names_are_already_normal(canonical: str) -> None:
    assert normalize_gpu_type(canonical) == canonical
