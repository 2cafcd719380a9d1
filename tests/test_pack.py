"""2:4 CUTLASS and compressed-tensors bitmask packing: byte-identical to the reference layouts."""

import numpy as np
import pytest
import torch
from helpers import assert_equal_exact, dtype_id
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from ecoflap_fast import _ext, ops
from ecoflap_fast import reference as ref

pytestmark = pytest.mark.skipif(not _ext.is_available(), reason=f"C++ extension unavailable: {_ext.reason()}")


def random_nm(rows, cols, dtype, n=2, m=4, *, fewer=True, gen=None):
    """An n:m-sparse matrix with ties, negative zeros and groups holding fewer than n non-zeros."""
    if dtype == torch.int8:
        dense = torch.randint(-127, 128, (rows, cols), generator=gen).to(torch.int8)
        dense[dense == 0] = 1
    else:
        dense = (torch.randint(-8, 8, (rows, cols), generator=gen).float() * 0.5).to(dtype)
        dense[dense == 0] = 0.5
    keep = ref.select_mask(torch.rand(rows, cols, generator=gen), nm=(n, m))
    dense[keep] = 0
    if fewer:
        # every pattern with fewer than n non-zeros occurs: knock out random survivors
        extra = torch.rand(rows, cols, generator=gen) < 0.25
        dense[extra] = 0
        if dtype.is_floating_point:
            neg0 = torch.rand(rows, cols, generator=gen) < 0.1
            dense[neg0 & (dense == 0)] = -0.0
    return dense


CUTLASS_SHAPES = {
    torch.float16: [(32, 32), (64, 96), (96, 4096)],
    torch.bfloat16: [(32, 32), (160, 1056)],
    torch.int8: [(16, 64), (48, 192), (128, 4096)],
}
CUTLASS_CASES = [(dt, s) for dt, shapes in CUTLASS_SHAPES.items() for s in shapes]


@pytest.mark.parametrize("dtype,shape", CUTLASS_CASES, ids=[f"{dtype_id(d)}-{s[0]}x{s[1]}" for d, s in CUTLASS_CASES])
def test_pack_24_cutlass_byte_identical_to_torch(dtype, shape):
    dense = random_nm(*shape, dtype)
    values, meta = ops.pack_24_cutlass(dense)
    want_values, want_meta = sparse_semi_structured_from_dense_cutlass(dense)
    assert_equal_exact(values, want_values, "values")
    assert_equal_exact(meta, want_meta, "meta")
    unpacked = ops.unpack_24_cutlass(values, meta)
    # exact as values (-0.0 at positions the layout does not store comes back as +0.0) ...
    assert torch.equal(unpacked, dense)
    # ... and bitwise what torch's own unpack gives
    assert_equal_exact(unpacked, sparse_semi_structured_to_dense_cutlass(values, meta), "unpack vs torch")


def test_every_group_pattern_is_encoded_like_torch():
    # all 11 patterns with at most 2 non-zeros, in every position of a 32x16 tile
    patterns = [p for p in range(16) if bin(p).count("1") <= 2]
    dense = torch.zeros(32, 32, dtype=torch.float16)
    for r in range(32):
        for g in range(8):
            p = patterns[(r * 4 + g) % len(patterns)]
            for i in range(4):
                if p >> i & 1:
                    dense[r, 4 * g + i] = float(1 + i + g)
    values, meta = ops.pack_24_cutlass(dense)
    want_values, want_meta = sparse_semi_structured_from_dense_cutlass(dense)
    assert_equal_exact(values, want_values, "values")
    assert_equal_exact(meta, want_meta, "meta")


@pytest.mark.parametrize("dtype,shape", [(torch.float16, (32, 16)), (torch.float16, (16, 32)), (torch.int8, (16, 32))])
def test_pack_24_rejects_shapes_outside_the_layout(dtype, shape):
    with pytest.raises(ValueError, match="CUTLASS 2:4 layout"):
        ops.pack_24_cutlass(torch.zeros(shape, dtype=dtype))
    with pytest.raises(ValueError, match="multiple of"):
        torch.ops.ecoflap_fast.pack_24_cutlass(torch.zeros(shape, dtype=dtype))


