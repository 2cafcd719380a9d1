"""torch.library registrations: fake (meta) implementations of the C++ operators, and the Triton
kernels as custom operators, so every op traces under torch.compile and passes opcheck."""

from __future__ import annotations

from typing import Optional

import torch

_done = {"cpp": False}


def _selection_size(rows: int, cols: int, k: int, n: int, m: int, per_matrix: bool) -> int:
    if m:
        return rows * (cols // m) * (m - n)
    return k if per_matrix else rows * k


def register_cpp_fakes() -> None:
    """Called once the extension has loaded and defined the ecoflap_fast:: schemas."""
    if _done["cpp"]:
        return
    _done["cpp"] = True

    @torch.library.register_fake("ecoflap_fast::pack_24_cutlass")
    def _(dense):
        m, k = dense.shape
        int8 = dense.dtype == torch.int8
        meta_cols = k // (32 if int8 else 16)
        return dense.new_empty(m, k // 2), dense.new_empty(m, meta_cols, dtype=torch.int32 if int8 else torch.int16)

    @torch.library.register_fake("ecoflap_fast::unpack_24_cutlass")
    def _(values, meta):
        return values.new_empty(values.shape[0], values.shape[1] * 2)

    @torch.library.register_fake("ecoflap_fast::pack_bitmask")
    def _(dense, n, m):
        rows, cols = dense.shape
        if m == 0:
            nnz = torch.library.get_ctx().new_dynamic_size()
            values = dense.new_empty(nnz)
        else:
            values = dense.new_empty(rows, cols // m * n)
        return (
            values,
            dense.new_empty(rows, (cols + 7) // 8, dtype=torch.uint8),
            dense.new_empty(rows, dtype=torch.int64),
        )

    @torch.library.register_fake("ecoflap_fast::unpack_bitmask")
    def _(values, bitmask, rows, cols):
        return values.new_empty(rows, cols)

    @torch.library.register_fake("ecoflap_fast::select_mask")
    def _(scores, scaler_row, use_abs, k, n, m, per_matrix):
        return scores.new_empty(scores.shape, dtype=torch.bool)

    @torch.library.register_fake("ecoflap_fast::select_prune_")
    def _(weight, scaler_row, k, n, m, per_matrix):
        return _selection_size(weight.shape[0], weight.shape[1], k, n, m, per_matrix)


# ---- Triton kernels as custom operators ------------------------------------------------------
@torch.library.custom_op("ecoflap_fast::triton_select_mask", mutates_args=())
def triton_select_mask(
    scores: torch.Tensor, scaler_row: Optional[torch.Tensor], use_abs: bool, k: int, n: int, m: int, per_matrix: bool
) -> torch.Tensor:
    from .kernels import select

    return select.select(scores, scaler_row, k=k, nm=(n, m) if m else None, use_abs=use_abs, per_matrix=per_matrix)


@triton_select_mask.register_fake
def _(scores, scaler_row, use_abs, k, n, m, per_matrix):
    return scores.new_empty(scores.shape, dtype=torch.bool)


@torch.library.custom_op("ecoflap_fast::triton_select_prune_", mutates_args=("weight",))
def triton_select_prune_(
    weight: torch.Tensor, scaler_row: Optional[torch.Tensor], k: int, n: int, m: int, per_matrix: bool
) -> int:
    from .kernels import select

    return select.select(
        weight, scaler_row, k=k, nm=(n, m) if m else None, use_abs=True, per_matrix=per_matrix, prune_into=weight
    )


@triton_select_prune_.register_fake
def _(weight, scaler_row, k, n, m, per_matrix):
    return _selection_size(weight.shape[0], weight.shape[1], k, n, m, per_matrix)


@torch.library.custom_op("ecoflap_fast::triton_scores", mutates_args=())
def triton_scores(weight: torch.Tensor, scaler_row: torch.Tensor) -> torch.Tensor:
    from .kernels import select

    return select.scores(weight, scaler_row, use_abs=True)


@triton_scores.register_fake
def _(weight, scaler_row):
    return weight.new_empty(weight.shape, dtype=torch.float32)


@torch.library.custom_op("ecoflap_fast::triton_col_sq_norms", mutates_args=())
def triton_col_sq_norms(x: torch.Tensor) -> torch.Tensor:
    from .kernels import act_norm

    return act_norm.col_sq_norms(x)


@triton_col_sq_norms.register_fake
def _(x):
    return x.new_empty(x.shape[-1], dtype=torch.float32)
