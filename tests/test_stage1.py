"""Stage 1: fast zeroth-order estimators against the slow reference (same seeds)."""

import math

import pytest
import torch
from tiny_models import tiny_llama, tiny_opt

from ecoflap_fast import stage1, walk
from ecoflap_fast.reference import stage1 as ref_stage1


def _matrices(model, batches):
    """name -> [out, in] view of every prunable matrix, in the plan's order (the noise seeds' order)."""
    return {n: m.weight() for n, m in walk.plan(model, {"input_ids": batches[0]}).matrices().items()}


def _batches(n=2, bsz=2, seqlen=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (bsz, seqlen), generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_fast_fd_equals_reference(family):
    model = family(layers=3)
    batches = _batches()
    want = ref_stage1.zo_tensor_scores(model, _matrices(model, batches), batches, eps=1e-3, seed=5)
    got = stage1.zo_fd_scores(model, batches, eps=1e-3, seed=5, progress=False)
    assert set(got) == set(want)
    # An fp32 loss resolves a finite difference only to ulp(L) / (2ε) per batch: allow 1% plus a few
    # of those quanta (the reference carries the same rounding).
    with torch.no_grad():
        loss = max(float(ref_stage1.causal_lm_loss(model, b)) for b in batches)
    ulp32 = 2.0 ** (math.floor(math.log2(loss)) - 23)
    quantum = len(batches) * ulp32 / (2 * 1e-3)
    for name in want:
        assert abs(got[name] - want[name]) <= 0.01 * want[name] + 4 * quantum, (name, got[name], want[name])
    # the model is restored exactly
    fresh = family(layers=3)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n


def test_gradient_estimator_tracks_finite_differences():
    model = tiny_llama(layers=3)
    batches = _batches()
    fd = ref_stage1.zo_tensor_scores(model, _matrices(model, batches), batches, eps=1e-3, seed=1)
    gr = stage1.zo_grad_scores(model, batches, seed=1, progress=False)
    rel = sorted(abs(gr[n] - fd[n]) / fd[n] for n in fd)
    assert rel[len(rel) // 2] < 0.01, rel  # median relative difference
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_first_order_scores_positive_and_flags_restored():
    model = tiny_llama()
    res = stage1.tensor_scores(model, _batches(), method="fo", progress=False)
    assert set(res.tensor_scores) == set(_matrices(model, _batches()))
    assert all(v > 0 for v in res.tensor_scores.values())
    assert "first-order" in res.method


@pytest.mark.parametrize("metric", ["wg", "g"])
def test_first_order_per_batch_terms_average_to_the_score(metric):
    """Each batch's own first-order term, written here from the batch's gradient, and their mean is
    the score (what the split-half agreement of ecoflap-fo is computed from)."""
    model = tiny_llama(layers=3)
    batches = _batches(n=3)
    res = stage1.tensor_scores(model, batches, method="fo", fo_metric=metric, progress=False)
    assert sorted(res.batch_scores) == [0, 1, 2]
    mats = _matrices(model, batches)
    for b, ids in enumerate(batches):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        for n, w in mats.items():
            g = model.get_parameter(f"{n}.weight").grad.abs()
            want = float((w.abs() * g).sum() if metric == "wg" else g.sum())
            assert res.batch_scores[b][n] == pytest.approx(want, rel=1e-4), (b, n)
    model.zero_grad(set_to_none=True)
    for n in mats:
        mean = sum(res.batch_scores[b][n] for b in range(3)) / 3
        assert res.tensor_scores[n] == pytest.approx(mean, rel=1e-5), n
