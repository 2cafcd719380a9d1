"""torch.library: opcheck of every C++ and Triton operator, torch.compile of a pruning step, and the
GPU dispatch path of ecoflap_fast.ops exercised on CPU through the Triton interpreter."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import tie_heavy_scaler, tie_heavy_weight

import ecoflap_fast  # noqa: F401  (registers the operators)
from ecoflap_fast import _ext, _library
from ecoflap_fast import reference as ref

needs_ext = pytest.mark.skipif(not _ext.is_available(), reason=f"C++ extension unavailable: {_ext.reason()}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _nm_dense(rows, cols, dtype):
    d = tie_heavy_weight(rows, cols, torch.float32)
    d[ref.select_mask(torch.rand(rows, cols), nm=(2, 4))] = 0
    return d.to(dtype)


@needs_ext
def test_opcheck_cpp_ops():
    ops = torch.ops.ecoflap_fast
    w = tie_heavy_weight(32, 64, torch.float16)
    s = tie_heavy_scaler(64)
    dense = _nm_dense(32, 64, torch.bfloat16)
    values, meta = ops.pack_24_cutlass(dense)
    packed = ops.pack_bitmask(dense, 2, 4)
    cases = [
        (ops.pack_24_cutlass.default, (dense,)),
        (ops.unpack_24_cutlass.default, (values, meta)),
        (ops.pack_bitmask.default, (dense, 2, 4)),
        (ops.unpack_bitmask.default, (packed[0], packed[1], 32, 64)),
        (ops.select_mask.default, (w, s, True, 32, 0, 0, False)),
        (ops.select_mask.default, (w, None, False, 0, 2, 4, False)),
        (ops.select_prune_.default, (w.clone(), s, 10, 0, 0, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.skipif(not ecoflap_fast.kernels.AVAILABLE, reason="triton is not installed")
def test_opcheck_triton_ops():
    w = tie_heavy_weight(4, 16, torch.float32).to(DEVICE)
    s = tie_heavy_scaler(16).to(DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE)
    for op, args in [
        (_library.triton_select_mask, (w, s, True, 6, 0, 0, False)),
        (_library.triton_select_mask, (w, None, False, 0, 2, 4, False)),
        (_library.triton_select_prune_, (w.clone(), s, 6, 0, 0, False)),
        (_library.triton_scores, (w, s)),
        (_library.triton_col_sq_norms, (x,)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_ext
def test_torch_compile_prune_step():
    from ecoflap_fast import ops

    def step(w, s):
        return ops.wanda_mask(w, s, nm=(2, 4))

    w = tie_heavy_weight(16, 32, torch.float32)
    s = tie_heavy_scaler(32)
    compiled = torch.compile(step, backend="eager", fullgraph=False)
    assert torch.equal(compiled(w, s), ref.wanda_mask(w, s, nm=(2, 4)))


@pytest.mark.skipif(not ecoflap_fast.kernels.AVAILABLE, reason="triton is not installed")
def test_gpu_dispatch_path_through_interpreter():
    code = r"""
import torch
from ecoflap_fast import ops, reference as ref
w = (torch.randint(-4, 4, (6, 40)).float() * 0.5).half(); s = torch.randint(0, 3, (40,)).float()
for kw in [dict(sparsity=0.5), dict(nm=(2, 4)), dict(sparsity=0.3, per="matrix")]:
    assert torch.equal(ops.wanda_mask(w, s, **kw), ref.wanda_mask(w, s, **kw)), kw
    a, b = w.clone(), w.clone()
    assert ops.wanda_prune_(a, s, **kw) == ref.wanda_prune_(b, s, **kw)
    assert torch.equal(a, b), kw
assert torch.equal(ops.wanda_scores(w, s), ref.wanda_scores(w, s))
acc = ops.ActNormAccumulator(40); acc.add(torch.randn(3, 7, 40)); acc.add(torch.randn(7, 40))
assert acc.nsamples == 4
nc = w.float().t().contiguous().t()  # non-contiguous weight
expect = nc.clone(); ref.wanda_prune_(expect, s, 0.5); ops.wanda_prune_(nc, s, 0.5)
assert torch.equal(nc, expect)
print("triton path ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", ECOFLAP_TRITON_CPU="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "triton path ok" in out.stdout
