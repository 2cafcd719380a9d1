"""Column sums of squares Σ x² over every leading dim of ``x[..., C]``, in fp32, one read of x.

Grid: (column blocks, row splits). Each program walks its rows BLOCK_R at a time, squares in fp32
in registers (no fp32 copy of x is ever written) and stores one partial sum per column; the
partials of the row splits are added in a fixed order, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launch


@triton.jit
def _col_sq_norms_kernel(
    x_ptr, part_ptr, n_rows, n_cols, x_row_stride, rows_per_split, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    r0 = split.to(tl.int64) * rows_per_split
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for start in range(0, rows_per_split, BLOCK_R):
        rows = r0 + start + tl.arange(0, BLOCK_R)
        m = (rows[:, None] < n_rows) & (rows[:, None] < r0 + rows_per_split) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(part_ptr + split * n_cols + cols, tl.sum(acc, axis=0), mask=cols < n_cols)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D [rows, C] view with unit column stride (row stride may exceed C), copying only if needed."""
    c = x.shape[-1]
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    try:
        return x.view(-1, c) if x.stride(-1) == 1 else x.contiguous().view(-1, c)
    except RuntimeError:
        return x.contiguous().view(-1, c)  # same dtype: never an fp32 copy


def col_sq_norms_launch(x2: torch.Tensor) -> tuple[Launch, torch.Tensor]:
    """The launch for ``x2`` [rows, C] (unit column stride) and the fp32 [splits, C] partials it
    writes (allocated here, on ``x2``'s device).

    Tiles of 32 rows x up to 128 columns; enough row splits to fill the device (about 1024 programs
    in all), each with at least 4 tiles of rows. bytes_per_element (per activation element): x read
    once at its width + the fp32 partials (4 * splits / rows); passes: 1 (the column sum of the
    accumulator tile at the end)."""
    rows, cols = x2.shape
    block_c = min(128, triton.next_power_of_2(max(cols, 16)))
    block_r = 32
    col_blocks = triton.cdiv(cols, block_c)
    splits = max(1, min(triton.cdiv(rows, 4 * block_r), max(1, 1024 // col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_r) * block_r
    splits = triton.cdiv(rows, rows_per_split) if rows else 1
    part = torch.empty(splits, cols, dtype=torch.float32, device=x2.device)
    launch = Launch(
        _col_sq_norms_kernel,
        (col_blocks, splits),
        (x2, part, rows, cols, x2.stride(0), rows_per_split),
        dict(BLOCK_R=block_r, BLOCK_C=block_c),
        num_warps=4,
        bytes_per_element=x2.element_size() + 4 * splits / max(rows, 1),
        tile_bytes=block_r * block_c * x2.element_size(),
        passes=1,
    )
    return launch, part


def col_sq_norms(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32[C] of Σ x²; adds into ``out`` (fp32[C]) when given."""
    launch, part = col_sq_norms_launch(_as_rows(x))
    launch()
    total = part.sum(0)
    if out is None:
        return total
    out += total
    return out
