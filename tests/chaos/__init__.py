"""Fault injection with bookkeeping: scenarios that break jobledger's surroundings and count.

Each scenario (in `scenarios/`) starts real processes from a `Lab`, injects one kind
of fault while load runs, and returns a `Result`: figures (how many acknowledged,
lost, duplicated, ...) and the checks they must pass. The same scenario runs short in
the test suite (`tests/e2e/test_chaos.py`) and full length from `scripts/chaos`.
"""
