"""The usual torch implementations the engine is measured against (SPEC §5).

The sort-based Wanda path and compressed-tensors' bitmask packing are the reference twins
themselves (imported from ecoflap_fast.reference, not re-typed); the others are the common idioms
found in pruning code: a kthvalue threshold per row, and a Python loop over every group of m
columns for n:m masks, each written here once.
"""

from __future__ import annotations

import torch

from ecoflap_fast import reference as ref

# Wanda's reference path: fp32 scores, stable sort of every row (int64 indices), scatter, masked assign.
sort_prune_ = ref.wanda_prune_
# compressed-tensors' packing: `x != 0`, boolean indexing, numpy.packbits(bitorder="little").
bitmask_pack = ref.pack_bitmask


def kthvalue_prune_(weight: torch.Tensor, scaler_row: torch.Tensor, sparsity: float) -> int:
    """Threshold at each row's k-th smallest score (ties beyond k are pruned too: not exact)."""
    scores = ref.wanda_scores(weight, scaler_row)
    k = ref.num_pruned(weight.shape[1], sparsity)
    if k == 0:
        return 0
    thr = scores.kthvalue(k, dim=1, keepdim=True).values
    mask = scores <= thr
    weight[mask] = 0
    return int(mask.sum())


def slice_loop_nm_prune_(weight: torch.Tensor, scaler_row: torch.Tensor, n: int, m: int) -> int:
    """n:m mask by a loop over every group of m columns (one topk launch per group)."""
    scores = ref.wanda_scores(weight, scaler_row)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for col in range(0, scores.shape[1], m):
        block = scores[:, col : col + m]
        mask.scatter_(1, col + torch.topk(block, m - n, dim=1, largest=False)[1], True)
    weight[mask] = 0
    return int(mask.sum())


def wanda_act_norm(x: torch.Tensor) -> torch.Tensor:
    """Wanda's statistic of one batch: fp32 copy of x, then the squared column norm."""
    inp = x.reshape(-1, x.shape[-1]).t().float()
    return torch.norm(inp, p=2, dim=1) ** 2


def torch_cutlass_pack(dense: torch.Tensor):
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    return sparse_semi_structured_from_dense_cutlass(dense)
