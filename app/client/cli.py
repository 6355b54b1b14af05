"""`jobledger jobs ...`: the client command line, built on the SDK (docs/clients.md).

Exit codes: 0 success; 1 the job ended without success (watch, submit --wait);
2 bad usage or an invalid request; 3 the API cannot be reached; 4 unauthenticated
or forbidden; 5 not found; 6 conflict; 7 rate limited; 8 integrity (sha256 mismatch).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import httpx
import msgspec

from app.api.schemas import (
    FileInput,
    HistoryResponse,
    JobEvent,
    JobListResponse,
    JobStatusResponse,
)
from app.client import render
from app.client.config import resolve_config
from app.client.core import TERMINAL_STATUSES, WatchUpdate
from app.client.errors import ApiError, JobledgerError
from app.client.files import Progress
from app.client.sync_client import Client

EXIT_OK = 0
EXIT_JOB_UNSUCCESSFUL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
STATUSES = ("pending", "assigned", "running", "canceling", *sorted(TERMINAL_STATUSES))
PRIORITIES = ("low", "normal", "high", "urgent")
FORMATS = ("json", "text", "binary", "archive")

_JSON = msgspec.json.Encoder(decimal_format="number")


# ---- the command line -------------------------------------------------------------------


def _connection_options(at_top: bool) -> argparse.ArgumentParser:
    """--url, --api-key, --profile, --json: accepted before and after the subcommand."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("connection and output")

    def default(value: Any) -> Any:
        # Below `jobs`, an option left out must not overwrite what was given above it.
        return value if at_top else argparse.SUPPRESS

    group.add_argument(
        "--url", default=default(None), help="the API (JOBLEDGER_URL, http://127.0.0.1:8000)"
    )
    group.add_argument(
        "--api-key",
        default=default(None),
        help="the API key; better: JOBLEDGER_API_KEY or a profile (others can read arguments)",
    )
    group.add_argument(
        "--profile",
        default=default(None),
        help="a [profiles.NAME] of the config file (JOBLEDGER_PROFILE, default)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the API's JSON (one document; watch: one update per line)",
    )
    return options


def add_jobs_parser(commands: Any) -> None:
    """Add `jobs` and its subcommands to the `jobledger` parser's subcommands."""
    jobs = commands.add_parser(
        "jobs",
        parents=[_connection_options(at_top=True)],
        help="submit, follow and fetch jobs through the API (docs/clients.md)",
        description="Talk to a jobledger API as a client. Exit codes: 0 ok, 1 job ended "
        "without success, 2 invalid, 3 API unreachable, 4 unauthenticated or forbidden, "
        "5 not found, 6 conflict, 7 rate limited, 8 sha256 mismatch.",
    )
    sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")
    common = [_connection_options(at_top=False)]

    submit = sub.add_parser("submit", parents=common, help="submit a job")
    submit.add_argument("--model", required=True, help="the model to run, e.g. echo or gpt2")
    given = submit.add_mutually_exclusive_group(required=True)
    given.add_argument(
        "--input",
        help="the input text; a path to an existing file (or @PATH) uploads the file first",
    )
    given.add_argument("--input-file", metavar="PATH", help="upload this file as the input")
    submit.add_argument("--gpu", required=True, help="GPU type, e.g. v100, a100, h100, cpu")
    submit.add_argument("--gpu-count", type=int, default=1, help="GPUs (1)")
    submit.add_argument("--min-vram", type=int, default=0, metavar="GB", help="VRAM per GPU (0)")
    submit.add_argument(
        "--output", default="local", metavar="DEST", help='"local" (default) or s3://bucket/prefix'
    )
    submit.add_argument("--format", choices=FORMATS, default="json", help="result format (json)")
    submit.add_argument("--priority", choices=PRIORITIES, default="normal", help="(normal)")
    submit.add_argument(
        "--timeout", type=int, default=3600, metavar="SECONDS", help="run time limit (3600)"
    )
    submit.add_argument(
        "--idempotency-key",
        help="the same key again returns the same job (default: a fresh one per command)",
    )
    submit.add_argument(
        "--wait", action="store_true", help="then watch it; exit 0 only if it completes"
    )

    status = sub.add_parser("status", parents=common, help="a job's status")
    status.add_argument("job_id", metavar="JOB")

    listing = sub.add_parser("list", parents=common, help="your jobs, newest first")
    listing.add_argument("--status", choices=STATUSES, help="only jobs in this status")
    listing.add_argument("--limit", type=int, default=20, help="how many (20, at most 100)")
    listing.add_argument("--all", action="store_true", help="every job, page after page")

    cancel = sub.add_parser("cancel", parents=common, help="cancel a job")
    cancel.add_argument("job_id", metavar="JOB")

    download = sub.add_parser("download", parents=common, help="save a job's result, verified")
    download.add_argument("job_id", metavar="JOB")
    download.add_argument(
        "-o",
        "--output",
        default=".",
        metavar="PATH",
        help="a file, or a directory for the API's file name (default: .)",
    )

    history = sub.add_parser("history", parents=common, help="jobs in a window, with totals")
    history.add_argument("--from", dest="window_from", required=True, help="YYYY-MM-DD or RFC 3339")
    history.add_argument("--to", dest="window_to", required=True, help="inclusive, same forms")
    history.add_argument("--limit", type=int, default=100, help="jobs listed (100, at most 100)")
    history.add_argument("--all", action="store_true", help="list every job of the window")

    events = sub.add_parser("events", parents=common, help="a job's event timeline")
    events.add_argument("job_id", metavar="JOB")

    watch = sub.add_parser(
        "watch", parents=common, help="follow a job until it ends (exit 0 only if completed)"
    )
    watch.add_argument("job_id", metavar="JOB")


