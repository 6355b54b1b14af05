"""What a comparison measured: figures for jobledger and its baseline, their ratio, the target."""

from __future__ import annotations

import math

import msgspec


class Figure(msgspec.Struct, frozen=True):
    """One measured number."""

    name: str
    value: float
    unit: str


class Comparison(msgspec.Struct, kw_only=True):
    """jobledger against a baseline, measured side by side in the same run."""

    # "submit", "end-to-end", "latency", "rebuild", "scale", "dispatch"
    name: str
    # One line: what is compared, under which conditions (concurrency, counts).
    what: str
    jobledger: list[Figure]
    # Empty when there is nothing to compare against (dispatch).
    baseline: list[Figure]
    # How the ratio reads, e.g. "jobledger/bare req/s".
    ratio_name: str
    ratio: float | None
    # e.g. ">= 1.0"; "" when the issue sets none.
    target: str
    met: bool | None
    notes: list[str] = msgspec.field(default_factory=list)


def verdict(comparison: Comparison) -> str:
    """MET or MISS against the target; "-" when there is none."""
    if comparison.met is None:
        return "-"
    return "MET" if comparison.met else "MISS"


def format_value(value: float) -> str:
    """A figure as a person reads it: thousands grouped, about three significant digits."""
    if math.isnan(value):
        return "n/a"
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 1 else f"{value:.2g}"


def render(comparison: Comparison) -> str:
    """A block of text: what was compared, each figure side by side, the ratio, the notes."""
    lines = [f"== {comparison.name}: {comparison.what}"]
    mine = {figure.name: figure for figure in comparison.jobledger}
    theirs = {figure.name: figure for figure in comparison.baseline}
    names = list(mine) + [name for name in theirs if name not in mine]
    width = max((len(name) for name in names), default=6)

    def cell(figure: Figure | None) -> str:
        return f"{format_value(figure.value)} {figure.unit}" if figure else ""

    lines.append(f"  {'figure':<{width}}  {'jobledger':>22}  {'baseline':>22}")
    lines += [
        f"  {name:<{width}}  {cell(mine.get(name)):>22}  {cell(theirs.get(name)):>22}"
        for name in names
    ]
    ratio = "n/a" if comparison.ratio is None else f"{comparison.ratio:.2f}"
    target = f"  target {comparison.target}" if comparison.target else ""
    lines.append(f"  {comparison.ratio_name} = {ratio}{target}  {verdict(comparison)}")
    lines += [f"  note: {note}" for note in comparison.notes]
    return "\n".join(lines)
