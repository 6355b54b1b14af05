"""Short versions of the fault-injection scenarios (`scripts/chaos` runs them full length).

Each scenario returns its figures and checks; the test fails with the whole report.
"""

from __future__ import annotations

import pytest

from tests.chaos.lab import Lab
from tests.chaos.scenarios import SCENARIOS, Scenario

pytestmark = pytest.mark.e2e


IN_SUITE = [scenario for scenario in SCENARIOS if scenario.in_test_suite]


@pytest.mark.parametrize("scenario", IN_SUITE, ids=[s.name for s in IN_SUITE])
def test_scenario_keeps_its_figures(lab: Lab, scenario: Scenario) -> None:
    result = scenario.run(lab, scenario.short_seconds)
    print(result.render())
    assert result.passed, result.render()
