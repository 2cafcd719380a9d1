"""Public op API of ecoflap_fast: argument validation and backend dispatch, no math.

Backends, by device of the inputs:
  CUDA: Triton kernels (``ecoflap_fast.kernels``) and the CUDA part of ``ecoflap_fast._C``
  CPU:  the C++ part of ``ecoflap_fast._C`` (multithreaded), else the pure-torch backend (``_torch_ops``)
Discrete outputs (masks, packed bytes) are identical on every backend. Bad input raises a
``ValueError``/``TypeError`` naming the argument and leaves every input unmodified.

Selection rules (SPEC §2): per row, prune the k = floor(in * sparsity) smallest scores; per matrix,
the floor(numel * sparsity) smallest; nm=(n, m) keeps the n largest of every m consecutive columns.
Ties: the smaller (flat) index is pruned first, i.e. the first k of a stable ascending sort.
"""

from __future__ import annotations

import math
import os

import torch

from . import _ext, _library, kernels
from . import _torch_ops as torch_backend
from ._torch_ops import BitmaskPacked

__all__ = [
    "ActNormAccumulator",
    "BitmaskPacked",
    "col_sq_norms",
    "pack_24_cutlass",
    "pack_bitmask",
    "prune_by_scores_",
    "select_mask",
    "unpack_24_cutlass",
    "unpack_bitmask",
    "wanda_mask",
    "wanda_prune_",
    "wanda_scores",
]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_CUTLASS_DTYPES = (torch.float16, torch.bfloat16, torch.int8)
_BITMASK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.float8_e4m3fn)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


_DEVICES = ("cpu", "cuda")


def _data_device(name: str, t: torch.Tensor) -> None:
    """Tensors with data on a device the backends serve: not meta tensors (no data), not mps/xpu/..."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (it has no data); materialise it before calling this op")
    if t.device.type not in _DEVICES:
        raise ValueError(f"{name} is on device {t.device}; the ops run on cpu and cuda tensors")


def _writable(name: str, t: torch.Tensor) -> None:
    """In-place ops write through autograd's back: a tensor autograd tracks (or a view of one) is refused."""
    base = t._base if t._base is not None else t
    if t.requires_grad or base.requires_grad:
        raise TypeError(
            f"{name} requires grad (or is a view of a tensor that does): pruning it in place would bypass autograd "
            f"and corrupt its gradients; prune {name}.detach() (or the parameter's .data) with no backward pending"
        )


def _bump_version(t: torch.Tensor) -> None:
    """Written in place by a kernel autograd does not see: a graph that saved ``t`` then fails loudly
    at backward ("modified by an inplace operation") instead of using the new values."""
    inc = getattr(getattr(torch.autograd, "graph", None), "increment_version", None)
    if inc is not None:
        inc(t)


def _matrix(name: str, t, dtypes) -> None:
    _tensor(name, t)
    _data_device(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def _finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listed}")


def _selection(width: int, sparsity, nm, per: str) -> tuple[float | None, tuple[int, int] | None]:
    if per not in ("row", "matrix"):
        raise ValueError(f"per must be 'row' or 'matrix', got {per!r}")
    if nm is not None:
        if not (isinstance(nm, (tuple, list)) and len(nm) == 2 and all(isinstance(v, int) for v in nm)):
            raise TypeError(f"nm must be a pair of ints (n, m), got {nm!r}")
        n, m = nm
        if not 1 <= n <= m <= 32:
            raise ValueError(f"nm must satisfy 1 <= n <= m <= 32, got {n}:{m}")
        if width % m:
            raise ValueError(f"nm={n}:{m} needs in_features ({width}) to be a multiple of {m}")
        if per != "row":
            raise ValueError("per='matrix' cannot be combined with nm (n:m groups are per row)")
        if sparsity is not None:
            _sparsity_value(sparsity)
            if not math.isclose(sparsity, 1 - n / m, abs_tol=1e-9):
                raise ValueError(f"sparsity={sparsity} contradicts nm={n}:{m} (which means {1 - n / m})")
        return None, (n, m)
    if sparsity is None:
        raise ValueError("sparsity is required unless nm is given")
    return _sparsity_value(sparsity), None


