"""Throughput, kernel and memory benchmarks; each prints JSON (they are not tests)."""
