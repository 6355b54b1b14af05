"""How `jobledger jobs` shows things to people: aligned tables, times, money, progress bars.

Progress bars are drawn by hand on a terminal only; off a terminal nothing here
writes an escape code.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import TextIO

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_CLEAR_TO_END = "\x1b[K"


def money(value: Decimal | None) -> str:
    """A decimal amount as written, at least two places, never through a float: 0.05, 1.234567."""
    if value is None:
        return "-"
    text = format(value.normalize(), "f")
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


def duration(seconds: float) -> str:
    """A span of time in the two largest units: 45s, 3m 05s, 2h 03m, 4d 06h."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def timestamp(when: datetime | None) -> str:
    """A moment in UTC to the second: 2026-11-29 10:15:06Z."""
    if when is None:
        return "-"
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def ago(when: datetime | None, now: datetime | None = None) -> str:
    """How long ago, for recent moments (12s ago, 3h 05m ago); the date for older ones."""
    if when is None:
        return "-"
    elapsed = ((now or datetime.now(UTC)) - when).total_seconds()
    if elapsed < 0:
        return timestamp(when)
    if elapsed < 7 * 86400:
        return f"{duration(elapsed)} ago"
    return when.astimezone(UTC).strftime("%Y-%m-%d")


def size(count: int | None) -> str:
    """A byte count in binary units: 512 B, 3.2 MiB."""
    if count is None:
        return "?"
    value = float(count)
    for unit in _BYTE_UNITS:
        if value < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int]) -> str:
    """Columns aligned two spaces apart; the columns in `right` (numbers) align right."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def key_values(pairs: Sequence[tuple[str, str]]) -> str:
    """`key  value` lines with the values aligned."""
    width = max((len(key) for key, _ in pairs), default=0)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in pairs)


def bar(fraction: float, width: int, unicode: bool) -> str:
    """A bar `width` cells wide, filled to `fraction`."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    full, empty = ("█", "░") if unicode else ("#", "-")
    return full * filled + empty * (width - filled)


def supports_unicode(stream: TextIO) -> bool:
    """Whether the stream's encoding can draw block characters."""
    try:
        "█░".encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


class StatusLine:
    """One terminal line rewritten in place, at most ten times a second; inert off a terminal."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.unicode = enabled and supports_unicode(stream)
        self._shown = False
        self._last_draw = 0.0

    def show(self, text: str, *, force: bool = False) -> None:
        """Draw `text` over the line (clipped to the terminal's width)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        columns = shutil.get_terminal_size((80, 24)).columns
        self.stream.write("\r" + text[: max(columns - 1, 10)] + _CLEAR_TO_END)
        self.stream.flush()
        self._shown = True
        self._last_draw = now

    def clear(self) -> None:
        """Erase the line, e.g. before printing something else."""
        if self._shown:
            self.stream.write("\r" + _CLEAR_TO_END)
            self.stream.flush()
            self._shown = False


class TransferBar:
    """A progress callback drawing `label [bar] 42%  3.1 MiB / 7.4 MiB  2.0 MiB/s`."""

    def __init__(self, line: StatusLine, label: str) -> None:
        self._line = line
        self._label = label
        self._started = time.monotonic()

    def __call__(self, done: int, total: int | None) -> None:
        """Redraw for `done` of `total` bytes."""
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = f"{size(int(done / elapsed))}/s"
        if total:
            fraction = done / total
            text = (
                f"{self._label} {bar(fraction, 24, self._line.unicode)} {int(fraction * 100):3d}%"
                f"  {size(done)} / {size(total)}  {rate}"
            )
        else:
            text = f"{self._label} {size(done)}  {rate}"
        self._line.show(text, force=total is not None and done >= total)
