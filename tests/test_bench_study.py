"""benchmarks/bench_allocation_study.py's `ends` rule: both ends no sparser than the target, the
kept total unchanged, the middle allocated by the engine's rule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_allocation_study import ends_sparsity  # noqa: E402
from ecoflap_fast.allocate import ecoflap_allocation  # noqa: E402


@pytest.mark.parametrize("scores", [[0.2, 1.0, 1.5, 0.7, 0.3], [3.0, 1.0, 1.5, 0.7, 2.0], [0.1, 2.0, 0.5, 0.5, 4.0]])
def test_ends_pinned_and_budget_kept(scores):
    sizes = [1000, 1200, 1200, 1200, 800]
    s, m = 0.6, 0.7
    out = ends_sparsity(sizes, scores, s, m)
    base = ecoflap_allocation(sizes, scores, s, m).sparsity
    assert out[0] == pytest.approx(min(base[0], s)) and out[-1] == pytest.approx(min(base[-1], s))
    kept = sum(n * (1 - x) for n, x in zip(sizes, out))
    assert kept == pytest.approx(sum(sizes) * (1 - s), abs=2)
    if base[0] <= s and base[-1] <= s:  # nothing to pin: the default allocation, up to rounding
        assert out == pytest.approx(base, abs=2e-3)
    inner = range(1, len(sizes) - 1)  # the middle by the rule: a higher score, no higher sparsity
    assert all(out[g] <= out[h] + 1e-3 for g in inner for h in inner if scores[g] > scores[h])
