"""Triton kernels against the reference twins: exact masks on tie-heavy input, fp32 norms.

Without a GPU they run on CPU tensors under TRITON_INTERPRET=1 (small shapes); with one, on CUDA.
The per-row selection runs in both of its algorithms (bisect, radix) on the same cases."""

import pytest
import torch
from helpers import FLOAT_DTYPES, assert_equal_exact, dtype_id, tie_heavy_scaler, tie_heavy_weight

from ecoflap_fast import reference as ref

triton = pytest.importorskip("triton", reason="triton is not installed")
from ecoflap_fast.kernels import act_norm, select  # noqa: E402

from ecoflap_fast import kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROW_SHAPES = [(1, 4), (3, 5), (7, 123), (16, 257)]
VARIANTS = list(kernels.SELECT_VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sparsity", [0.5, 0.29, 0.0, 0.9])
def test_row_select_mask_and_prune(shape, dtype, sparsity, variant):
    w = tie_heavy_weight(*shape, dtype).to(DEVICE)
    s = tie_heavy_scaler(shape[1]).to(DEVICE)
    k = ref.num_pruned(shape[1], sparsity)
    want = ref.wanda_mask(w.cpu(), s.cpu(), sparsity)
    assert_equal_exact(select.select(w, s, k=k, variant=variant).cpu(), want, "mask")
    pruned = w.clone()
    assert select.select(pruned, s, k=k, prune_into=pruned, variant=variant) == k * shape[0]
    expected = w.cpu().clone()
    ref.wanda_prune_(expected, s.cpu(), sparsity)
    assert_equal_exact(pruned.cpu(), expected, "pruned weight")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "nm,shape",
    [((2, 4), (3, 8)), ((2, 4), (9, 36)), ((4, 8), (5, 32)), ((1, 4), (2, 12)), ((5, 32), (3, 64))],
    ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else None,
)
def test_nm_select(nm, shape, dtype):
    w = tie_heavy_weight(*shape, dtype).to(DEVICE)
    s = tie_heavy_scaler(shape[1]).to(DEVICE)
    assert_equal_exact(select.select(w, s, nm=nm).cpu(), ref.wanda_mask(w.cpu(), s.cpu(), nm=nm), "mask")
    pruned = w.clone()
    select.select(pruned, s, nm=nm, prune_into=pruned)
    expected = w.cpu().clone()
    ref.wanda_prune_(expected, s.cpu(), nm=nm)
    assert_equal_exact(pruned.cpu(), expected, "pruned weight")


@pytest.mark.parametrize(
    "kw",
    [dict(k=10, variant="bisect"), dict(k=10, variant="radix"), dict(nm=(2, 4))],
    ids=["row-bisect", "row-radix", "2of4"],
)
def test_signed_scores_and_magnitude(kw):
    scores = (torch.randint(-3, 4, (6, 24)).float() * 0.5).to(DEVICE)
    scores[0, :6] = -0.0
    sparsity = kw["k"] / 24 if "k" in kw else None
    want = ref.select_mask(scores.cpu(), sparsity, nm=kw.get("nm"))
    assert_equal_exact(select.select(scores, None, use_abs=False, **kw).cpu(), want, "signed-score mask")
    w = tie_heavy_weight(6, 24, torch.float16).to(DEVICE)
    want = ref.select_mask(w.cpu().abs().float(), sparsity, nm=kw.get("nm"))
    assert_equal_exact(select.select(w, None, use_abs=True, **kw).cpu(), want, "magnitude mask")


# Scores at the ends of the key range: their top digits are 0x00 / 0xFF, so the radix passes meet
# the first and last bins, and a k-th key whose found digits are all ones.
FMAX = torch.finfo(torch.float32).max
EXTREMES = [float("-inf"), -FMAX, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, FMAX, float("inf")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_row_select_extreme_keys(variant):
    gen = torch.Generator().manual_seed(1)
    values = torch.tensor(EXTREMES)
    scores = values[torch.randint(0, len(EXTREMES), (10, 37), generator=gen)]
    scores[1] = FMAX  # every key equal, at the top of the finite range
    scores[2, :30] = float("inf")  # the k-th key is +inf for most k
    scores[3] = torch.nextafter(torch.full((37,), 3.4e38), torch.tensor(float("inf")))
    for k in [0, 1, 18, 36, 37]:
        sparsity = (k + 0.5) / 37  # int(37 * sparsity) == k
        want = ref.select_mask(scores, sparsity)
        got = select.select(scores.to(DEVICE), None, k=k, use_abs=False, variant=variant).cpu()
        assert_equal_exact(got, want, f"mask k={k}")


def test_select_variant_setting(monkeypatch):
    w = torch.empty(3, 20000, dtype=torch.bfloat16, device="meta")
    sq = torch.empty(20000, device="meta")
    narrow = w[:, :300]

    def launched(t):
        return select.row_select_launch(t, sq, t, t, 5, use_abs=True, scaled=True, prune=True).variant

    monkeypatch.delenv(kernels.SELECT_VARIANT_ENV, raising=False)
    assert kernels.select_variant() == kernels.DEFAULT_SELECT_VARIANT == "bisect"
    monkeypatch.setenv(kernels.SELECT_VARIANT_ENV, "radix")
    assert kernels.select_variant() == "radix" and launched(narrow) == "radix"
    assert launched(w) == "bisect"  # rows wider than RADIX_MAX_BLOCK: the radix kernel would spill
    kernels.set_select_variant("bisect")
    try:
        assert launched(narrow) == "bisect"
    finally:
        kernels.set_select_variant(None)
    monkeypatch.setenv(kernels.SELECT_VARIANT_ENV, "quick")
    with pytest.raises(ValueError, match=kernels.SELECT_VARIANT_ENV):
        kernels.select_variant()
    with pytest.raises(ValueError, match="variant"):
        kernels.set_select_variant("sort")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_matrix_select_and_scores(dtype):
    w = tie_heavy_weight(9, 40, dtype).to(DEVICE)
    s = tie_heavy_scaler(40).to(DEVICE)
    assert_equal_exact(select.scores(w, s).cpu(), ref.wanda_scores(w.cpu(), s.cpu()), "scores")
    k = ref.num_pruned(w.numel(), 0.6)
    want = ref.wanda_mask(w.cpu(), s.cpu(), 0.6, per="matrix")
    assert_equal_exact(select.select(w, s, k=k, per_matrix=True).cpu(), want, "matrix mask")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(7,), (1, 1, 5), (3, 17, 123), (2, 3, 4, 64), (300, 33)], ids=str)
def test_col_sq_norms(shape, dtype):
    x = (torch.randn(*shape) * 3).to(dtype).to(DEVICE)
    got = act_norm.col_sq_norms(x)
    want = x.cpu().double().reshape(-1, shape[-1]).pow(2).sum(0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-6)


def test_col_sq_norms_strided_and_accumulating():
    x = torch.randn(50, 40, device=DEVICE)[:, :33]  # row stride 40 != C
    out = torch.ones(33, device=DEVICE)
    act_norm.col_sq_norms(x, out=out)
    torch.testing.assert_close(out.cpu(), 1 + x.cpu().pow(2).sum(0), rtol=1e-5, atol=1e-5)
