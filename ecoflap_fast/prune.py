"""The pruning driver: per-block sparsity allocation, then sequential layer-wise pruning (SPEC §3.3).

Stage 2 walks the blocks in forward order: the calibration inputs of block 0 are captured once;
for each block, its Linear layers' activation statistics are accumulated with
``ops.ActNormAccumulator`` (unpruned weights), every Linear is pruned at its block's sparsity with
the local pruner, and the inputs run through the pruned block become the next block's inputs.
Only one block's activations live at a time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import blocks as blocks_mod
from . import ops

PATTERNS = {"unstructured": None, "2:4": (2, 4), "4:8": (4, 8)}
PRUNERS = ("wanda", "magnitude", "sparsegpt")
ALLOCATORS = ("ecoflap-zo", "ecoflap-fo", "owl", "uniform")


@dataclass
class PruneConfig:
    sparsity: float = 0.5
    pattern: str = "unstructured"
    pruner: str = "wanda"
    allocator: str = "uniform"
    nsamples: int = 32
    seqlen: int = 128
    batch_size: int = 8
    seed: int = 0
    progress: bool = True
    sparsity_map: dict | None = field(default=None, repr=False)
    # stage 1 (ECoFLaP)
    max_sparsity: float | None = None  # m; default sparsity + 0.1
    zo_estimator: str = "grad"  # "grad" (one backward per batch) or "fd" (forward-only finite differences)
    eps: float = 1e-3
    group: str = "block"  # "block" or "tensor"
    group_reduce: str = "sum"  # "sum" or "avg"
    fo_metric: str = "wg"  # first order: |W|*g ("wg") or g ("g")
    # OWL
    owl_lambda: float = 0.08
    owl_m: float = 5.0

    @property
    def m(self) -> float:
        return self.max_sparsity if self.max_sparsity is not None else min(self.sparsity + 0.1, 0.99)

    def validate(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {sorted(PATTERNS)}, got {self.pattern!r}")
        nm = PATTERNS[self.pattern]
        if nm is not None:
            self.sparsity = 1 - nm[0] / nm[1]
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"pruner must be one of {PRUNERS}, got {self.pruner!r}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"allocator must be one of {ALLOCATORS}, got {self.allocator!r}")
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_sparsity is not None and not self.sparsity <= self.max_sparsity < 1:
            raise ValueError(f"max sparsity must be in [sparsity={self.sparsity}, 1), got {self.max_sparsity}")
        if self.zo_estimator not in ("grad", "fd"):
            raise ValueError(f"zo estimator must be 'grad' or 'fd', got {self.zo_estimator!r}")
        if self.group not in ("block", "tensor") or self.group_reduce not in ("sum", "avg"):
            raise ValueError(
                f"group must be block|tensor and group reduce sum|avg, got {self.group}/{self.group_reduce}"
            )
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")


class _Captured(Exception):
    def __init__(self, args, kwargs):
        self.args_, self.kwargs_ = args, kwargs


def model_batches(calibration, batch_size: int) -> list:
    """Calibration as a list of model-input dicts: token windows [n, T] are split into batches;
    a list of dicts (image-text batches) is used as it is."""
    if isinstance(calibration, torch.Tensor):
        return [{"input_ids": c} for c in calibration.split(batch_size)]
    return list(calibration)


def _call(model: nn.Module, inputs: dict):
    from .reference.stage1 import to_device

    kwargs = to_device(inputs, next(model.parameters()).device)
    if "pixel_values" not in kwargs:
        kwargs["use_cache"] = False
    return model(**kwargs)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, calibration, batch_size: int):
    """[(hidden_states, other positional args, kwargs)] per calibration batch, as ``first_block``
    receives them."""

    def grab(_module, args, kwargs):
        raise _Captured(args, kwargs)

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    captured = []
    try:
        for inputs in model_batches(calibration, batch_size):
            try:
                _call(model, inputs)
            except _Captured as c:
                kwargs = dict(c.kwargs_)
                if c.args_:
                    hidden, rest = c.args_[0], tuple(c.args_[1:])
                else:
                    hidden, rest = kwargs.pop("hidden_states"), ()
                captured.append((hidden, rest, kwargs))
            else:
                raise RuntimeError("the first transformer block was never called during the forward pass")
    finally:
        handle.remove()
    return captured


def _block_forward(block: nn.Module, inputs):
    out = []
    for hidden, rest, kwargs in inputs:
        y = block(hidden, *rest, **kwargs)
        out.append((y[0] if isinstance(y, (tuple, list)) else y, rest, kwargs))
    return out


def _prune_linear(lin: nn.Linear, acc, sparsity: float, config: PruneConfig) -> int:
    nm = PATTERNS[config.pattern]
    w = lin.weight.data
    kw = {"nm": nm} if nm is not None else {"sparsity": sparsity}
    if config.pruner == "wanda":
        return ops.wanda_prune_(w, acc.scaler_row, **kw)
    if config.pruner == "sparsegpt":
        from .reference.sparsegpt import sparsegpt_prune_

        return sparsegpt_prune_(w, acc.H, **kw)
    return ops.prune_by_scores_(w, w.abs(), **kw)  # magnitude


def measure_sparsity(model: nn.Module) -> tuple[float, dict[str, float]]:
    layers = blocks_mod.prunable(model)
    per = {name: float((lin.weight == 0).sum()) / lin.weight.numel() for name, lin in layers.items()}
    total = sum(lin.weight.numel() for lin in layers.values())
    zeros = sum(per[n] * layers[n].weight.numel() for n in layers)
    return zeros / total, per


def _group_of(name: str, group: str) -> str:
    return name if group == "tensor" else blocks_mod.block_of(name)


def _block_key(tower: blocks_mod.Tower, index: int) -> str:
    return f"{tower.path}.{index}"


@torch.no_grad()
def sequential_pass(
    model: nn.Module, calibration, config: PruneConfig, on_block, desc: str, stat=ops.ActNormAccumulator
) -> None:
    """Walk every tower's blocks in forward order with the captured calibration inputs: accumulate
    each Linear's input statistic ``stat(in_features, device)`` (weights as they are), call
    ``on_block(tower, index, block, accumulators)`` (which may prune), then run the inputs through the
    block for the next one. Each tower's inputs are captured after the towers before it were processed."""
    for tower in blocks_mod.find_towers(model):
        _sequential_tower(model, tower, calibration, config, on_block, f"{desc} ({tower.family})", stat)