# ---- output -----------------------------------------------------------------------------


@dataclass
class Console:
    """Where a command writes: results on stdout, progress and messages on stderr."""

    out: TextIO
    err: TextIO
    json: bool

    @property
    def bars(self) -> bool:
        """Progress bars only for people at a terminal."""
        return not self.json and self.err.isatty()

    def print(self, text: str = "") -> None:
        """A line of the command's result."""
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        """A line for the person, not the result (stderr)."""
        print(text, file=self.err, flush=True)

    def document(self, value: Any) -> None:
        """One JSON document on a line of its own."""
        self.out.write(_JSON.encode(value).decode() + "\n")
        self.out.flush()

    def transfer_bar(self, label: str) -> tuple[render.StatusLine, Progress | None]:
        """A progress callback for an upload or download, drawn only on a terminal."""
        line = render.StatusLine(self.err, self.bars)
        return line, render.TransferBar(line, label) if self.bars else None


def _status_text(job: JobStatusResponse) -> str:
    """`running 42%`, `failed: why`, or just the status."""
    if job.status in ("running", "assigned", "canceling") and job.progress:
        return f"{job.status} {job.progress}%"
    if job.error and job.status in TERMINAL_STATUSES:
        return f"{job.status}: {job.error}"
    return job.status


def _cost(job: JobStatusResponse) -> str:
    """The charged cost; while the job runs, its estimate marked with ~; nothing if uncharged."""
    if job.cost is not None:
        return render.money(job.cost)
    if job.status in TERMINAL_STATUSES:
        return "-"
    return f"~{render.money(job.estimated_cost)}"


def _job_rows(jobs: Iterable[JobStatusResponse], now: datetime) -> list[list[str]]:
    return [
        [
            job.job_id,
            job.status,
            f"{job.progress}%",
            job.model,
            job.priority,
            render.ago(job.created_at, now),
            _cost(job),
        ]
        for job in jobs
    ]


def _jobs_table(jobs: list[JobStatusResponse]) -> str:
    headers = ["ID", "STATUS", "PROGRESS", "MODEL", "PRIORITY", "CREATED", "COST"]
    return render.table(headers, _job_rows(jobs, datetime.now(UTC)), right=frozenset({2, 6}))


