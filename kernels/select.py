"""Fused score + exact selection + prune/mask, one pass over the weight (SPEC §2 selection rules).

Per row (``_row_select_kernel``): one program holds a row in registers, computes fp32 scores, finds
the exact k-th smallest order key bit by bit (32 count-reductions, no sort, the score matrix is
never written), prunes every key below it and the lowest-index ties needed to reach exactly k
(``tl.cumsum`` over the equal keys), and either writes zeros into the weight or stores the mask.

n:m (``_nm_select_kernel``): a program takes BLOCK_G groups of M consecutive columns; an element is
pruned when fewer than M - N keys of its group precede it in (key, index) order.

per="matrix" (``matrix_select``): scores from ``_scores_kernel``, then one global k-th key and
flat-index tie breaking with torch ops (reads the weight twice and writes fp32 scores once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ecoflap_fast.reference.ops import sqrt_rn

from . import MAX_ROW_WIDTH as MAX_ROW_BLOCK
from ._keys import order_key, score_of


@triton.jit
def _row_select_kernel(
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
    offs = tl.arange(0, BLOCK_N)
    inb = offs < n_cols
    w = tl.load(src_ptr + row * src_row_stride + offs, mask=inb, other=0.0)
    sqrt_s = tl.load(sqrt_ptr + offs, mask=inb, other=1.0) if SCALED else 1.0
    key = order_key(score_of(w, sqrt_s, ABS, SCALED))
    key = tl.where(inb, key, 4294967296)  # padding sorts after every real key
    # Largest T with #(key < T) < k is the k-th smallest key (k >= 1); built from the top bit down.
    t = tl.zeros((), dtype=tl.int64)
    for b in range(31, -1, -1):
        cand = t + (1 << b)
        below = tl.sum((key < cand).to(tl.int32), axis=0)
        t = tl.where(below < k, cand, t)
    less = tl.sum((key < t).to(tl.int32), axis=0)
    eq = key == t
    eq_rank = tl.cumsum(eq.to(tl.int32), axis=0)  # 1-based rank of each tie, by column index
    pruned = ((key < t) | (eq & (eq_rank <= k - less))) & inb
    if PRUNE:
        zero = tl.zeros((BLOCK_N,), dtype=dst_ptr.dtype.element_ty)
        tl.store(dst_ptr + row * dst_row_stride + offs, zero, mask=pruned)
    else:
        tl.store(mask_ptr + row * n_cols + offs, pruned.to(tl.int8), mask=inb)


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
    key = order_key(score_of(w, sqrt_s, ABS, SCALED)) * M + j[None, :]  # unique within a group
    # rank of element i = #{j : key_j < key_i}
    rank = tl.sum((key[:, None, :] < key[:, :, None]).to(tl.int32), axis=2)
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
    block = min(4096, triton.next_power_of_2(max(cols, 16)))
    _scores_kernel[(rows, triton.cdiv(cols, block))](
        src, sq, out, cols, src.stride(0), ABS=use_abs, SCALED=scaled, BLOCK_N=block
    )
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
):
    """Select (SPEC §2) on ``src`` scores. With ``prune_into`` (may be ``src`` itself) write zeros
    there and return the selection size; otherwise return the bool mask. Inputs are validated by
    ``ecoflap_fast.ops``."""
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
    if nm is not None:
        n, m = nm
        groups = rows * (cols // m)
        block_g = max(1, min(1024, 4096 // (m * m)))
        _nm_select_kernel[(triton.cdiv(groups, block_g),)](
            src,
            sq,
            dst,
            mask_arg,
            groups,
            cols // m,
            cols,
            src.stride(0),
            dst.stride(0),
            N=n,
            M=m,
            ABS=use_abs,
            SCALED=scaled,
            PRUNE=prune,
            BLOCK_G=block_g,
        )
        count = groups * (m - n)
    else:
        block = triton.next_power_of_2(max(cols, 16))
        if block > MAX_ROW_BLOCK:
            raise ValueError(f"rows of {cols} columns exceed the per-row kernel's limit of {MAX_ROW_BLOCK}")
        warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
        _row_select_kernel[(rows,)](
            src,
            sq,
            dst,
            mask_arg,
            cols,
            k,
            src.stride(0),
            dst.stride(0),
            ABS=use_abs,
            SCALED=scaled,
            PRUNE=prune,
            BLOCK_N=block,
            num_warps=warps,
        )
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