def _sparsity_value(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float, got {type(sparsity).__name__}")
    if not 0 <= sparsity < 1:  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def _scaler(scaler_row, weight: torch.Tensor) -> torch.Tensor:
    _tensor("scaler_row", scaler_row)
    if scaler_row.dim() != 1 or scaler_row.shape[0] != weight.shape[1]:
        raise ValueError(
            f"scaler_row must have shape ({weight.shape[1]},) to match weight {tuple(weight.shape)}, "
            f"got {tuple(scaler_row.shape)}"
        )
    if not scaler_row.is_floating_point():
        raise TypeError(f"scaler_row must be floating point, got {scaler_row.dtype}")
    _same_device(weight=weight, scaler_row=scaler_row)
    _finite("scaler_row", scaler_row)
    if bool((scaler_row < 0).any()):
        raise ValueError("scaler_row contains negative entries (it is a mean of squares)")
    return scaler_row.float().contiguous()


def _select_args(width: int, numel: int, sparsity, nm, per) -> tuple[int, int, int, bool]:
    """(k, n, m, per_matrix) as the C++ operators take them."""
    sparsity, nm = _selection(width, sparsity, nm, per)
    if nm is not None:
        return 0, nm[0], nm[1], False
    per_matrix = per == "matrix"
    return torch_backend.num_pruned(numel if per_matrix else width, sparsity), 0, 0, per_matrix


def _use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors go to the Triton kernels. ECOFLAP_TRITON_CPU=1 with TRITON_INTERPRET=1 sends CPU
    tensors there too (to test the GPU dispatch path on a machine without a GPU)."""
    if not kernels.AVAILABLE:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and kernels.INTERPRET and os.environ.get("ECOFLAP_TRITON_CPU") == "1"


def _triton_selects(t: torch.Tensor, m: int, per_matrix: bool) -> bool:
    return _use_triton(t) and (m != 0 or per_matrix or t.shape[1] <= kernels.MAX_ROW_WIDTH)


def _use_cpp(t: torch.Tensor) -> bool:
    """CPU tensors go to the C++ extension when it is loaded; CUDA tensors when it has CUDA kernels."""
    if t.device.type == "cpu":
        return _ext.is_available()
    return t.is_cuda and _ext.has_cuda_kernels()


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _in_place(weight: torch.Tensor, run) -> int:
    """Run an in-place kernel on ``weight``, through a contiguous copy when it is not contiguous."""
    if weight.is_contiguous():
        return int(run(weight))
    work = weight.contiguous()
    count = int(run(work))
    weight.copy_(work)
    return count


# ----------------------------------------------------------------------------------------------
# activation statistics
# ----------------------------------------------------------------------------------------------
def col_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """fp32[C]: Σ x² over every leading dim of ``x[..., C]`` (fp16/bf16/fp32), accumulated in fp32."""
    _tensor("x", x)
    _data_device("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if _use_triton(x):
        return _library.triton_col_sq_norms(x)
    return torch_backend.col_sq_norms(x)


class ActNormAccumulator:
    """Wanda's calibration statistic, one pass over each activation batch.

    ``add(x)``: ``x`` of shape ``[B, T, C]`` counts B samples, ``[T, C]`` counts one.
    ``scaler_row`` (fp32[C]) = (Σ_samples Σ_tokens x²) / nsamples, Wanda's running mean up to rounding.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.in_features = in_features
        self.nsamples = 0
        self._sum = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        _tensor("x", x)
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have shape [B, T, {self.in_features}] or [T, {self.in_features}], got {tuple(x.shape)}"
            )
        _same_device(x=x, accumulator=self._sum)
        self._sum += col_sq_norms(x)
        self.nsamples += 1 if x.dim() == 2 else x.shape[0]

    @property
    def scaler_row(self) -> torch.Tensor:
        if self.nsamples == 0:
            raise ValueError("ActNormAccumulator has no samples yet (call add first)")
        return self._sum / self.nsamples


