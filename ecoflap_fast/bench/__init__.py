"""Benchmark harness, layer shapes, baselines, and the op and end-to-end benchmarks (`ecoflap-fast bench`)."""
