"""GPU type names: one canonical short name per model, whatever NVML or a client calls it."""

from __future__ import annotations

import functools
import re

# Longest names first so "a100" does not swallow "a10", "h200" is not read as "h20".
_CANONICAL = (
    "rtx6000ada",
    "rtx4090",
    "rtx3090",
    "rtx3080",
    "a6000",
    "a100",
    "a40",
    "a10",
    "h200",
    "h100",
    "l40s",
    "l40",
    "l4",
    "v100",
    "t4",
    "b200",
    "mi300x",
)
_NOISE = re.compile(r"[^a-z0-9]+")


@functools.lru_cache(maxsize=1024)
def normalize_gpu_type(name: str) -> str:
    """Map what NVML or a client calls a GPU ('NVIDIA H100 80GB HBM3') to a short name ('h100').

    Cached: the scheduler asks for every pending job in every round, and names repeat.
    """
    squashed = _NOISE.sub("", name.lower()).removeprefix("nvidia").removeprefix("geforce")
    squashed = squashed.removeprefix("tesla")
    for canonical in _CANONICAL:
        if squashed.startswith(canonical):
            return canonical
    return squashed
