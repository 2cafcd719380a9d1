"""GPU suite (marker gpu): CUDA and Triton results identical to the CPU path on real layer shapes,
with poisoned outputs. Skipped with a reason when no CUDA device is visible."""

import pytest
import torch
from helpers import assert_equal_exact, tie_heavy_scaler, tie_heavy_weight

from ecoflap_fast import _ext, ops
from ecoflap_fast import reference as ref

pytestmark = pytest.mark.gpu

LAYERS = [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 4096), (14336, 4096), (4096, 14336)]


def _poison_allocator(nbytes=1 << 30):
    """Fill freed cache blocks with a pattern, so an output the kernel forgets to write shows up."""
    junk = torch.full((nbytes // 4,), -1.2345e-5, device="cuda")
    del junk


@pytest.mark.parametrize("shape", LAYERS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(nm=(2, 4)), dict(nm=(4, 8))], ids=["row", "2of4", "4of8"])
def test_prune_matches_cpu_on_layer_shapes(shape, dtype, kw):
    w = tie_heavy_weight(*shape, dtype)
    s = tie_heavy_scaler(shape[1])
    expected = w.clone()
    ops.wanda_prune_(expected, s, **kw)  # CPU (C++) path, itself tested against the reference
    _poison_allocator()
    got = w.cuda()
    ops.wanda_prune_(got, s.cuda(), **kw)
    assert_equal_exact(got.cpu(), expected, "pruned weight")
    _poison_allocator()
    assert_equal_exact(ops.wanda_mask(w.cuda(), s.cuda(), **kw).cpu(), ops.wanda_mask(w, s, **kw), "mask")


@pytest.mark.parametrize("shape", LAYERS + [(8192, 28672), (64, 16384), (64, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", ["bisect", "radix"])
def test_row_select_variants_match_cpu(shape, variant):
    from ecoflap_fast import kernels

    w = tie_heavy_weight(*shape, torch.bfloat16)
    s = tie_heavy_scaler(shape[1])
    expected = w.clone()
    ops.wanda_prune_(expected, s, 0.5)
    kernels.set_select_variant(variant)
    try:
        _poison_allocator()
        got = w.cuda()
        ops.wanda_prune_(got, s.cuda(), 0.5)
        assert_equal_exact(got.cpu(), expected, f"pruned weight ({variant})")
        _poison_allocator()
        mask = ops.wanda_mask(w.cuda(), s.cuda(), 0.3)
        assert_equal_exact(mask.cpu(), ops.wanda_mask(w, s, 0.3), f"mask ({variant})")
    finally:
        kernels.set_select_variant(None)


def test_per_matrix_and_scores_on_gpu():
    w = tie_heavy_weight(1024, 4096, torch.bfloat16)
    s = tie_heavy_scaler(4096)
    assert_equal_exact(
        ops.wanda_mask(w.cuda(), s.cuda(), 0.6, per="matrix").cpu(), ops.wanda_mask(w, s, 0.6, per="matrix")
    )
    assert_equal_exact(ops.wanda_scores(w.cuda(), s.cuda()).cpu(), ref.wanda_scores(w, s), "scores")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_col_sq_norms_gpu(dtype):
    x = torch.randn(8, 2048, 4096, dtype=dtype, device="cuda")
    got = ops.col_sq_norms(x)
    want = x.double().reshape(-1, 4096).pow(2).sum(0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="ecoflap_fast._C was built without CUDA sources")
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (96, 4160)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int8])
def test_cuda_packers_byte_identical_to_cpu(shape, dtype):
    from test_pack import random_nm

    if dtype == torch.int8 and shape[1] % 64:
        pytest.skip("int8 CUTLASS layout needs columns % 64")
    dense = random_nm(*shape, dtype)
    _poison_allocator()
    v, m = ops.pack_24_cutlass(dense.cuda())
    cv, cm = ops.pack_24_cutlass(dense)
    assert_equal_exact(v.cpu(), cv, "values")
    assert_equal_exact(m.cpu(), cm, "meta")
    assert_equal_exact(ops.unpack_24_cutlass(v, m).cpu(), ops.unpack_24_cutlass(cv, cm), "unpack")
    for nm in [None, (2, 4)]:
        g = ops.pack_bitmask(dense.cuda(), nm=nm)
        c = ops.pack_bitmask(dense, nm=nm)
        for a, b in zip(g, c):
            assert_equal_exact(a.cpu(), b)
        assert torch.equal(ops.unpack_bitmask(g.values, g.bitmask, shape).cpu(), dense)