# ----------------------------------------------------------------------------------------------
# scoring and selection
# ----------------------------------------------------------------------------------------------
def wanda_scores(weight: torch.Tensor, scaler_row: torch.Tensor) -> torch.Tensor:
    """fp32[out, in]: |W_ij| · sqrt(scaler_row_j). Diagnostic; the masks never materialise it."""
    _matrix("weight", weight, _FLOATS)
    scaler_row = _scaler(scaler_row, weight)
    _finite("weight", weight)
    if _use_triton(weight) and weight.stride(1) == 1:
        return _library.triton_scores(weight, scaler_row)
    return torch_backend.wanda_scores(weight, scaler_row)


def wanda_mask(weight, scaler_row, sparsity=None, *, nm=None, per="row") -> torch.Tensor:
    """bool[out, in], True = pruned, by Wanda's |W|·sqrt(scaler_row) score (SPEC §2 rules)."""
    _matrix("weight", weight, _FLOATS)
    k, n, m, per_matrix = _select_args(weight.shape[1], weight.numel(), sparsity, nm, per)
    scaler_row = _scaler(scaler_row, weight)
    if _triton_selects(weight, m, per_matrix):
        _finite("weight", weight)
        return _library.triton_select_mask(_unit_stride(weight), scaler_row, True, k, n, m, per_matrix)
    if weight.device.type == "cpu" and _ext.is_available():  # checks NaN/Inf itself, in the same parallel pass
        return _ext.ops().select_mask(weight, scaler_row, True, k, n, m, per_matrix)
    _finite("weight", weight)
    return torch_backend.wanda_mask(weight, scaler_row, sparsity, nm=nm, per=per)


def wanda_prune_(weight, scaler_row, sparsity=None, *, nm=None, per="row") -> int:
    """Zero the selected weights in place; returns how many positions were zeroed (the selection size).

    ``weight`` must not require grad (nor be a view of a tensor that does): pass ``.detach()`` or
    the parameter's ``.data``."""
    _matrix("weight", weight, _FLOATS)
    _writable("weight", weight)
    k, n, m, per_matrix = _select_args(weight.shape[1], weight.numel(), sparsity, nm, per)
    scaler_row = _scaler(scaler_row, weight)
    if _triton_selects(weight, m, per_matrix):
        _finite("weight", weight)
        count = _in_place(weight, lambda w: _library.triton_select_prune_(w, scaler_row, k, n, m, per_matrix))
    elif weight.device.type == "cpu" and _ext.is_available():  # checks NaN/Inf before writing anything
        count = _in_place(weight, lambda w: _ext.ops().select_prune_(w, scaler_row, k, n, m, per_matrix))
    else:
        _finite("weight", weight)
        count = torch_backend.wanda_prune_(weight, scaler_row, sparsity, nm=nm, per=per)
    _bump_version(weight)
    return count


def select_mask(scores: torch.Tensor, sparsity=None, *, nm=None, per="row") -> torch.Tensor:
    """bool mask of the k smallest of any score matrix (SparseGPT, RIA, magnitude, ...), SPEC §2 rules."""
    _matrix("scores", scores, _FLOATS)
    k, n, m, per_matrix = _select_args(scores.shape[1], scores.numel(), sparsity, nm, per)
    if _triton_selects(scores, m, per_matrix):
        _finite("scores", scores)
        return _library.triton_select_mask(_unit_stride(scores), None, False, k, n, m, per_matrix)
    if scores.device.type == "cpu" and _ext.is_available():
        return _ext.ops().select_mask(scores, None, False, k, n, m, per_matrix)
    _finite("scores", scores)
    return torch_backend.select_mask(scores, sparsity, nm=nm, per=per)


def prune_by_scores_(weight: torch.Tensor, scores: torch.Tensor, sparsity=None, *, nm=None, per="row") -> int:
    """Zero ``weight`` where ``select_mask(scores, ...)`` selects; returns how many positions were zeroed.
    ``weight`` must not require grad (nor be a view of a tensor that does)."""
    _matrix("weight", weight, _FLOATS)
    _writable("weight", weight)
    _tensor("scores", scores)
    if scores.shape != weight.shape:
        raise ValueError(f"scores has shape {tuple(scores.shape)}, weight has {tuple(weight.shape)}")
    _same_device(weight=weight, scores=scores)
    mask = select_mask(scores, sparsity, nm=nm, per=per)
    weight.masked_fill_(mask, 0)
    return int(mask.sum())


