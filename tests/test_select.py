"""Masks and in-place pruning: exact equality with the stable-sort reference on tie-heavy input."""

import pytest
import torch
from helpers import FLOAT_DTYPES, assert_equal_exact, dtype_id, tie_heavy_scaler, tie_heavy_weight
from hypothesis import given, settings
from hypothesis import strategies as st

from ecoflap_fast import _ext, ops
from ecoflap_fast import reference as ref

pytestmark = pytest.mark.skipif(not _ext.is_available(), reason=f"C++ extension unavailable: {_ext.reason()}")

ROW_SHAPES = [(1, 4), (1, 1), (3, 4), (5, 123), (64, 257), (8, 3000), (1823, 781)]
NM_SHAPES = [(1, 4), (3, 8), (7, 32), (33, 1824), (128, 4096)]
MODES = [
    ("row", dict(sparsity=0.5)),
    ("row", dict(sparsity=0.0)),
    ("row", dict(sparsity=0.7)),
    ("row", dict(sparsity=0.29)),  # int(100 * 0.29) == 28: the float product is what Wanda floors
    ("matrix", dict(sparsity=0.6, per="matrix")),
]


def _shape_id(s):
    return f"{s[0]}x{s[1]}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0]}-{m[1]['sparsity']}")
def test_wanda_mask_matches_reference(shape, dtype, mode):
    w = tie_heavy_weight(*shape, dtype)
    s = tie_heavy_scaler(shape[1])
    kw = mode[1]
    got = ops.wanda_mask(w, s, **kw)
    want = ref.wanda_mask(w, s, **kw)
    assert_equal_exact(got, want, "mask")
    # the selection size is exactly k
    k = ref.num_pruned(w.numel() if kw.get("per") == "matrix" else shape[1], kw["sparsity"])
    assert int(got.sum()) == (k if kw.get("per") == "matrix" else k * shape[0])


NM_CASES = [(s, nm) for s in NM_SHAPES for nm in [(2, 4), (4, 8), (1, 4), (3, 4), (5, 32)] if s[1] % nm[1] == 0]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,nm", NM_CASES, ids=[f"{_shape_id(s)}-{nm[0]}of{nm[1]}" for s, nm in NM_CASES])
def test_nm_mask_matches_reference(shape, dtype, nm):
    w = tie_heavy_weight(*shape, dtype)
    s = tie_heavy_scaler(shape[1])
    got = ops.wanda_mask(w, s, nm=nm)
    assert_equal_exact(got, ref.wanda_mask(w, s, nm=nm), "mask")
    kept = (~got).reshape(shape[0], -1, nm[1]).sum(-1)
    assert bool((kept == nm[0]).all())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "kw", [dict(sparsity=0.5), dict(sparsity=0.6, per="matrix"), dict(nm=(2, 4))], ids=["row", "matrix", "2of4"]
)
def test_prune_in_place_matches_reference(dtype, kw):
    w = tie_heavy_weight(96, 256, dtype)
    s = tie_heavy_scaler(256)
    expected = w.clone()
    n_ref = ref.wanda_prune_(expected, s, **kw)
    got = w.clone()
    n = ops.wanda_prune_(got, s, **kw)
    assert_equal_exact(got, expected, "pruned weight")
    assert n == n_ref


def test_prune_non_contiguous_weight():
    base = tie_heavy_weight(256, 96, torch.float16)
    w = base.t()  # [96, 256] view, not contiguous
    s = tie_heavy_scaler(256)
    expected = w.clone()
    ref.wanda_prune_(expected, s, 0.5)
    ops.wanda_prune_(w, s, 0.5)
    assert_equal_exact(w.contiguous(), expected, "pruned weight (through a view)")
    assert_equal_exact(base.t().contiguous(), expected, "pruned base storage")


def test_negative_zero_ties_positive_zero():
    # scaler entries of -0.0 make -0.0 scores; the stable sort treats them as equal to +0.0
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0]])
    s = torch.tensor([-0.0, 0.0, -0.0, 1.0, 1.0, 1.0])
    assert_equal_exact(ops.wanda_mask(w, s, 0.5), ref.wanda_mask(w, s, 0.5), "mask")


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.45, per="matrix"), dict(nm=(2, 4))])
def test_select_mask_on_signed_scores(kw):
    scores = torch.randint(-3, 4, (40, 64)).float() * 0.5
    scores[0, :5] = -0.0
    assert_equal_exact(ops.select_mask(scores, **kw), ref.select_mask(scores, **kw), "mask")
    w = torch.randn(40, 64)
    expected = w.clone()
    n_ref = ref.prune_by_scores_(expected, scores, **kw)
    n = ops.prune_by_scores_(w, scores, **kw)
    assert_equal_exact(w, expected, "pruned weight")
    assert n == n_ref


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    groups=st.integers(1, 24),
    levels=st.integers(1, 6),
    sparsity=st.floats(0.0, 0.99),
    per=st.sampled_from(["row", "matrix"]),
    dtype=st.sampled_from(FLOAT_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_wanda_mask(rows, groups, levels, sparsity, per, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    cols = groups * 4
    w = (torch.randint(-levels, levels + 1, (rows, cols), generator=g).float() * 0.125).to(dtype)
    s = torch.randint(0, levels + 1, (cols,), generator=g).float()
    assert_equal_exact(ops.wanda_mask(w, s, sparsity, per=per), ref.wanda_mask(w, s, sparsity, per=per), "mask")
    for nm in [(2, 4), (1, 4)]:
        assert_equal_exact(ops.wanda_mask(w, s, nm=nm), ref.wanda_mask(w, s, nm=nm), f"{nm} mask")
