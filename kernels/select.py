"""Fused score + exact selection + prune/mask, one pass over the weight (SPEC §2 selection rules).

Per row, two algorithms with identical results; one program holds a row in registers as uint32
order keys of its fp32 scores (the score matrix is never written), finds the exact k-th smallest
key T, prunes every key below T and the lowest-index ties needed to reach exactly k (``tl.cumsum``
over the keys equal to T), and either writes zeros into the weight or stores the mask:

- ``bisect`` (``_row_bisect_kernel``, the default): T bit by bit from the top, one count reduction
  over the row per bit (32 sequential block-wide reductions).
- ``radix`` (``_row_radix_kernel``): T one 8-bit digit at a time, one 256-bin histogram of the row
  (``tl.histogram``, shared-memory counters) and a prefix sum over the bins per digit: 4 passes.
  Before each pass, keys outside the range the digits found so far select are set to 0 (below) or
  0xFFFFFFFF (above; no finite score has either key): their remaining digits land in the first
  (last) bin, so the prefix sum is the rank over the whole row (k is never rebased), and they still
  compare correctly against T at the end. Rows wider than ``RADIX_MAX_BLOCK`` run bisect.

Which one runs: ``variant=`` of :func:`select`, else :func:`ecoflap_fast.kernels.select_variant`.

n:m (``_nm_select_kernel``): a program takes BLOCK_G groups of M consecutive columns; an element is
pruned when fewer than M - N keys of its group precede it in (key, index) order.

per="matrix" (``matrix_select``): scores from ``_scores_kernel``, then one global k-th key and
flat-index tie breaking with torch ops (reads the weight twice and writes fp32 scores once).

Each ``*_launch`` function is the one place its kernel's launch configuration is chosen; the
launchers call it and ``benchmarks/aot_report.py`` compiles what it returns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ecoflap_fast._torch_ops import sqrt_rn

from . import MAX_ROW_WIDTH as MAX_ROW_BLOCK
from . import check_select_variant, select_variant
from ._keys import PAD_KEY32, order_key, score_of
from ._launch import Launch

RADIX_BITS = 8  # digit width of the radix variant: 32 / 8 = 4 histogram passes of 256 bins


@triton.jit
def _load_row_keys(
    src_ptr, sqrt_ptr, row, n_cols, src_row_stride, ABS: tl.constexpr, SCALED: tl.constexpr, BLOCK_N: tl.constexpr
):
    offs = tl.arange(0, BLOCK_N)
    inb = offs < n_cols
    w = tl.load(src_ptr + row * src_row_stride + offs, mask=inb, other=0.0)
    sqrt_s = tl.load(sqrt_ptr + offs, mask=inb, other=1.0) if SCALED else 1.0
    key = tl.where(inb, order_key(score_of(w, sqrt_s, ABS, SCALED)), PAD_KEY32)
    return offs, inb, key


@triton.jit
def _finish_row(
    key,
    t,
    less,
    k,
    offs,
    inb,
    row,
    dst_ptr,
    mask_ptr,
    n_cols,
    dst_row_stride,
    PRUNE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Prune the keys below the k-th key ``t`` (``less`` of them) and the first ``k - less`` keys
    equal to it, by column index."""
    eq = key == t
    eq_rank = tl.cumsum(eq.to(tl.int32), axis=0)  # 1-based rank of each tie, by column index
    pruned = ((key < t) | (eq & (eq_rank <= k - less))) & inb
    if PRUNE:
        zero = tl.zeros((BLOCK_N,), dtype=dst_ptr.dtype.element_ty)
        tl.store(dst_ptr + row * dst_row_stride + offs, zero, mask=pruned)
    else:
        tl.store(mask_ptr + row * n_cols + offs, pruned.to(tl.int8), mask=inb)


