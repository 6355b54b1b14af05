"""Items 8-11 at length: the property, matrix and hostile-input suites, counted.

These are ordinary test files that `scripts/test` runs at their CI size. Here they
run again in a pytest subprocess with more examples (`JOBLEDGER_SCHEMATHESIS_EXAMPLES`,
`JOBLEDGER_HYPOTHESIS_EXAMPLES` set from the scenario's length), and each file's
cases and failures become figures: the authorization matrix's cells and deviations,
hostile inputs refused as documented, the concurrent rate-limit run, schemathesis
against the OpenAPI document (stateful, with and without a key), and random
histories of the job state machine against the real store. Pass: every file ran
cases, and none failed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

from tests.chaos.lab import Lab
from tests.chaos.result import Result

SUITES = {
    "authorization matrix (route x caller)": "tests/e2e/test_authorization.py",
    "hostile input": "tests/e2e/test_hostile_input.py",
    "rate limits across two processes": "tests/e2e/test_rate_limits.py",
    "schemathesis (stateful, with and without a key)": "tests/e2e/test_schemathesis.py",
    "job state machine (Hypothesis, real store)": "tests/integration/test_state_machine_store.py",
}
ROOT = Path(__file__).resolve().parents[3]
# Captured output goes into the report, where schemathesis' own counts are read from.
PYTEST = [
    sys.executable,
    "-m",
    "pytest",
    "-q",
    "-p",
    "no:cacheprovider",
    "-o",
    "junit_logging=system-out",
]
SCHEMATHESIS_CASES = re.compile(r"(\d+) generated, (\d+) passed")
MATRIX_SUMMARY = re.compile(r"authorization matrix: (.*)")


def run(lab: Lab, seconds: float) -> Result:
    result = Result("suites")
    report = lab.directory("suites") / "junit.xml"
    examples = str(max(25, int(seconds)))
    started = time.monotonic()
    finished = subprocess.run(
        [*PYTEST, f"--junitxml={report}", *SUITES.values()],
        cwd=ROOT,
        env=os.environ
        | {"JOBLEDGER_SCHEMATHESIS_EXAMPLES": examples, "JOBLEDGER_HYPOTHESIS_EXAMPLES": examples},
        capture_output=True,
        text=True,
        check=False,
    )
    result.seconds = time.monotonic() - started
    cases, failed = tally(report) if report.exists() else (Counter[str](), Counter[str]())
    result.figure("examples per property test", int(examples))
    if matrix := MATRIX_SUMMARY.search(finished.stdout):
        result.figure("authorization matrix", matrix.group(1))
    generated, passed = schemathesis_cases(report) if report.exists() else (0, 0)
    result.figure("schemathesis test cases generated (both runs)", generated)
    result.expect_equal("schemathesis test cases not passed", generated - passed, 0)
    result.check("schemathesis generated cases", generated > 0, generated)
    for name, path in SUITES.items():
        module = path.removesuffix(".py").replace("/", ".")
        result.figure(f"{name}: cases", cases[module])
        result.expect_equal(f"{name}: failed", failed[module], 0)
        result.check(f"{name} ran", cases[module] > 0, path)
    if finished.returncode != 0:
        result.check(
            "pytest exit status 0", False, finished.stdout[-3000:] + finished.stderr[-2000:]
        )
    return result


def tally(report: Path) -> tuple[Counter[str], Counter[str]]:
    """Cases and failures (errors included) per test module, from a JUnit XML report."""
    cases: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for case in ElementTree.parse(report).iter("testcase"):
        module = case.get("classname", "")
        # A class-based test's classname also names the class; keep the module part.
        module = next((m for m in _modules() if module.startswith(m)), module)
        cases[module] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed[module] += 1
    return cases, failed


def schemathesis_cases(report: Path) -> tuple[int, int]:
    """Test cases schemathesis generated and passed, summed over its runs in the report."""
    generated = passed = 0
    for output in ElementTree.parse(report).iter("system-out"):
        for made, ok in SCHEMATHESIS_CASES.findall(output.text or ""):
            generated += int(made)
            passed += int(ok)
    return generated, passed


def _modules() -> list[str]:
    return [path.removesuffix(".py").replace("/", ".") for path in SUITES.values()]
