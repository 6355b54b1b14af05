"""What a scenario reports: its figures, and the checks those figures must pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Figure = int | float | str


@dataclass
class Check:
    """One pass criterion, e.g. `lost == 0`, with the values it was decided on."""

    name: str
    passed: bool
    detail: str = ""


@dataclass
class Result:
    """A scenario's outcome: figures in the order they were measured, and its checks."""

    scenario: str
    seconds: float = 0.0
    figures: dict[str, Figure] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    def figure(self, name: str, value: Figure) -> Figure:
        self.figures[name] = value
        return value

    def check(self, name: str, passed: bool, detail: object = "") -> bool:
        self.checks.append(Check(name, bool(passed), str(detail)))
        return bool(passed)

    def expect_equal(self, name: str, actual: Figure, expected: Figure) -> bool:
        """Record figure `name` and check that it equals `expected`."""
        self.figure(name, actual)
        return self.check(f"{name} == {expected}", actual == expected, f"{name} = {actual}")

    def expect_at_most(self, name: str, actual: int | float, most: int | float) -> bool:
        self.figure(name, actual)
        return self.check(f"{name} <= {most}", actual <= most, f"{name} = {actual}")

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.passed]

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "passed": self.passed,
            "seconds": round(self.seconds, 1),
            "figures": self.figures,
            "checks": [
                {"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks
            ],
        }

    def render(self) -> str:
        """A block of text: the verdict, each figure, and each failed check."""
        verdict = "PASS" if self.passed else "FAIL"
        lines = [f"{self.scenario}: {verdict} ({self.seconds:.0f} s)"]
        width = max((len(name) for name in self.figures), default=0)
        for name, value in self.figures.items():
            shown = f"{value:.2f}" if isinstance(value, float) else str(value)
            lines.append(f"  {name:<{width}}  {shown}")
        lines += [f"  FAILED {failure}" for failure in self.failures()]
        return "\n".join(lines)
