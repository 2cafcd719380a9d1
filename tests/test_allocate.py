"""Allocation properties: exact budget, the max-sparsity bound, water-filling, the closed form."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecoflap_fast.allocate import ecoflap_allocation, owl_sparsities


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=40),
    data=st.data(),
    s=st.floats(0.0, 0.9),
    gap=st.floats(0.0, 0.099),
)
def test_exact_budget_and_bound(sizes, data, s, gap):
    scores = data.draw(st.lists(st.floats(0, 1e3, allow_nan=False), min_size=len(sizes), max_size=len(sizes)))
    m = s + gap
    a = ecoflap_allocation(sizes, scores, s, m)
    total = sum(sizes)
    assert sum(a.keep) == round(total * (1 - s))  # exact budget, no overshoot
    assert all(0 <= k <= n for k, n in zip(a.keep, sizes))
    if a.fallback is None:
        assert all(k >= math.ceil(n * (1 - m)) for k, n in zip(a.keep, sizes))  # sparsity <= m
        assert all(sg <= m + 1e-12 for sg in a.sparsity)


def test_closed_form_equal_sizes_no_saturation():
    sizes = [10000] * 4
    scores = [1.0, 2.0, 3.0, 2.0]
    a = ecoflap_allocation(sizes, scores, 0.6, 0.7)
    mean = sum(scores) / 4
    for sg, sc in zip(a.sparsity, scores):
        assert sg == pytest.approx(0.7 - 0.1 * sc / mean, abs=2e-4)


def test_water_filling_redistributes_saturated_group():
    # one dominant score would want to keep more than the whole group: it saturates at 0 sparsity
    a = ecoflap_allocation([100, 100, 100], [1000.0, 1.0, 1.0], 0.5, 0.9)
    assert a.keep[0] == 100
    assert sum(a.keep) == 150
    assert a.keep[1] == a.keep[2] == 25


@pytest.mark.parametrize("scores,why", [([0.0, 0.0], "every group score is 0"), ([1.0, float("nan")], "NaN")])
def test_uniform_fallback(scores, why):
    a = ecoflap_allocation([100, 100], scores, 0.5, 0.6)
    assert why in a.fallback
    assert a.sparsity == [0.5, 0.5]


def test_bad_arguments():
    with pytest.raises(ValueError, match="max sparsity"):
        ecoflap_allocation([10], [1.0], 0.5, 0.4)
    with pytest.raises(ValueError, match="sparsity must be"):
        ecoflap_allocation([10], [1.0], 1.0, 1.0)


def test_owl():
    s = owl_sparsities([0.01, 0.02, 0.03], 0.6, lam=0.08)
    assert s == pytest.approx([0.68, 0.6, 0.52])
    assert sum(s) / 3 == pytest.approx(0.6)
    assert owl_sparsities([0.1, 0.1], 0.5) == [0.5, 0.5]
