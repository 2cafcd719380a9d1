"""The pure-torch backend of :mod:`ecoflap_fast.ops`: what the engine runs on a device where neither
the C++ extension nor Triton is usable, and the pieces every backend shares (the correctly rounded
square root, the selection size).

It assumes validated input (``ops`` validates before dispatching here). The selection rules are
SPEC §2: the k smallest scores of a row (of the matrix, of each group of m columns), ties pruned
from the smallest index up. This backend finds them without sorting: the k-th smallest value by
``torch.kthvalue`` is the threshold, everything below it is pruned, and the first ``k - #below``
entries equal to it (by a running count) complete the selection. ``ecoflap_fast.reference`` states
the same rules with a stable sort; the tests hold the two equal on tie-heavy inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)


class BitmaskPacked(NamedTuple):
    """compressed-tensors bitmask layout of a 2-D tensor ``[rows, cols]``.

    values:      kept values in row-major order; 1-D (unstructured) or ``[rows, cols*n/m]`` (n:m)
    bitmask:     uint8 ``[rows, ceil(cols/8)]``, column c at byte c//8, bit c%8 (LSB first)
    row_offsets: int64 ``[rows]``, start of each row inside the flattened ``values``
    """

    values: torch.Tensor
    bitmask: torch.Tensor
    row_offsets: torch.Tensor


def num_pruned(count: int, sparsity: float) -> int:
    """k = floor(count * sparsity), computed as Wanda does (``int(width * ratio)``)."""
    return int(count * sparsity)


def col_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """fp32[C]: Σ x² over every leading dim of ``x[..., C]``, in chunks so no fp32 copy of a large
    low-precision ``x`` is made at once."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
    for chunk in flat.split(4096):
        c = chunk.float()
        out += (c * c).sum(0)
    return out


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root of finite x >= 0, on any device.

    ``torch.sqrt`` of fp32 on the CPU is not correctly rounded (about 15% of inputs come out one ulp
    away), and one ulp decides ties between columns, so every backend takes its factors from here
    (the C++ path uses std::sqrt, which is correctly rounded). fp64 sqrt gives a float within one
    ulp of the root; the neighbour whose square is closest to x (squares of 24-bit floats are exact
    in fp64) is the correctly rounded one, and an exact midpoint cannot occur for a square root.
    """
    x = x.float()
    r = torch.sqrt(x.double()).float()
    down = torch.nextafter(r, torch.zeros_like(r))
    up = torch.nextafter(r, torch.full_like(r, float("inf")))
    xd = x.double()
    cands = torch.stack([down, r, up])
    err = (cands.double() ** 2 - xd).abs()
    return cands.gather(0, err.argmin(0, keepdim=True)).squeeze(0)


def wanda_scores(weight: torch.Tensor, scaler_row: torch.Tensor) -> torch.Tensor:
    """fp32[out, in]: |W_ij| · sqrt(scaler_row_j) (fp32 |W|, correctly rounded sqrt, one multiply)."""
    return weight.abs().float() * sqrt_rn(scaler_row).unsqueeze(0)


def _smallest_k(s: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask of the k smallest entries of every row of ``s`` [R, C], ties by smaller column."""
    if k == 0:
        return torch.zeros_like(s, dtype=torch.bool)
    kth = s.kthvalue(k, dim=1, keepdim=True).values
    below = s < kth
    equal = s == kth
    room = k - below.sum(1, keepdim=True)
    return below | (equal & (equal.cumsum(1) <= room))


def select_mask(scores: torch.Tensor, sparsity: float | None = None, *, nm=None, per: str = "row") -> torch.Tensor:
    """bool[out, in], True = pruned: the k smallest scores (SPEC §2 rules)."""
    rows, cols = scores.shape
    s = scores.float()
    if nm is not None:
        n, m = nm
        return _smallest_k(s.reshape(-1, m), m - n).reshape(rows, cols)
    if per == "row":
        return _smallest_k(s, num_pruned(cols, sparsity))
    return _smallest_k(s.reshape(1, -1), num_pruned(s.numel(), sparsity)).reshape(rows, cols)


