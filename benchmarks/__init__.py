"""Benchmark scripts; the shared harness, shapes and baselines live in ``ecoflap_fast.bench``."""

from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