# ----------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------
def pack_24_cutlass(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values ``[m, k/2]``, meta) of a 2:4-sparse matrix in PyTorch's CUTLASS layout.

    fp16/bf16 → int16 meta ``[m, k/16]`` (m % 32 == 0, k % 32 == 0); int8 → int32 meta ``[m, k/32]``
    (m % 16 == 0, k % 64 == 0). Byte-identical to
    ``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``.
    A group of 4 columns with more than 2 non-zeros raises ValueError (nothing is dropped silently).
    """
    _matrix("dense", dense, _CUTLASS_DTYPES)
    rows_mult, cols_mult = (16, 64) if dense.dtype == torch.int8 else (32, 32)
    if dense.shape[0] % rows_mult or dense.shape[1] % cols_mult:
        raise ValueError(
            f"dense has shape {tuple(dense.shape)}; the CUTLASS 2:4 layout for {dense.dtype} needs rows a "
            f"multiple of {rows_mult} and columns a multiple of {cols_mult}"
        )
    if _use_cpp(dense):
        values, meta = _ext.ops().pack_24_cutlass(dense)
        return values, meta
    return torch_backend.pack_24_cutlass(dense)


def unpack_24_cutlass(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`pack_24_cutlass`."""
    _matrix("values", values, _CUTLASS_DTYPES)
    want = torch.int32 if values.dtype == torch.int8 else torch.int16
    _matrix("meta", meta, (want,))
    _same_device(values=values, meta=meta)
    per_meta = 16 if values.dtype == torch.int8 else 8
    if meta.shape[0] != values.shape[0] or meta.shape[1] * per_meta != values.shape[1]:
        raise ValueError(f"meta has shape {tuple(meta.shape)}, which does not describe values {tuple(values.shape)}")
    rows_mult = 16 if values.dtype == torch.int8 else 32
    if values.shape[0] % rows_mult or meta.shape[1] % 2:
        raise ValueError(
            f"values {tuple(values.shape)} / meta {tuple(meta.shape)} are not a CUTLASS 2:4 layout "
            f"(rows a multiple of {rows_mult}, an even number of meta columns)"
        )
    if _use_cpp(values):
        return _ext.ops().unpack_24_cutlass(values, meta)
    return torch_backend.unpack_24_cutlass(values, meta)


def pack_bitmask(dense: torch.Tensor, *, nm=None) -> BitmaskPacked:
    """compressed-tensors bitmask layout (SPEC §6): ``sparse-bitmask`` or, with nm, ``sparse-24-bitmask``.

    With nm=(n, m) every group of m columns keeps exactly n values (its non-zeros, then its
    lowest-index zeros), so ``values`` is ``[rows, cols*n/m]``; more than n non-zeros raises ValueError.
    """
    _matrix("dense", dense, _BITMASK_DTYPES)
    if nm is not None:
        _selection(dense.shape[1], None, nm, "row")
    if _use_cpp(dense):
        n, m = nm if nm is not None else (0, 0)
        return BitmaskPacked(*_ext.ops().pack_bitmask(dense, n, m))
    return torch_backend.pack_bitmask(dense, nm=nm)


def unpack_bitmask(values: torch.Tensor, bitmask: torch.Tensor, shape) -> torch.Tensor:
    """Exact inverse of :func:`pack_bitmask`: dense ``shape`` tensor of ``values.dtype``."""
    _tensor("values", values)
    _tensor("bitmask", bitmask)
    _data_device("values", values)
    if values.dtype not in _BITMASK_DTYPES:
        raise TypeError(f"values has unsupported dtype {values.dtype}")
    if bitmask.dtype != torch.uint8:
        raise TypeError(f"bitmask must be uint8, got {bitmask.dtype}")
    rows, cols = (int(s) for s in shape)
    if bitmask.dim() != 2 or tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise ValueError(
            f"bitmask has shape {tuple(bitmask.shape)}; shape {(rows, cols)} needs {(rows, (cols + 7) // 8)}"
        )
    _same_device(values=values, bitmask=bitmask)
    if _use_cpp(values):
        return _ext.ops().unpack_bitmask(values, bitmask, rows, cols)
    return torch_backend.unpack_bitmask(values, bitmask, (rows, cols))