def prune_by_scores_(weight: torch.Tensor, scores: torch.Tensor, sparsity=None, *, nm=None, per="row") -> int:
    mask = select_mask(scores, sparsity, nm=nm, per=per)
    weight.masked_fill_(mask, 0)
    return int(mask.sum())


def wanda_mask(weight, scaler_row, sparsity=None, *, nm=None, per="row") -> torch.Tensor:
    return select_mask(wanda_scores(weight, scaler_row), sparsity, nm=nm, per=per)


def wanda_prune_(weight, scaler_row, sparsity=None, *, nm=None, per="row") -> int:
    return prune_by_scores_(weight, wanda_scores(weight, scaler_row), sparsity, nm=nm, per=per)


def check_nm_sparse(nonzero: torch.Tensor, n: int, m: int, name: str = "dense") -> None:
    """ValueError naming ``name`` and the first group of m columns with more than n non-zeros."""
    rows, cols = nonzero.shape
    over = nonzero.reshape(rows, cols // m, m).sum(-1) > n
    if bool(over.any()):
        flat = int(over.flatten().nonzero()[0])
        r, g = divmod(flat, cols // m)
        raise ValueError(
            f"{name} is not {n}:{m} sparse: row {r}, columns {g * m}..{g * m + m - 1} hold more than {n} non-zeros"
        )


def pack_24_cutlass(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [m, k/2], meta) in the CUTLASS layout of PyTorch's semi-structured sparse tensors."""
    check_nm_sparse(dense != 0, 2, 4)
    return sparse_semi_structured_from_dense_cutlass(dense)


def unpack_24_cutlass(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    return sparse_semi_structured_to_dense_cutlass(values, meta)


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)


def _pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, ceil(cols/8)], column c at byte c//8, bit c%8, least significant bit first."""
    rows, cols = keep.shape
    padded = torch.zeros(rows, (cols + 7) // 8 * 8, dtype=torch.int32, device=keep.device)
    padded[:, :cols] = keep.to(torch.int32)
    bits = padded.view(rows, -1, 8) * _BIT_WEIGHTS.to(keep.device)
    return bits.sum(-1).to(torch.uint8)


def _unpack_bits(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :cols].bool()


def _keep_mask(dense: torch.Tensor, nm) -> torch.Tensor:
    keep = dense != 0
    if nm is None:
        return keep
    n, m = nm
    rows, cols = dense.shape
    check_nm_sparse(keep, n, m)
    # Each group keeps its non-zeros, then its lowest-index zeros until exactly n are kept: the m - n
    # dropped are the smallest of (non-zero, reversed position) keys, i.e. the highest-index zeros.
    reversed_pos = torch.arange(m - 1, -1, -1, device=dense.device, dtype=torch.float32)
    key = keep.reshape(-1, m).float() * (2 * m) + reversed_pos
    return ~_smallest_k(key, m - n).reshape(rows, cols)


def pack_bitmask(dense: torch.Tensor, *, nm=None) -> BitmaskPacked:
    """compressed-tensors ``sparse-bitmask`` (nm=None) or ``sparse-24-bitmask``-style (nm) layout."""
    rows, cols = dense.shape
    keep = _keep_mask(dense, nm)
    values = dense[keep]
    if nm is not None:
        values = values.reshape(rows, cols // nm[1] * nm[0])
    counts = keep.sum(dim=1)
    return BitmaskPacked(values, _pack_bits(keep), torch.cumsum(counts, 0) - counts)


def unpack_bitmask(values: torch.Tensor, bitmask: torch.Tensor, shape) -> torch.Tensor:
    rows, cols = (int(s) for s in shape)
    keep = _unpack_bits(bitmask, cols)
    dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    dense[keep] = values.flatten()
    return dense