def test_pack_24_rejects_dense_groups_and_leaves_input():
    dense = random_nm(32, 32, torch.float16)
    dense[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    before = dense.clone()
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 5, columns 8\.\.11"):
        ops.pack_24_cutlass(dense)
    assert_equal_exact(dense, before, "input after a rejected pack")


@pytest.mark.parametrize("shape", [(1, 1), (1, 8), (3, 7), (5, 13), (17, 123), (64, 1823)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8], ids=dtype_id)
def test_bitmask_unstructured_matches_numpy_packbits(shape, dtype):
    dense = (torch.randn(*shape) * 4).to(dtype)
    dense[torch.rand(*shape) < 0.6] = 0
    if dtype.is_floating_point:
        dense[torch.rand(*shape) < 0.05] = -0.0
    packed = ops.pack_bitmask(dense)
    keep = (dense != 0).numpy()
    assert_equal_exact(packed.bitmask, torch.from_numpy(np.packbits(keep, axis=-1, bitorder="little")), "bitmask")
    assert_equal_exact(packed.values, dense[dense != 0], "values")
    counts = (dense != 0).sum(1)
    assert_equal_exact(packed.row_offsets, torch.cumsum(counts, 0) - counts, "row_offsets")
    for got, want in zip(packed, ref.pack_bitmask(dense)):
        assert_equal_exact(got, want)
    assert torch.equal(ops.unpack_bitmask(packed.values, packed.bitmask, shape), dense)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)], ids=lambda nm: f"{nm[0]}of{nm[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int8], ids=dtype_id)
def test_bitmask_nm_matches_reference(nm, dtype):
    dense = random_nm(24, 40, dtype, *nm)
    packed = ops.pack_bitmask(dense, nm=nm)
    assert packed.values.shape == (24, 40 // nm[1] * nm[0])
    for got, want in zip(packed, ref.pack_bitmask(dense, nm=nm)):
        assert_equal_exact(got, want)
    # exactly n kept per group, and the round trip is exact
    bits = np.unpackbits(packed.bitmask.numpy(), axis=-1, count=40, bitorder="little").reshape(24, -1, nm[1])
    assert (bits.sum(-1) == nm[0]).all()
    assert torch.equal(ops.unpack_bitmask(packed.values, packed.bitmask, dense.shape), dense)


def test_bitmask_nm_rejects_dense_group():
    dense = torch.ones(2, 8)
    dense[0, 4:] = 0
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 0, columns 0\.\.3"):
        ops.pack_bitmask(dense, nm=(2, 4))


def test_unpack_bitmask_count_mismatch():
    packed = ops.pack_bitmask(torch.eye(8))
    with pytest.raises(ValueError, match="values"):
        ops.unpack_bitmask(packed.values[:-1], packed.bitmask, (8, 8))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 70), density=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_property_bitmask_round_trip(rows, cols, density, seed):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randint(-3, 4, (rows, cols), generator=g).to(torch.bfloat16)
    dense[torch.rand(rows, cols, generator=g) > density] = 0
    packed = ops.pack_bitmask(dense)
    for got, want in zip(packed, ref.pack_bitmask(dense)):
        assert_equal_exact(got, want)
    assert torch.equal(ops.unpack_bitmask(*packed[:2], (rows, cols)), dense)


@settings(max_examples=25, deadline=None)
@given(
    row_tiles=st.integers(1, 3),
    col_tiles=st.integers(1, 4),
    dtype=st.sampled_from([torch.float16, torch.int8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_cutlass(row_tiles, col_tiles, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rows, cols = (32 * row_tiles, 32 * col_tiles) if dtype == torch.float16 else (16 * row_tiles, 64 * col_tiles)
    dense = random_nm(rows, cols, dtype, gen=g)
    values, meta = ops.pack_24_cutlass(dense)
    want_values, want_meta = sparse_semi_structured_from_dense_cutlass(dense)
    assert_equal_exact(values, want_values, "values")
    assert_equal_exact(meta, want_meta, "meta")
    assert torch.equal(ops.unpack_24_cutlass(values, meta), dense)