def _show_job(console: Console, job: JobStatusResponse) -> None:
    now = datetime.now(UTC)
    pairs = [
        ("job", job.job_id),
        ("status", job.status),
        ("progress", f"{job.progress}%"),
        ("model", job.model),
        ("priority", job.priority),
        ("attempt", str(job.attempt)),
        ("miner", job.miner_id or "-"),
        ("created", f"{render.timestamp(job.created_at)} ({render.ago(job.created_at, now)})"),
        ("started", render.timestamp(job.started_at)),
        ("completed", render.timestamp(job.completed_at)),
        ("estimated", render.money(job.estimated_cost)),
        ("cost", render.money(job.cost)),
    ]
    if job.pending_reason:
        pairs.append(("waiting", job.pending_reason))
    if job.error:
        code = f" ({job.error_code})" if job.error_code else ""
        pairs.append(("error", job.error + code))
    if job.result:
        result = job.result
        pairs.append(
            (
                "result",
                f"{result.get('format', '?')}, {render.size(result.get('size_bytes'))}, "
                f"sha256 {result.get('sha256', '?')}",
            )
        )
    console.print(render.key_values(pairs))


_EVENT_FIELDS = ("miner_id", "progress", "cost", "error_code", "error", "reason", "cause")


def _event_summary(event: JobEvent) -> str:
    """The few facts of an event worth a glance."""
    data = event.data
    if event.type == "JobSubmitted":
        parts = [
            f"model={data.get('model')}",
            f"gpu={data.get('gpu_count')}x{data.get('gpu_type')}",
            f"priority={data.get('priority')}",
        ]
    else:
        parts = [f"{key}={data[key]}" for key in _EVENT_FIELDS if data.get(key) not in (None, "")]
        if (attempt := data.get("attempt")) and attempt != 1:
            parts.insert(0, f"attempt={attempt}")
    text = " ".join(parts)
    return text if len(text) <= 100 else text[:99] + "…"


# ---- commands ---------------------------------------------------------------------------


def _input_path(args: argparse.Namespace) -> Path | None:
    """The file to upload as input, if the input names one."""
    if args.input_file is not None:
        return Path(args.input_file)
    text: str = args.input
    if text.startswith("@") and len(text) > 1:
        return Path(text[1:])
    candidate = Path(text)
    return candidate if "\n" not in text and len(text) < 4096 and candidate.is_file() else None


def submit(client: Client, args: argparse.Namespace, console: Console) -> int:
    """Upload the input if it is a file, submit, and with --wait follow the job to its end."""
    job_input: str | FileInput = args.input or ""
    path = _input_path(args)
    if path is not None:
        line, progress = console.transfer_bar(f"uploading {path.name}")
        try:
            file_id = client.upload(path, progress=progress)
        finally:
            line.clear()
        if not console.json:
            console.note(f"uploaded {path} as {file_id}")
        job_input = FileInput(file_id=file_id)
    submitted = client.submit(
        args.model,
        job_input,
        gpu_type=args.gpu,
        gpu_count=args.gpu_count,
        min_vram_gb=args.min_vram,
        output_destination=args.output,
        output_format=args.format,
        priority=args.priority,
        timeout_seconds=args.timeout,
        idempotency_key=args.idempotency_key,
    )
    if args.wait:
        if console.json:
            final = client.wait(submitted.job_id)
            console.document(final)
            return EXIT_OK if final.status == "completed" else EXIT_JOB_UNSUCCESSFUL
        console.print(submitted.job_id)
        console.note(_estimate(submitted.estimated_cost, submitted.estimated_time_seconds))
        # From just after the submission, so every run shows the same whole timeline.
        return _follow(client, submitted.job_id, console, after=1)
    if console.json:
        console.document(submitted)
        return EXIT_OK
    console.print(submitted.job_id)
    console.note(
        _estimate(submitted.estimated_cost, submitted.estimated_time_seconds)
        + f"; follow it with: jobledger jobs watch {submitted.job_id}"
    )
    return EXIT_OK


def _estimate(cost: Any, seconds: int) -> str:
    return f"submitted: estimated cost {render.money(cost)}, time {render.duration(seconds)}"


def status(client: Client, args: argparse.Namespace, console: Console) -> int:
    """Show one job."""
    job = client.get(args.job_id)
    if console.json:
        console.document(job)
    else:
        _show_job(console, job)
    return EXIT_OK


