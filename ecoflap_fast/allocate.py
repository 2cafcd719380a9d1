"""Per-group sparsity from group scores (SPEC §3.2), and OWL's outlier-weighted allocation.

ECoFLaP allocation: keep budget K = round(N·(1 − s)); every group keeps at least
ceil(N_g·(1 − m)) weights (sparsity ≤ m); the rest of the budget is split in proportion to the
scores S_g, no group keeping more than N_g, what a saturated group cannot take going to the others
(water-filling); the kept total is exactly K. For equal sizes without saturation this is
s_g = m − (m − s)·S_g / mean(S).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Allocation:
    sparsity: list[float]  # per group
    keep: list[int]  # weights kept per group
    fallback: str | None = None  # why uniform was used instead, if it was


def _water_fill(budget: int, weights: list[float], caps: list[int]) -> list[int]:
    """Integers x_g ≤ caps[g], Σx = budget, proportional to weights with saturated groups capped.
    Fractional remainders go to the largest remainders (ties: lower index)."""
    n = len(caps)
    alloc = [0.0] * n
    active = [g for g in range(n) if caps[g] > 0]
    remaining = float(budget)
    while active and remaining > 1e-9:
        wsum = sum(weights[g] for g in active)
        if wsum <= 0:  # only zero-score groups left: share equally by capacity
            share = {g: remaining * caps[g] / sum(caps[h] for h in active) for g in active}
        else:
            share = {g: remaining * weights[g] / wsum for g in active}
        saturated = [g for g in active if alloc[g] + share[g] >= caps[g]]
        if not saturated:
            for g in active:
                alloc[g] += share[g]
            break
        for g in saturated:
            remaining -= caps[g] - alloc[g]
            alloc[g] = float(caps[g])
        active = [g for g in active if g not in saturated]
    ints = [min(caps[g], math.floor(alloc[g] + 1e-9)) for g in range(n)]
    short = budget - sum(ints)
    order = sorted(range(n), key=lambda g: (-(alloc[g] - ints[g]), g))
    while short > 0:
        progressed = False
        for g in order:
            if short == 0:
                break
            if ints[g] < caps[g]:
                ints[g] += 1
                short -= 1
                progressed = True
        if not progressed:
            raise ValueError("keep budget exceeds the total capacity of the groups")
    return ints


def ecoflap_allocation(sizes: list[int], scores: list[float], sparsity: float, max_sparsity: float) -> Allocation:
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not sparsity <= max_sparsity < 1:
        raise ValueError(f"max sparsity must be in [sparsity={sparsity}, 1), got {max_sparsity}")
    if len(sizes) != len(scores) or not sizes:
        raise ValueError("sizes and scores must be non-empty and of equal length")
    total = sum(sizes)
    budget = round(total * (1 - sparsity))
    floor_keep = [math.ceil(n * (1 - max_sparsity)) for n in sizes]
    rest = budget - sum(floor_keep)
    fallback = None
    if any(not math.isfinite(s) for s in scores) or any(s < 0 for s in scores):
        fallback = "group scores contain NaN, Inf or negative values"
    elif all(s == 0 for s in scores):
        fallback = "every group score is 0"
    elif rest < 0:
        fallback = f"max sparsity {max_sparsity} leaves no room above the per-group minimum"
    if fallback is not None:
        keep = _water_fill(budget, [float(n) for n in sizes], list(sizes))  # uniform: proportional to size
        return Allocation([1 - k / n for k, n in zip(keep, sizes)], keep, fallback)
    extra = _water_fill(rest, [float(s) for s in scores], [n - f for n, f in zip(sizes, floor_keep)])
    keep = [f + e for f, e in zip(floor_keep, extra)]
    return Allocation([1 - k / n for k, n in zip(keep, sizes)], keep)


def owl_sparsities(outlier_ratios: list[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """OWL: min-max rescale outlier ratios D to [0, 2λ]; s_l = s − (D̃_l − mean D̃)."""
    lo, hi = min(outlier_ratios), max(outlier_ratios)
    if hi == lo:
        return [sparsity] * len(outlier_ratios)
    scaled = [(d - lo) / (hi - lo) * 2 * lam for d in outlier_ratios]
    mean = sum(scaled) / len(scaled)
    return [min(max(sparsity - (d - mean), 0.0), 0.99) for d in scaled]
