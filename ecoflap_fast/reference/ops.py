"""Pure-torch twins of every op in :mod:`ecoflap_fast.ops`.

Written for clarity, in fp32, with the same signatures as the public ops. They are the oracle of
the tests and benchmarks and the fallback when neither the C++ extension nor Triton is usable.
They assume validated input (``ecoflap_fast.ops`` validates before dispatching here).

Math (Sun et al., "A Simple and Effective Pruning Approach for LLMs", 2023, eq. 1):
    S_ij = |W_ij| * ||X_j||_2,   ||X_j||_2^2 estimated by ``scaler_row_j``.
Selection rule: the pruned entries are the first k of a stable ascending sort of the scores
(ties: the smaller index is pruned first), per row, per matrix, or per group of m columns.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from ecoflap_fast._torch_ops import BitmaskPacked  # the container type the ops return, not under test

__all__ = [
    "ActNormAccumulator",
    "BitmaskPacked",
    "check_nm_sparse",
    "col_sq_norms",
    "num_pruned",
    "pack_24_cutlass",
    "pack_bitmask",
    "prune_by_scores_",
    "select_mask",
    "sqrt_rn",
    "unpack_24_cutlass",
    "unpack_bitmask",
    "wanda_mask",
    "wanda_prune_",
    "wanda_scores",
]


def num_pruned(count: int, sparsity: float) -> int:
    """k = floor(count * sparsity), computed as Wanda does (``int(width * ratio)``)."""
    return int(count * sparsity)


def col_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """fp32[C]: sum of x**2 over every leading dim of ``x[..., C]``."""
    return x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0)


class ActNormAccumulator:
    """Wanda's running-mean activation statistic (``WrappedGPT.add_batch``), in fp32.

    ``x`` of shape ``[B, T, C]`` counts B samples, ``[T, C]`` counts one. After the calls,
    ``scaler_row = (sum over samples and tokens of x**2) / nsamples``.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self.scaler_row = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, x: torch.Tensor) -> None:
        batch = 1 if x.dim() == 2 else x.shape[0]
        self.scaler_row *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        inp = x.reshape(-1, x.shape[-1]).t().float()
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root of finite x >= 0, on any device.

    ``torch.sqrt`` of fp32 on the CPU is not correctly rounded (about 15% of inputs come out one ulp
    away), and one ulp decides ties between columns, so every backend takes its factors from here
    (the C++ path uses std::sqrt, which is correctly rounded). fp64 sqrt gives a float within one
    ulp; comparing x with the squares of the midpoints to both neighbours (exact in fp64: 25-bit
    midpoints, 50-bit squares) picks the float whose rounding interval holds sqrt(x).
    """
    x = x.float()
    r = torch.sqrt(x.double()).float()
    down = torch.nextafter(r, torch.zeros_like(r))
    up = torch.nextafter(r, torch.full_like(r, float("inf")))
    xd, rd = x.double(), r.double()
    lo = (rd + down.double()) / 2
    hi = (rd + up.double()) / 2
    return torch.where(xd < lo * lo, down, torch.where(xd > hi * hi, up, r))


def wanda_scores(weight: torch.Tensor, scaler_row: torch.Tensor) -> torch.Tensor:
    """fp32[out, in]: |W_ij| * sqrt(scaler_row_j) (fp32 |W|, correctly rounded sqrt, one multiply)."""
    return weight.abs().float() * sqrt_rn(scaler_row).reshape(1, -1)


def select_mask(scores: torch.Tensor, sparsity: float | None = None, *, nm=None, per: str = "row") -> torch.Tensor:
    """bool[out, in], True = pruned: the k smallest scores by a stable ascending sort."""
    rows, cols = scores.shape
    scores = scores.float()
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if nm is not None:
        n, m = nm
        groups = scores.reshape(rows, cols // m, m)
        idx = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]
        mask.view(rows, cols // m, m).scatter_(-1, idx, True)
    elif per == "row":
        k = num_pruned(cols, sparsity)
        idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, idx, True)
    else:
        k = num_pruned(scores.numel(), sparsity)
        idx = torch.sort(scores.flatten(), stable=True).indices[:k]
        mask.view(-1)[idx] = True
    return mask


def prune_by_scores_(weight: torch.Tensor, scores: torch.Tensor, sparsity=None, *, nm=None, per="row") -> int:
    """Zero ``weight`` where ``select_mask(scores, ...)`` is True; returns the number zeroed."""
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
    per_group = nonzero.reshape(rows, cols // m, m).sum(-1)
    bad = (per_group > n).nonzero()
    if len(bad):
        r, g = (int(v) for v in bad[0])
        raise ValueError(
            f"{name} is not {n}:{m} sparse: row {r}, columns {g * m}..{g * m + m - 1} hold more than {n} non-zeros"
        )


def pack_24_cutlass(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [m, k/2], meta) in the CUTLASS layout of PyTorch's semi-structured sparse tensors."""
    check_nm_sparse(dense != 0, 2, 4)
    return sparse_semi_structured_from_dense_cutlass(dense)


def unpack_24_cutlass(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    return sparse_semi_structured_to_dense_cutlass(values, meta)


def _keep_mask(dense: torch.Tensor, nm) -> torch.Tensor:
    keep = dense != 0
    if nm is None:
        return keep
    n, m = nm
    rows, cols = dense.shape
    check_nm_sparse(keep, n, m)
    g = keep.reshape(rows, cols // m, m)
    # Each group keeps its non-zeros and then its lowest-index zeros until exactly n are kept.
    room = n - g.sum(-1, keepdim=True)
    zero_rank = torch.cumsum(~g, dim=-1)
    return (g | (~g & (zero_rank <= room))).reshape(rows, cols)


def pack_bitmask(dense: torch.Tensor, *, nm=None) -> BitmaskPacked:
    """compressed-tensors ``sparse-bitmask`` (nm=None) or ``sparse-24-bitmask``-style (nm) layout."""
    rows, cols = dense.shape
    keep = _keep_mask(dense, nm)
    values = dense[keep]
    if nm is not None:
        values = values.reshape(rows, cols // nm[1] * nm[0])
    bitmask = torch.from_numpy(np.packbits(keep.cpu().numpy(), axis=-1, bitorder="little")).to(dense.device)
    counts = keep.sum(dim=1)
    return BitmaskPacked(values, bitmask.reshape(rows, (cols + 7) // 8), torch.cumsum(counts, 0) - counts)


def unpack_bitmask(values: torch.Tensor, bitmask: torch.Tensor, shape) -> torch.Tensor:
    rows, cols = (int(s) for s in shape)
    bits = np.unpackbits(bitmask.cpu().numpy(), axis=-1, count=cols, bitorder="little")
    keep = torch.from_numpy(bits.reshape(rows, cols).astype(bool)).to(values.device)
    dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    dense[keep] = values.flatten()
    return dense