@triton.jit
def _row_bisect_kernel(
    src_ptr,
    sqrt_ptr,
    dst_ptr,
    mask_ptr,
    n_cols,
    k,
    src_row_stride,
    dst_row_stride,
    ABS: tl.constexpr,
    SCALED: tl.constexpr,
    PRUNE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs, inb, key = _load_row_keys(src_ptr, sqrt_ptr, row, n_cols, src_row_stride, ABS, SCALED, BLOCK_N)
    # Largest T with #(key < T) < k is the k-th smallest key (k >= 1); built from the top bit down.
    t = tl.zeros((), dtype=tl.uint32)
    one = tl.full((), 1, dtype=tl.uint32)
    for b in range(31, -1, -1):
        cand = t | (one << b)
        below = tl.sum((key < cand).to(tl.int32), axis=0)
        t = tl.where(below < k, cand, t)
    less = tl.sum((key < t).to(tl.int32), axis=0)
    _finish_row(key, t, less, k, offs, inb, row, dst_ptr, mask_ptr, n_cols, dst_row_stride, PRUNE, BLOCK_N)


@triton.jit
def _row_radix_kernel(
    src_ptr,
    sqrt_ptr,
    dst_ptr,
    mask_ptr,
    n_cols,
    k,
    src_row_stride,
    dst_row_stride,
    ABS: tl.constexpr,
    SCALED: tl.constexpr,
    PRUNE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RADIX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs, inb, key = _load_row_keys(src_ptr, sqrt_ptr, row, n_cols, src_row_stride, ABS, SCALED, BLOCK_N)
    BINS: tl.constexpr = 1 << RADIX
    bins = tl.arange(0, BINS)
    t = tl.zeros((), dtype=tl.uint32)  # the digits of the k-th key found so far
    less = tl.zeros((), dtype=tl.int32)  # keys below the range those digits select
    for p in tl.static_range(32 // RADIX):
        if p > 0:
            # keys outside the range of the digits found so far go to 0 (below) or PAD (above): their
            # later digits all land in the first / last bin, and they still compare right against T
            high = key >> (32 - RADIX * p)
            key = tl.where(high < t, 0, tl.where(high > t, PAD_KEY32, key))
        digit = ((key >> (32 - RADIX * (p + 1))) & (BINS - 1)).to(tl.int32)
        hist = tl.histogram(digit, BINS)
        cum = tl.cumsum(hist, axis=0)  # keys at or below each bin: ranks over the whole row
        d = tl.sum((cum < k).to(tl.int32), axis=0)  # the first bin reaching k holds the k-th key
        less = tl.where(d > 0, tl.sum(tl.where(bins < d, hist, 0), axis=0), less)
        t = (t << RADIX) | d.to(tl.uint32)
    _finish_row(key, t, less, k, offs, inb, row, dst_ptr, mask_ptr, n_cols, dst_row_stride, PRUNE, BLOCK_N)


@triton.jit
def _nm_select_kernel(
    src_ptr,
    sqrt_ptr,
    dst_ptr,
    mask_ptr,
    n_groups_total,
    groups_per_row,
    n_cols,
    src_row_stride,
    dst_row_stride,
    N: tl.constexpr,
    M: tl.constexpr,
    ABS: tl.constexpr,
    SCALED: tl.constexpr,
    PRUNE: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    gid = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)  # flat group ids
    j = tl.arange(0, M)
    ok = gid < n_groups_total
    row = gid // groups_per_row
    col = (gid % groups_per_row)[:, None] * M + j[None, :]  # [BLOCK_G, M]
    inb = ok[:, None] & (j[None, :] < M)
    w = tl.load(src_ptr + row[:, None] * src_row_stride + col, mask=inb, other=0.0)
    sqrt_s = tl.load(sqrt_ptr + col, mask=inb, other=1.0) if SCALED else 1.0
    key = order_key(score_of(w, sqrt_s, ABS, SCALED))
    # rank of element i = #{j : (key_j, j) < (key_i, i)}: ties go to the smaller column index
    ki = key[:, :, None]
    kj = key[:, None, :]
    before = (kj < ki) | ((kj == ki) & (j[None, None, :] < j[None, :, None]))
    rank = tl.sum(before.to(tl.int32), axis=2)
    pruned = (rank < M - N) & inb
    if PRUNE:
        zero = tl.zeros((BLOCK_G, M), dtype=dst_ptr.dtype.element_ty)
        tl.store(dst_ptr + row[:, None] * dst_row_stride + col, zero, mask=pruned)
    else:
        tl.store(mask_ptr + row[:, None] * n_cols + col, pruned.to(tl.int8), mask=inb)


@triton.jit
def _scores_kernel(
    src_ptr, sqrt_ptr, out_ptr, n_cols, src_row_stride, ABS: tl.constexpr, SCALED: tl.constexpr, BLOCK_N: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inb = offs < n_cols
    w = tl.load(src_ptr + row * src_row_stride + offs, mask=inb, other=0.0)
    sqrt_s = tl.load(sqrt_ptr + offs, mask=inb, other=1.0) if SCALED else 1.0
    tl.store(out_ptr + row * n_cols + offs, score_of(w, sqrt_s, ABS, SCALED), mask=inb)


# ---- launch configurations (bytes_per_element and passes: see kernels/_launch.py) ---------------
# bytes_per_element counts the weight-shaped tensors once each at their element width: the weight
# read, and the zeros written in place (counted at full width: a masked store still writes whole
# sectors) or the int8 mask. Per-column vectors that every program re-reads (sqrt(scaler_row)) stay
# in L2 and are not counted (SPEC §5: "negligible").


RADIX_MAX_BLOCK = 16384  # widest row block the radix kernel holds without spilling (AOT report)


def row_select_warps(block: int, variant: str) -> int:
    """Warps per row program. bisect: 4 up to 2048 columns, 8 up to 8192, else 16 (at most 64 keys
    per thread). radix: 4 up to 4096 columns, 32 at 8192, 16 at 16384: its digits and shared-memory
    histogram cost more registers per key than bisect, and these are the counts with the highest
    occupancy that compile without spills for sm_90 and sm_100 under Triton 3.6 and 3.9, and for
    sm_80 under 3.9 (ptxas 12.8 of Triton 3.6 trades a few spilled bytes for more CTAs at 8 or 16
    warps for 4096 columns and at 8 for 8192, and spills 8-40 bytes in mask mode at 16384 columns
    on sm_80; benchmarks/aot_report.py)."""
    if variant == "bisect":
        return 4 if block <= 2048 else (8 if block <= 8192 else 16)
    return 4 if block <= 4096 else (32 if block <= 8192 else 16)


def row_select_launch(
    src: torch.Tensor,
    sqrt: torch.Tensor,
    dst: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    *,
    use_abs: bool,
    scaled: bool,
    prune: bool,
    variant: str | None = None,
) -> Launch:
    """One program per row of ``src`` [rows, cols] (unit column stride), the whole row in registers
    (BLOCK_N = next power of two >= cols, at most MAX_ROW_WIDTH). Rows wider than RADIX_MAX_BLOCK
    run the bisect kernel whatever the variant: the radix kernel's digits and keys do not fit in a
    CTA's registers there (``Launch.variant`` says which one runs).

    passes: bisect 32 bit steps + 1 count below T + 1 tie scan = 34; radix 4 digit histograms (the
    count below T falls out of them) + 1 tie scan = 5."""
    variant = select_variant() if variant is None else check_select_variant(variant)
    rows, cols = src.shape
    block = triton.next_power_of_2(max(cols, 16))
    if block > MAX_ROW_BLOCK:
        raise ValueError(f"rows of {cols} columns exceed the per-row kernel's limit of {MAX_ROW_BLOCK}")
    if variant == "radix" and block > RADIX_MAX_BLOCK:
        variant = "bisect"
    if variant == "bisect":
        kernel, extra, passes = _row_bisect_kernel, {}, 32 + 2
    else:
        kernel, extra, passes = _row_radix_kernel, {"RADIX": RADIX_BITS}, 32 // RADIX_BITS + 1
    return Launch(
        kernel,
        (rows,),
        (src, sqrt, dst, mask, cols, k, src.stride(0), dst.stride(0)),
        dict(ABS=use_abs, SCALED=scaled, PRUNE=prune, BLOCK_N=block, **extra),
        num_warps=row_select_warps(block, variant),
        bytes_per_element=src.element_size() + (dst.element_size() if prune else 1),
        tile_bytes=block * src.element_size(),
        passes=passes,
        variant=variant,
    )


def nm_select_launch(
    src: torch.Tensor,
    sqrt: torch.Tensor,
    dst: torch.Tensor,
    mask: torch.Tensor,
    n: int,
    m: int,
    *,
    use_abs: bool,
    scaled: bool,
    prune: bool,
) -> Launch:
    """BLOCK_G groups of m columns per program, BLOCK_G * m * m <= 4096 (the pairwise rank tile).

    passes: 0 (ranks are taken inside each group of m, no operation spans a row)."""
    rows, cols = src.shape
    groups = rows * (cols // m)
    block_g = max(1, min(1024, 4096 // (m * m)))
    return Launch(
        _nm_select_kernel,
        (triton.cdiv(groups, block_g),),
        (src, sqrt, dst, mask, groups, cols // m, cols, src.stride(0), dst.stride(0)),
        dict(N=n, M=m, ABS=use_abs, SCALED=scaled, PRUNE=prune, BLOCK_G=block_g),
        num_warps=4,
        bytes_per_element=src.element_size() + (dst.element_size() if prune else 1),
        tile_bytes=block_g * m * src.element_size(),
        passes=0,
    )


def scores_launch(src: torch.Tensor, sqrt: torch.Tensor, out: torch.Tensor, *, use_abs: bool, scaled: bool) -> Launch:
    """Grid (rows, column blocks of up to 4096). bytes: weight read + fp32 score written; passes: 0."""
    rows, cols = src.shape
    block = min(4096, triton.next_power_of_2(max(cols, 16)))
    return Launch(
        _scores_kernel,
        (rows, triton.cdiv(cols, block)),
        (src, sqrt, out, cols, src.stride(0)),
        dict(ABS=use_abs, SCALED=scaled, BLOCK_N=block),
        num_warps=4,
        bytes_per_element=src.element_size() + out.element_size(),
        tile_bytes=block * src.element_size(),
        passes=0,
    )


def _sqrt_or_dummy(scaler_row, like):
    if scaler_row is None:
        return torch.ones(1, dtype=torch.float32, device=like.device), False
    # correctly rounded, as the reference and the C++ path compute it
    return sqrt_rn(scaler_row).contiguous(), True


def _row_major(t: torch.Tensor, name: str) -> None:
    if t.stride(1) != 1:
        raise ValueError(f"{name} must have unit column stride for the Triton kernels")


def scores(src: torch.Tensor, scaler_row: torch.Tensor | None, use_abs: bool = True) -> torch.Tensor:
    """fp32[out, in] scores |W|·sqrt(scaler_row) (or the raw values): ``wanda_scores`` on GPU."""
    _row_major(src, "weight")
    rows, cols = src.shape
    sq, scaled = _sqrt_or_dummy(scaler_row, src)
    out = torch.empty(rows, cols, dtype=torch.float32, device=src.device)
    scores_launch(src, sq, out, use_abs=use_abs, scaled=scaled)()
    return out


def select(
    src: torch.Tensor,
    scaler_row: torch.Tensor | None,
    *,
    k: int = 0,
    nm=None,
    use_abs: bool = True,
    per_matrix: bool = False,
    prune_into: torch.Tensor | None = None,
    variant: str | None = None,
):
    """Select (SPEC §2) on ``src`` scores. With ``prune_into`` (may be ``src`` itself) write zeros
    there and return the selection size; otherwise return the bool mask. ``variant`` picks the
    per-row algorithm ("bisect" or "radix"; default :func:`ecoflap_fast.kernels.select_variant`).
    Inputs are validated by ``ecoflap_fast.ops``."""
    _row_major(src, "weight")
    rows, cols = src.shape
    sq, scaled = _sqrt_or_dummy(scaler_row, src)
    prune = prune_into is not None
    if prune:
        _row_major(prune_into, "weight")
    if per_matrix:
        mask = matrix_select(scores(src, scaler_row, use_abs), k)
        if not prune:
            return mask
        prune_into.masked_fill_(mask, 0)
        return k
    dst = prune_into if prune else src
    mask = None if prune else torch.empty(rows, cols, dtype=torch.int8, device=src.device)
    mask_arg = mask if mask is not None else src  # unused pointer when pruning
    flags = dict(use_abs=use_abs, scaled=scaled, prune=prune)
    if nm is not None:
        n, m = nm
        nm_select_launch(src, sq, dst, mask_arg, n, m, **flags)()
        count = rows * (cols // m) * (m - n)
    else:
        row_select_launch(src, sq, dst, mask_arg, k, variant=variant, **flags)()
        count = rows * k
    return count if prune else mask.view(torch.bool)


def matrix_select(scores_: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask of the k smallest fp32 scores of the whole matrix, ties by flat index."""
    if k == 0:
        return torch.zeros_like(scores_, dtype=torch.bool)
    bits = scores_.view(torch.int32)
    bits = torch.where(bits == -2147483648, torch.zeros_like(bits), bits)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).flatten()
    t = torch.kthvalue(key, k).values
    less = key < t
    eq = key == t
    take = less | (eq & (torch.cumsum(eq.to(torch.int64), 0) <= k - int(less.sum())))
    return take.view_as(scores_)
