"""Activation statistics against fp64 and against Wanda's running-mean formula."""

import pytest
import torch
from helpers import FLOAT_DTYPES, dtype_id
from hypothesis import given, settings
from hypothesis import strategies as st

from ecoflap_fast import ops
from ecoflap_fast import reference as ref

# fp32 accumulation error over a few thousand terms: relative, against an fp64 reference
RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(7,), (1, 1, 5), (3, 17, 123), (2, 3, 4, 64), (512, 96)], ids=str)
def test_col_sq_norms_vs_fp64(shape, dtype):
    x = (torch.randn(*shape) * 3).to(dtype)
    got = ops.col_sq_norms(x)
    want = x.double().reshape(-1, shape[-1]).pow(2).sum(0)
    assert got.dtype == torch.float32 and got.shape == (shape[-1],)
    torch.testing.assert_close(got.double(), want, rtol=RTOL[dtype], atol=1e-6)


def test_col_sq_norms_strided_rows():
    x = torch.randn(6, 40)[:, :33]  # row stride 40 != C
    torch.testing.assert_close(ops.col_sq_norms(x), ref.col_sq_norms(x.contiguous()))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_accumulator_equals_wanda_running_mean(dtype):
    ours = ops.ActNormAccumulator(64)
    wanda = ref.ActNormAccumulator(64)
    batches = [torch.randn(4, 16, 64), torch.randn(16, 64), torch.randn(2, 9, 64), torch.randn(1, 128, 64)]
    for b in batches:
        b = b.to(dtype)
        ours.add(b)
        wanda.add(b)
    assert ours.nsamples == wanda.nsamples == 4 + 1 + 2 + 1
    torch.testing.assert_close(ours.scaler_row, wanda.scaler_row, rtol=1e-5, atol=1e-7)
    total = sum(b.to(dtype).double().reshape(-1, 64).pow(2).sum(0) for b in batches) / ours.nsamples
    torch.testing.assert_close(ours.scaler_row.double(), total, rtol=1e-5, atol=1e-7)


def test_accumulator_errors():
    acc = ops.ActNormAccumulator(8)
    with pytest.raises(ValueError, match="no samples"):
        acc.scaler_row
    with pytest.raises(ValueError, match=r"shape \[B, T, 8\]"):
        acc.add(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="in_features"):
        ops.ActNormAccumulator(0)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 20)), min_size=1, max_size=5),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_accumulator(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    ours, wanda = ops.ActNormAccumulator(12), ref.ActNormAccumulator(12)
    for b, t in sizes:
        x = torch.randn(b, t, 12, generator=g)
        ours.add(x)
        wanda.add(x)
    torch.testing.assert_close(ours.scaler_row, wanda.scaler_row, rtol=1e-5, atol=1e-6)