def _sequential_tower(model, tower, calibration, config, on_block, desc, stat) -> None:
    inputs = capture_block_inputs(model, tower.blocks[0], calibration, config.batch_size)
    for i, block in enumerate(tqdm(tower.blocks, desc=desc, disable=not config.progress)):
        layers = blocks_mod.linears(block)
        accs = {name: stat(lin.in_features, lin.weight.device) for name, lin in layers.items()}
        hooks = [
            lin.register_forward_hook(lambda _m, inp, _out, a=accs[name]: a.add(inp[0].detach()))
            for name, lin in layers.items()
        ]
        try:
            _block_forward(block, inputs)
        finally:
            for h in hooks:
                h.remove()
        on_block(tower, i, block, accs)
        inputs = _block_forward(block, inputs)


def _check_layers(layers: dict, config: PruneConfig) -> None:
    nm = PATTERNS[config.pattern]
    if nm is not None:
        for name, lin in layers.items():
            if lin.in_features % nm[1]:
                raise ValueError(
                    f"pattern {config.pattern} needs in_features divisible by {nm[1]}; {name} has {lin.in_features}"
                )


def allocate(
    model: nn.Module,
    config: PruneConfig,
    calibration: torch.Tensor | None = None,
    stage1_batches: list[torch.Tensor] | None = None,
) -> tuple[dict[str, float], dict]:
    """Per-Linear sparsity (full module name -> sparsity) and what stage 1 measured."""
    from . import stage1
    from .allocate import ecoflap_allocation, owl_sparsities

    layers = blocks_mod.prunable(model)
    _check_layers(layers, config)
    if config.sparsity_map is not None:
        missing = sorted(set(layers) - set(config.sparsity_map))
        if missing:
            raise ValueError(f"sparsity map has no entry for {len(missing)} layers, first {missing[0]!r}")
        out = {n: float(config.sparsity_map[n]) for n in layers}
        bad = [n for n, v in out.items() if not 0 <= v < 1]
        if bad:
            raise ValueError(f"sparsity map entry {bad[0]!r} = {out[bad[0]]} is outside [0, 1)")
        return out, {"method": "sparsity map given"}
    uniform = {n: float(config.sparsity) for n in layers}
    if config.allocator == "uniform":
        return uniform, {"method": "uniform"}
    if PATTERNS[config.pattern] is not None:
        return uniform, {"method": f"uniform ({config.pattern} fixes every layer at {config.sparsity:g})"}
    if config.allocator == "owl":
        ratios: dict[str, float] = {}

        def outliers(tower, i, block, accs):
            scores = torch.cat(
                [
                    ops.wanda_scores(lin.weight.data, accs[n].scaler_row).flatten()
                    for n, lin in blocks_mod.linears(block).items()
                ]
            )
            ratios[_block_key(tower, i)] = float((scores > config.owl_m * scores.mean()).float().mean())

        sequential_pass(model, calibration, config, outliers, "OWL: outlier ratios")
        keys = list(ratios)
        per_block = dict(zip(keys, owl_sparsities([ratios[k] for k in keys], config.sparsity, config.owl_lambda)))
        return (
            {n: per_block[_group_of(n, "block")] for n in layers},
            {"method": f"OWL (M={config.owl_m}, lambda={config.owl_lambda})", "outlier_ratio": ratios},
        )
    method = "zo" if config.allocator == "ecoflap-zo" else "fo"
    res = stage1.tensor_scores(
        model,
        stage1_batches,
        method=method,
        estimator=config.zo_estimator,
        eps=config.eps,
        seed=config.seed,
        fo_metric=config.fo_metric,
        progress=config.progress,
    )
    groups: dict[str, list[str]] = {}
    for n in layers:
        groups.setdefault(_group_of(n, config.group), []).append(n)
    keys = list(groups)
    sizes = [sum(layers[n].weight.numel() for n in groups[g]) for g in keys]
    scores = [sum(res.tensor_scores[n] for n in groups[g]) for g in keys]
    if config.group_reduce == "avg":
        scores = [sc / sz for sc, sz in zip(scores, sizes)]
    alloc = ecoflap_allocation(sizes, scores, config.sparsity, config.m)
    per_group = dict(zip(keys, alloc.sparsity))
    info = {
        "method": f"ECoFLaP stage 1: {res.method}",
        "stage1_s": res.seconds,
        "max_sparsity": config.m,
        "group": config.group,
        "group_reduce": config.group_reduce,
        "group_scores": dict(zip(keys, scores)),
        "tensor_scores": res.tensor_scores,
        "fallback": alloc.fallback,
    }
    return {n: per_group[_group_of(n, config.group)] for n in layers}, info


