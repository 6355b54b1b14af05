"""The comparisons, in the order the issue lists them; each is `run(lab, quick) -> Comparison`."""

from __future__ import annotations

from collections.abc import Callable

from tests.bench.comparisons import dispatch, end_to_end, latency, rebuild, scale, submit
from tests.bench.report import Comparison
from tests.chaos.lab import Lab

Run = Callable[[Lab, bool], Comparison]

COMPARISONS: list[tuple[str, Run]] = [
    ("submit", submit.run),
    ("end-to-end", end_to_end.run),
    ("latency", latency.run),
    ("rebuild", rebuild.run),
    ("scale", scale.run),
    ("dispatch", dispatch.run),
]
