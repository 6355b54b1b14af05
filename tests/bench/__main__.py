"""`scripts/bench`: run the side-by-side comparisons, print their table, write their figures.

PostgreSQL and NATS are the configured servers (`JOBLEDGER_DATABASE_URL`,
`JOBLEDGER_NATS_URL`), else embedded ones started once for the whole run. Each
comparison gets a lab of its own on them, closed (every process it started stopped)
before the next one starts, so no comparison competes with another's leftovers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats
import psycopg

from tests.bench.comparisons import COMPARISONS
from tests.bench.report import Comparison, format_value, render, verdict
from tests.chaos.lab import Lab, open_lab

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str]) -> argparse.Namespace:
    names = [name for name, _ in COMPARISONS]
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Measure jobledger side by side with plain designs on this machine: "
        "each comparison prints jobledger's figures, its baseline's, their ratio and the "
        "issue's target. Exits 1 only if a comparison crashed; a missed target says MISS.",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"which to run (default: all): {', '.join(names)}"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes and fewer rounds (under 3 minutes)"
    )
    parser.add_argument("--list", action="store_true", help="list the comparisons and stop")
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("bench-results.json"),
        help="where to write the figures (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in names]
    if unknown:
        parser.error(f"unknown comparison {', '.join(unknown)}; choose from {', '.join(names)}")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.list:
        for name, run in COMPARISONS:
            print(f"{name:<12} {_summary(run).removeprefix(f'{name}: ')}")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    chosen = [(name, run) for name, run in COMPARISONS if not args.names or name in args.names]
    began = datetime.now(UTC)
    comparisons: list[Comparison] = []
    crashed: list[dict[str, str]] = []
    seconds: dict[str, float] = {}
    with (
        tempfile.TemporaryDirectory(prefix="jobledger-bench-") as workdir,
        open_lab(Path(workdir) / "servers") as servers,
    ):
        machine = machine_details(servers)
        print(_machine_line(machine, args.quick), flush=True)
        for name, run in chosen:
            print(f"\n-- {name} ...", flush=True)
            lab = Lab(
                workdir=Path(workdir) / name,
                make_database=servers.make_database,
                nats_url=servers.nats_url,
            )
            started = time.monotonic()
            try:
                comparison = run(lab, args.quick)
            except Exception:
                crashed.append({"name": name, "error": traceback.format_exc()})
                print(f"== {name}: CRASHED\n{crashed[-1]['error']}", flush=True)
            else:
                comparisons.append(comparison)
                print(render(comparison), flush=True)
            finally:
                lab.close()
                seconds[name] = round(time.monotonic() - started, 1)
    print("\n" + summary_table(comparisons, crashed, seconds))
    report = {
        "started_at": began.isoformat(timespec="seconds"),
        "command": " ".join(["scripts/bench", *argv]),
        "quick": args.quick,
        "machine": machine,
        "comparisons": comparisons,
        "seconds": seconds,
        "crashed": crashed,
    }
    # msgspec writes NaN (a figure nothing measured) as null, which JSON can carry.
    args.json.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
    print(f"figures written to {args.json}")
    return 1 if crashed else 0


def summary_table(
    comparisons: list[Comparison], crashed: list[dict[str, str]], seconds: dict[str, float]
) -> str:
    """One line per comparison: its ratio against the target, and how long it took."""
    rows = [("comparison", "ratio", "value", "target", "verdict", "seconds")]
    rows += [
        (
            c.name,
            c.ratio_name,
            "n/a" if c.ratio is None else format_value(round(c.ratio, 2)),
            c.target or "-",
            verdict(c),
            f"{seconds.get(c.name, 0):.0f}",
        )
        for c in comparisons
    ]
    rows += [
        (c["name"], "", "", "", "CRASHED", f"{seconds.get(c['name'], 0):.0f}") for c in crashed
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def machine_details(lab: Lab) -> dict[str, Any]:
    """What the figures were measured on: hardware, software, and the durability settings."""
    with psycopg.connect(lab.database(), autocommit=True) as connection:
        postgres = {
            setting: str(connection.execute(f"SHOW {setting}").fetchone()[0])  # type: ignore[index]
            for setting in ("server_version", "synchronous_commit", "fsync")
        }
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.freedesktop_os_release().get("PRETTY_NAME", platform.system())
        if sys.platform == "linux"
        else platform.platform(),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "postgresql": postgres["server_version"],
        "synchronous_commit": postgres["synchronous_commit"],
        "fsync": postgres["fsync"],
        "nats_server": asyncio.run(_nats_version(lab.nats_url)),
        "git_commit": _git_commit(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


async def _nats_version(url: str) -> str:
    """The version the server announces in its INFO."""
    connection = await nats.connect(url.split(",", maxsplit=1)[0])
    try:
        version = connection.connected_server_version
        return f"{version.major}.{version.minor}.{version.patch}" + (
            f"-{version.dev}" if version.dev else ""
        )
    finally:
        await connection.close()


def _git_commit() -> str:
    """HEAD, marked `+dirty` when the work tree has changes the commit does not hold."""

    def git(*command: str) -> str:
        return subprocess.run(
            ["git", *command], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine_line(machine: dict[str, Any], quick: bool) -> str:
    return (
        f"machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"{machine['os']}, {machine['python']}; PostgreSQL {machine['postgresql']} "
        f"(synchronous_commit={machine['synchronous_commit']}, fsync={machine['fsync']}), "
        f"nats-server {machine['nats_server']}; commit {machine['git_commit']}"
        + ("; quick" if quick else "")
    )


def _summary(run: object) -> str:
    """The first line of the comparison module's docstring."""
    doc = sys.modules[getattr(run, "__module__", "")].__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
