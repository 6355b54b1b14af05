"""Side-by-side benchmarks: jobledger against plain designs, measured in one run (scripts/bench)."""
