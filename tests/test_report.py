"""benchmarks/report.py's statistics: the 95% interval of a mean ratio, and the quality table's
seed-spread rows (wins and uniform's own movement between seeds)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import mean_interval, quality_table  # noqa: E402


@pytest.mark.parametrize(
    ("df", "t"),  # published two-sided 97.5% Student t quantiles
    [(1, 12.706), (3, 3.182), (10, 2.228), (11, 2.201), (15, 2.131), (20, 2.086), (30, 2.042), (120, 1.980)],
)
def test_interval_uses_student_t(df, t):
    values = [float(i % 2) for i in range(df + 1)]  # any spread: the half-width is t * sd / sqrt(n)
    mean, half = mean_interval(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / df)
    assert half == pytest.approx(t * sd / math.sqrt(df + 1), rel=2e-3)


def test_interval_needs_two_values():
    with pytest.raises(ValueError, match="at least two"):
        mean_interval([1.0])


def _row(provider, shape, value, op="ppl"):
    return {
        "bench": "quality",
        "op": op,
        "provider": provider,
        "shape": shape,
        "dtype": "float32",
        "metric": op,
        "unit": "ppl",
        "median": str(value),
        "device": "cpu",
        "commit": "x",
        "date": "d",
    }


def test_seed_rows_count_wins_and_uniform_spread():
    rows = [_row("dense", "m s=0 seed=0", 10.0)]
    for seed, (u, e) in enumerate([(50.0, 40.0), (55.0, 44.0), (52.0, 53.0)]):
        rows += [_row("uniform", f"m s=0.6 seed={seed}", u), _row("ecoflap-zo", f"m s=0.6 seed={seed}", e)]
    table = quality_table(rows)
    ratios = [40 / 50, 44 / 55, 53 / 52]
    mean, half = mean_interval(ratios)
    line = next(ln for ln in table.splitlines() if ln.startswith("| ecoflap-zo | 0.6 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "3" and cells[3] == f"{mean:.2f}× (± {half:.2f})"
    assert cells[6] == "2/3" and cells[7] == f"{55 / 50:.2f}×"
