"""Benchmarking helpers (timing protocol of ../shared/BENCHMARKING.md)."""
