"""`scripts/chaos`: run the fault-injection scenarios at full length and print their figures."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.chaos.lab import open_lab
from tests.chaos.result import Result
from tests.chaos.scenarios import BY_NAME, SCENARIOS


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/chaos",
        description="Break jobledger's surroundings on purpose and count what it keeps. "
        "Each scenario runs for a bounded time and prints its figures and verdict.",
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"which to run (default: all): {', '.join(BY_NAME)}",
    )
    parser.add_argument(
        "--short", action="store_true", help="the short lengths the test suite uses"
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and stop")
    parser.add_argument(
        "--seconds", type=float, help="run every chosen scenario for this long instead"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("chaos-results.json"),
        help="where to write the figures (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in BY_NAME]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.list:
        for scenario in SCENARIOS:
            lengths = f"{scenario.short_seconds:.0f} s short, {scenario.full_seconds:.0f} s full"
            print(f"{scenario.name:<26} {scenario.summary} ({lengths})")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    chosen = [BY_NAME[name] for name in args.scenarios] or SCENARIOS
    results: list[Result] = []
    began = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="jobledger-chaos-") as workdir:
        for scenario in chosen:
            seconds = args.seconds or (
                scenario.short_seconds if args.short else scenario.full_seconds
            )
            print(f"== {scenario.name}: {scenario.summary} ({seconds:.0f} s of fault)", flush=True)
            started = time.monotonic()
            with open_lab(Path(workdir) / scenario.name) as lab:
                result = scenario.run(lab, seconds)
            result.seconds = time.monotonic() - started
            results.append(result)
            print(result.render(), flush=True)
    print("\n== summary")
    for result in results:
        verdict = "PASS" if result.passed else "FAIL"
        print(f"  {verdict}  {result.scenario}  ({result.seconds:.0f} s)")
    args.json.write_text(
        json.dumps(
            {
                "date": began.isoformat(timespec="seconds"),
                "command": " ".join(["scripts/chaos", *argv]),
                "machine": {
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                },
                "results": [result.as_json() for result in results],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"figures written to {args.json}")
    return 0 if all(result.passed for result in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