@torch.no_grad()
def prune_(model: nn.Module, calibration, config: PruneConfig | None = None, stage1_calibration=None) -> dict:
    """Prune ``model`` in place; returns the report.

    ``calibration``: token windows ``[n, seqlen]`` (causal LMs) or a list of model-input dicts
    (CLIP-style image-text batches from ``data.clip_batches``). ``stage1_calibration`` (for the
    ECoFLaP scores) defaults to the first calibration windows / the same batches.
    """
    config = config or PruneConfig()
    config.validate()
    blocks_mod.find_towers(model)
    t0 = time.perf_counter()
    if stage1_calibration is None:
        stage1_calibration = calibration[:8] if isinstance(calibration, torch.Tensor) else calibration
    batches = model_batches(stage1_calibration, 4)
    sparsities, stage1_info = allocate(model, config, calibration, batches)
    t1 = time.perf_counter()

    def prune_block(tower, i, block, accs):
        for name, lin in blocks_mod.linears(block).items():
            _prune_linear(lin, accs[name], sparsities[f"{tower.path}.{i}.{name}"], config)

    # SparseGPT needs the inputs' Hessian; Wanda and magnitude the column norms.
    if config.pruner == "sparsegpt":
        from .reference.sparsegpt import HessianAccumulator as stat
    else:
        stat = ops.ActNormAccumulator
    sequential_pass(model, calibration, config, prune_block, "stage 2: prune blocks", stat)
    t2 = time.perf_counter()
    achieved, per_layer = measure_sparsity(model)
    return {
        "allocator": config.allocator,
        "pruner": config.pruner,
        "pattern": config.pattern,
        "target_sparsity": config.sparsity,
        "achieved_sparsity": achieved,
        "layer_sparsity": per_layer,
        "sparsity_map": sparsities,
        "stage1": stage1_info,
        "timings": {"stage1_s": t1 - t0, "stage2_s": t2 - t1},
        "seed": config.seed,
        "nsamples": config.nsamples,
        "seqlen": config.seqlen,
        "config": {k: v for k, v in asdict(config).items() if k != "sparsity_map"},
    }