def list_jobs(client: Client, args: argparse.Namespace, console: Console) -> int:
    """A page of jobs (or all of them) as a table."""
    if args.all:
        jobs = list(client.iter_jobs(args.status))
        page = JobListResponse(jobs=jobs, total=len(jobs), has_more=False, next_cursor=None)
    else:
        page = client.list(args.status, args.limit)
    if console.json:
        console.document(page)
        return EXIT_OK
    if not page.jobs:
        console.note("no jobs" + (f" with status {args.status}" if args.status else ""))
        return EXIT_OK
    console.print(_jobs_table(page.jobs))
    if page.has_more:
        console.note(f"{len(page.jobs)} of {page.total}; --all for every one, or --limit N")
    return EXIT_OK


def cancel(client: Client, args: argparse.Namespace, console: Console) -> int:
    """Cancel a job; a job already finished is a conflict (exit 6)."""
    job = client.cancel(args.job_id)
    if console.json:
        console.document(job)
    elif job.status == "canceling":
        console.print(f"{job.job_id} canceling: its miner is told to stop")
    else:
        console.print(f"{job.job_id} {job.status}")
    return EXIT_OK


def history(client: Client, args: argparse.Namespace, console: Console) -> int:
    """Jobs created in a window as a table, with totals over the whole window."""
    page = client.history(args.window_from, args.window_to, limit=args.limit)
    jobs = list(page.jobs)
    cursor = page.next_cursor
    while args.all and page.has_more and cursor:
        more = client.history(args.window_from, args.window_to, limit=100, cursor=cursor)
        jobs += more.jobs
        cursor, page = more.next_cursor, more
    shown = HistoryResponse(
        window_from=page.window_from,
        window_to=page.window_to,
        jobs=jobs,
        totals=page.totals,
        has_more=page.has_more,
        next_cursor=cursor if page.has_more else None,
    )
    if console.json:
        console.document(shown)
        return EXIT_OK
    window = f"{render.timestamp(shown.window_from)} to {render.timestamp(shown.window_to)}"
    if jobs:
        console.print(_jobs_table(jobs))
        console.print()
    totals = shown.totals
    by_status = ", ".join(f"{name} {count}" for name, count in sorted(totals.by_status.items()))
    console.print(
        render.key_values(
            [
                ("window", window),
                ("jobs", f"{totals.jobs}" + (f" ({by_status})" if by_status else "")),
                ("cost", render.money(totals.total_cost)),
                ("estimated", render.money(totals.total_estimated_cost)),
            ]
        )
    )
    if shown.has_more:
        console.note(f"listed {len(jobs)} of {totals.jobs}; --all lists every one")
    return EXIT_OK


def events(client: Client, args: argparse.Namespace, console: Console) -> int:
    """The job's events as a timeline: when, how long after submission, what."""
    answer = client.events(args.job_id)
    if console.json:
        console.document(answer)
        return EXIT_OK
    start = answer.events[0].timestamp if answer.events else None
    rows = [
        [
            str(event.sequence),
            render.timestamp(event.timestamp),
            "+" + render.duration((event.timestamp - start).total_seconds()) if start else "",
            event.type,
            _event_summary(event),
        ]
        for event in answer.events
    ]
    headers = ["SEQ", "TIME", "AFTER", "EVENT", "DETAILS"]
    console.print(render.table(headers, rows, right=frozenset({0, 2})))
    return EXIT_OK


def download(client: Client, args: argparse.Namespace, console: Console) -> int:
    """Save the result where asked, verified against its sha256; nothing is kept otherwise."""
    line, progress = console.transfer_bar(f"downloading {args.job_id}")
    try:
        result = client.download(args.job_id, args.output, progress=progress)
    finally:
        line.clear()
    if console.json:
        console.document(
            {
                "job_id": result.job_id,
                "path": str(result.path),
                "size_bytes": result.size_bytes,
                "sha256": result.sha256,
                "content_type": result.content_type,
            }
        )
    else:
        console.print(f"{result.path}")
        console.note(f"{render.size(result.size_bytes)}, sha256 {result.sha256} (verified)")
    return EXIT_OK


def watch(client: Client, args: argparse.Namespace, console: Console) -> int:
    """Follow a job until it ends; exit 0 only if it completed."""
    if console.json:
        final = None
        for update in client.watch(args.job_id):
            console.document(update)
            final = update.job
        return _exit_for(final or client.get(args.job_id))
    return _follow(client, args.job_id, console)


