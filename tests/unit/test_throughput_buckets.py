"""The throughput endpoint's buckets: UTC hours and days, partial ends counted, no overflow."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from projections.queries import bucket_count, bucket_start


def test_a_bucket_starts_on_the_utc_hour_or_day() -> None:
    moment = datetime(2026, 2, 13, 1, 30, 15, 7, tzinfo=timezone(timedelta(hours=2)))
    assert bucket_start(moment, "hour") == datetime(2026, 2, 12, 23, 0, tzinfo=UTC)
    assert bucket_start(moment, "day") == datetime(2026, 2, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("start", "end", "bucket", "count"),
    [
        ("2026-02-13T10:00:00", "2026-02-13T10:00:00", "hour", 1),
        ("2026-02-13T10:59:59", "2026-02-13T11:00:00", "hour", 2),
        ("2026-02-13T00:00:00", "2026-02-13T23:59:59.999999", "hour", 24),
        ("2026-01-01T00:00:00", "2026-01-31T23:59:59.999999", "day", 31),
        ("2024-02-28T12:00:00", "2024-03-01T00:00:00", "day", 3),  # a leap day between
    ],
)
def test_a_window_touches_every_bucket_it_overlaps(
    start: str, end: str, bucket: str, count: int
) -> None:
    first = datetime.fromisoformat(start).replace(tzinfo=UTC)
    last = datetime.fromisoformat(end).replace(tzinfo=UTC)
    assert bucket_count(first, last, bucket) == count


def test_the_widest_windows_are_counted_without_overflow() -> None:
    earliest = datetime.min.replace(tzinfo=UTC)
    latest = datetime.max.replace(tzinfo=UTC)
    assert bucket_count(earliest, latest, "day") == (latest - earliest).days + 1
    assert bucket_start(latest, "hour") == datetime(9999, 12, 31, 23, tzinfo=UTC)
