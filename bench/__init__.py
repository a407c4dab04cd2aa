"""Benchmarks. Speed lives here, as numbers and ratios measured in one run, never in tests."""