class _Follower:
    """Shows a watched job: a live bar on a terminal, else one line per change."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.line = render.StatusLine(console.err, console.bars)
        self._last_status: str | None = None
        self._last_miner: str | None = None

    def show(self, update: WatchUpdate) -> None:
        """Show one update: a line if anything but progress changed (always off a terminal)."""
        job = update.job
        changed = job.status != self._last_status
        self._last_status = job.status
        if not self.line.enabled or changed:
            self.line.clear()
            when = update.timestamp.astimezone(UTC).strftime("%H:%M:%SZ")
            new_miner = job.miner_id is not None and job.miner_id != self._last_miner
            miner = f"  on {job.miner_id}" if new_miner else ""
            self._last_miner = job.miner_id
            self.console.print(
                f"{when}  #{update.sequence:<3} {update.type:<22} {_status_text(job)}{miner}"
            )
        if self.line.enabled and job.status not in TERMINAL_STATUSES:
            elapsed = (datetime.now(UTC) - (job.started_at or job.created_at)).total_seconds()
            self.line.show(
                f"{job.job_id}  {job.status:<9} "
                f"{render.bar(job.progress / 100, 30, self.line.unicode)} {job.progress:3d}%  "
                f"{render.duration(elapsed)}",
                force=True,
            )

    def finish(self, job: JobStatusResponse) -> None:
        """The closing line: how the job ended, how long it ran, what it cost."""
        self.line.clear()
        ran = ""
        if job.started_at and job.completed_at:
            ran = f" in {render.duration((job.completed_at - job.started_at).total_seconds())}"
        cost = f", cost {render.money(job.cost)}" if job.cost is not None else ""
        error = f": {job.error}" if job.error else ""
        self.console.print(f"{job.job_id} {job.status}{ran}{cost}{error}")


def _follow(client: Client, job_id: str, console: Console, after: int | None = None) -> int:
    follower = _Follower(console)
    final = None
    try:
        for update in client.watch(job_id, last_event_id=after):
            follower.show(update)
            final = update.job
    finally:
        follower.line.clear()
    final = final if final is not None and final.status in TERMINAL_STATUSES else client.get(job_id)
    follower.finish(final)
    return _exit_for(final)


def _exit_for(job: JobStatusResponse) -> int:
    return EXIT_OK if job.status == "completed" else EXIT_JOB_UNSUCCESSFUL


COMMANDS: dict[str, Callable[[Client, argparse.Namespace, Console], int]] = {
    "submit": submit,
    "status": status,
    "list": list_jobs,
    "cancel": cancel,
    "history": history,
    "events": events,
    "download": download,
    "watch": watch,
}


# ---- running it -------------------------------------------------------------------------


def _report(console: Console, error: JobledgerError) -> int:
    """Print an error for people (stderr) and, with --json, as a document; return its exit code."""
    console.note(f"jobledger: {error.message}")
    if error.hint:
        console.note(f"  hint: {error.hint}")
    if console.json:
        status_code = error.status if isinstance(error, ApiError) else None
        details = error.details if isinstance(error, ApiError) else None
        console.document(
            {
                "error": {
                    "status": status_code,
                    "message": error.message,
                    "details": details,
                    "hint": error.hint,
                    "exit_code": error.exit_code,
                }
            }
        )
    return error.exit_code


def run_jobs(
    args: argparse.Namespace,
    *,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """Run a parsed `jobledger jobs ...` command line; returns the exit code."""
    console = Console(stdout or sys.stdout, stderr or sys.stderr, args.json)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = resolve_config(
                os.environ if environ is None else environ,
                url=args.url,
                api_key=args.api_key,
                profile=args.profile,
            )
        for warning in caught:
            console.note(f"jobledger: warning: {warning.message}")
        with Client(config=config, transport=transport) as client:
            return COMMANDS[args.jobs_command](client, args, console)
    except JobledgerError as error:
        return _report(console, error)
    except BrokenPipeError:
        # The reader left (`| head`): stop quietly, and keep Python from complaining at exit.
        if console.out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        console.note(f"jobledger: cannot use{where}: {error.strerror or error}")
        return EXIT_USAGE
    except ValueError as error:
        console.note(f"jobledger: {error}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.note("jobledger: interrupted (the job itself goes on)")
        return EXIT_INTERRUPTED
