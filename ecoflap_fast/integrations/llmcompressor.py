"""llm-compressor's Wanda and SparseGPT modifiers, selecting masks with ecoflap_fast's ops.

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from ecoflap_fast.integrations import llmcompressor as ecoflap_backend

    with ecoflap_backend.backend():  # or ecoflap_backend.enable() ... ecoflap_backend.disable()
        oneshot(model=model, dataset=calibration, recipe=WandaPruningModifier(sparsity=0.5, mask_structure="2:4"))

What runs on this engine, and what stays bit-identical:

* Wanda's mask (``sparsify_weight``): llm-compressor scores ``|W|·torch.sqrt(S)`` in fp32, sorts every
  row (unstructured) or loops over every group of m columns calling ``topk`` (n:m), then scatters and
  assigns. Here one fused select-and-prune op does it on the same fp32 score (the op's correctly
  rounded root is fed ``torch.sqrt(S)²``, whose root is ``torch.sqrt(S)`` bit for bit, since torch's
  CPU sqrt is not always correctly rounded), with the same count ``int(columns · sparsity)`` and the
  stable sort's tie rule (lowest column pruned first): the pruned weights are identical. One
  difference: within an n:m group, ``torch.topk`` leaves ties unspecified (on the CPU it takes the
  highest columns); this engine takes the lowest. Ties among zero scores of
  zero weights give the same weights either way; only a group whose equal scores belong to different
  non-zero weights (a column whose inputs were all zero) can differ.
* SparseGPT's unstructured mask: each column block's threshold ``sort(scores.flatten())[0][k]`` is
  found with the engine's whole-matrix selection instead of a full sort (the same value, so the same
  mask). The 2:4 selection inside SparseGPT's column loop and its Hessian stay llm-compressor's: they
  run interleaved with the weight updates, one small group at a time.
* Wanda's activation statistic, only with ``statistics="fused"``: ``col_sq_norms`` accumulates Σx²
  in one pass (no fp32 copy of the activations, no norm-then-square). The values match
  llm-compressor's to a few units in the last place, not bit for bit, so near-tied mask entries can
  flip. The default, ``statistics="exact"``, keeps llm-compressor's own statistic.

Only ``torch.nn.Linear`` and ``transformers.Conv1D`` layers with fp32/fp16/bf16 weights take the
fast path; any other layer (Conv2d, an n:m width that is not a multiple of m) runs llm-compressor's
own code. NaN or Inf in a weight or statistic raises ``ValueError`` instead of pruning by a
meaningless order.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from .. import ops
from .._torch_ops import sqrt_rn

SUPPORTED = "llmcompressor 0.14"
STATISTICS = ("exact", "fused")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

_lock = threading.Lock()
_state: dict = {"depth": 0, "originals": {}, "statistics": None, "calls": {}}


def _modules():
    try:
        from llmcompressor.modifiers.pruning.sparsegpt import sgpt_sparsify
        from llmcompressor.modifiers.pruning.wanda import base as wanda_base
    except ImportError as e:
        raise ImportError(f"the llm-compressor backend needs llmcompressor installed ({SUPPORTED}): {e}") from e
    for module, names in ((wanda_base, ("sparsify_weight", "accumulate_row_scalars")), (sgpt_sparsify, ("torch",))):
        missing = [n for n in names if not hasattr(module, n)]
        if missing:
            import llmcompressor

            raise RuntimeError(
                f"llmcompressor {getattr(llmcompressor, '__version__', '?')} has no {module.__name__}.{missing[0]}; "
                f"the ecoflap_fast backend supports {SUPPORTED}"
            )
    return wanda_base, sgpt_sparsify


def calls() -> dict[str, int]:
    """How many layers each replaced function handled since ``enable`` (fast path / fallback)."""
    return dict(_state["calls"])


def _count(key: str) -> None:
    _state["calls"][key] = _state["calls"].get(key, 0) + 1


def _weight_view(module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
    """The [out, in] matrix llm-compressor scores, as a view of ``weight``; None when not handled."""
    import transformers

    if weight.dtype not in _FLOATS or weight.dim() != 2:
        return None
    if isinstance(module, transformers.Conv1D):
        return weight.t()
    if isinstance(module, torch.nn.Linear):
        return weight
    return None


def _wanda_sparsify_weight(module, row_scalars_dict, sparsity, prune_n, prune_m):
    """llm-compressor's Wanda ``sparsify_weight`` contract: returns the pruned weight (shape and dtype
    of ``module.weight``) and consumes ``row_scalars_dict[module]``."""
    original = _state["originals"]["wanda_sparsify_weight"]
    pruned = module.weight.data.clone()
    view = _weight_view(module, pruned)
    nm = (prune_m - prune_n, prune_m) if prune_n else None  # llm-compressor's N:M prunes N of every M
    if view is None or (nm is not None and (nm[0] < 1 or view.shape[1] % prune_m)):
        _count("wanda_sparsify_weight: llm-compressor")
        return original(module, row_scalars_dict, sparsity, prune_n, prune_m)
    scaler = _scaler_for_torch_sqrt(row_scalars_dict[module].to(device=pruned.device))
    if scaler is None:
        _count("wanda_sparsify_weight: llm-compressor")
        return original(module, row_scalars_dict, sparsity, prune_n, prune_m)
    if nm is None:
        ops.wanda_prune_(view, scaler, float(sparsity))
    else:
        mask = ops.wanda_mask(view, scaler, nm=nm)
        _follow_topk_on_ties_(mask, view, scaler, prune_n, prune_m)
        view.masked_fill_(mask, 0)
    del row_scalars_dict[module]  # as llm-compressor does: the statistic is consumed
    _count("wanda_sparsify_weight: ecoflap_fast")
    return pruned


def _follow_topk_on_ties_(mask: torch.Tensor, weight: torch.Tensor, scaler: torch.Tensor, prune_n: int, m: int):
    """Re-decide, with llm-compressor's own ``torch.topk``, the groups whose cut falls between equal
    scores. The engine breaks such ties by position (lowest column pruned first); ``torch.topk``
    leaves them to its implementation (the CPU one takes the highest columns). On weights with few
    distinct magnitudes (dequantized checkpoints) two columns of a group do tie: one such group in a
    576x1536 layer of the default model. Finding them costs one fp32 score pass and two reductions."""
    rows, cols = weight.shape
    scores = (weight.abs().float() * sqrt_rn(scaler)).view(rows, cols // m, m)  # llm-compressor's metric
    pruned = mask.view(rows, cols // m, m)
    highest_pruned = torch.where(pruned, scores, float("-inf")).amax(dim=-1)
    lowest_kept = torch.where(pruned, float("inf"), scores).amin(dim=-1)
    tied = highest_pruned == lowest_kept
    if bool(tied.any()):
        r, g = tied.nonzero(as_tuple=True)
        idx = torch.topk(scores[r, g], prune_n, dim=1, largest=False)[1]
        pruned[r, g] = torch.zeros(len(r), m, dtype=torch.bool, device=mask.device).scatter_(1, idx, True)
        key = "tied n:m groups given to torch.topk"
        _state["calls"][key] = _state["calls"].get(key, 0) + len(r)


def _scaler_for_torch_sqrt(s: torch.Tensor) -> torch.Tensor | None:
    """A scaler whose correctly rounded square root (what the engine's ops take) is, bit for bit,
    ``torch.sqrt(s)``: llm-compressor's factor, which on the CPU is not always correctly rounded.
    fl(f·f) has f as its correctly rounded root (binary floating point, round to nearest), checked
    here; None (llm-compressor's own path) where under- or overflow breaks that."""
    if not bool(torch.isfinite(s).all()):
        return s  # the op names the NaN / Inf
    factor = torch.sqrt(s.float())
    squared = factor * factor
    if not bool(torch.isfinite(squared).all()) or not torch.equal(sqrt_rn(squared), factor):
        return None
    return squared


def _fused_accumulate_row_scalars(inp, module, row_scalars, num_samples):
    """llm-compressor's running mean of ‖x‖² per input column, with Σx² from ``ops.col_sq_norms``."""
    import transformers

    original = _state["originals"]["wanda_accumulate_row_scalars"]
    if not isinstance(module, (torch.nn.Linear, transformers.Conv1D)) or inp.dtype not in _FLOATS or inp.dim() < 2:
        _count("accumulate_row_scalars: llm-compressor")
        return original(inp, module, row_scalars, num_samples)
    inp = inp.to(device=row_scalars.device)
    added = 1 if inp.dim() == 2 else inp.shape[0]  # dataset samples, as llm-compressor counts them
    row_scalars *= num_samples / (num_samples + added)
    num_samples += added
    row_scalars += ops.col_sq_norms(inp) / num_samples
    _count("accumulate_row_scalars: ecoflap_fast")
    return row_scalars, num_samples


def kth_smallest(values: torch.Tensor, index: int) -> torch.Tensor:
    """``torch.sort(values.flatten())[0][index]`` without the sort: 0-dim tensor of values' dtype."""
    flat = values.reshape(1, -1)
    n = flat.shape[1]
    if index < 0:
        index += n
    if not 0 <= index < n:
        raise IndexError(f"index {index} is out of range for {n} values")
    if flat.dtype not in _FLOATS:
        return torch.sort(flat[0])[0][index]
    # the index+1 smallest, ties by position; their largest is the sorted value at ``index``
    mask = ops.select_mask(flat, (index + 1) / n + 0.5 / n, per="matrix") if index + 1 < n else None
    if mask is None:
        return flat.max()
    return flat[mask].max()


class _SortedValues:
    def __init__(self, values: torch.Tensor):
        self._values = values

    def __getitem__(self, index):
        if isinstance(index, int) and self._values.dim() == 1:
            _count("sparsegpt threshold: ecoflap_fast")
            return kth_smallest(self._values, index)
        return torch.sort(self._values)[0][index]


class _SortResult:
    """What ``torch.sort(x)`` returns, with ``[0][i]`` answered by a selection instead of a sort."""

    def __init__(self, values: torch.Tensor):
        self._values = values

    def __getitem__(self, item):
        if item == 0:
            return _SortedValues(self._values)
        return torch.sort(self._values)[item]

    def __iter__(self):
        return iter(torch.sort(self._values))


class _SparseGPTTorch:
    """The ``torch`` that llm-compressor's SparseGPT module sees: everything is torch's, except that a
    one-argument ``sort`` of a 1-D float tensor (its threshold idiom) answers ``[0][i]`` by selection."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def sort(input, *args, **kwargs):
        if not args and not kwargs and isinstance(input, torch.Tensor) and input.dim() == 1:
            return _SortResult(input)
        return torch.sort(input, *args, **kwargs)


def enable(statistics: str = "exact") -> None:
    """Route llm-compressor's Wanda and SparseGPT mask selection (and, with ``statistics="fused"``,
    Wanda's activation statistic) through this engine, until ``disable``. Nested calls count."""
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}")
    wanda_base, sgpt_sparsify = _modules()
    with _lock:
        if _state["depth"]:
            if statistics != _state["statistics"]:
                raise RuntimeError(f"the backend is already enabled with statistics={_state['statistics']!r}")
            _state["depth"] += 1
            return
        originals = {
            "wanda_sparsify_weight": wanda_base.sparsify_weight,
            "wanda_accumulate_row_scalars": wanda_base.accumulate_row_scalars,
            "sgpt_torch": sgpt_sparsify.torch,
        }
        _state.update(depth=1, originals=originals, statistics=statistics, calls={})
        wanda_base.sparsify_weight = _wanda_sparsify_weight
        if statistics == "fused":
            wanda_base.accumulate_row_scalars = _fused_accumulate_row_scalars
        sgpt_sparsify.torch = _SparseGPTTorch()


def disable() -> None:
    """Undo one ``enable``; the last one puts llm-compressor's own functions back."""
    wanda_base, sgpt_sparsify = _modules()
    with _lock:
        if not _state["depth"]:
            return
        _state["depth"] -= 1
        if _state["depth"]:
            return
        o = _state["originals"]
        wanda_base.sparsify_weight = o["wanda_sparsify_weight"]
        wanda_base.accumulate_row_scalars = o["wanda_accumulate_row_scalars"]
        sgpt_sparsify.torch = o["sgpt_torch"]
        _state["statistics"] = None


def is_enabled() -> bool:
    return _state["depth"] > 0


@contextlib.contextmanager
def backend(statistics: str = "exact"):
    """``with backend(): oneshot(...)``: ``enable`` for the block, ``disable`` after it (also on error)."""
    enable(statistics)
    try:
        yield
    finally:
        disable()
