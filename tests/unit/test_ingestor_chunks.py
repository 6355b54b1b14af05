"""The ingestor splits a fetched batch by size, keeping stream order."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from app.ingestor import _by_size


def batch(*sizes: int) -> list[Any]:
    return [(SimpleNamespace(data=b"x" * size), f"job_{n}", None) for n, size in enumerate(sizes)]


def sizes_of(chunks: list[list[Any]]) -> list[list[int]]:
    return [[len(item[0].data) for item in chunk] for chunk in chunks]


def test_small_reports_stay_in_one_transaction() -> None:
    assert sizes_of(list(_by_size(batch(10, 20, 30), 100))) == [[10, 20, 30]]


def test_large_reports_split_in_order_and_an_oversized_one_goes_alone() -> None:
    chunks = list(_by_size(batch(60, 30, 20, 150, 5), 100))
    assert sizes_of(chunks) == [[60, 30], [20], [150], [5]]
    order = [item[1] for chunk in chunks for item in chunk]
    assert order == [f"job_{n}" for n in range(5)]


def test_nothing_in_nothing_out() -> None:
    assert list(_by_size([], 100)) == []
