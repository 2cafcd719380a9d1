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
PRUNERS = ("wanda", "magnitude")
ALLOCATORS = ("uniform",)


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


class _Captured(Exception):
    def __init__(self, args, kwargs):
        self.args_, self.kwargs_ = args, kwargs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, calibration: torch.Tensor, batch_size: int):
    """[(hidden_states, kwargs)] per calibration chunk, as block 0 of the model receives them."""
    def grab(_module, args, kwargs):
        raise _Captured(args, kwargs)

    device = next(model.parameters()).device
    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    captured = []
    try:
        for chunk in calibration.split(batch_size):
            try:
                model(chunk.to(device), use_cache=False)
            except _Captured as c:
                kwargs = dict(c.kwargs_)
                hidden = c.args_[0] if c.args_ else kwargs.pop("hidden_states")
                captured.append((hidden, kwargs))
            else:
                raise RuntimeError("the first transformer block was never called during the forward pass")
    finally:
        handle.remove()
    return captured


def _block_forward(block: nn.Module, inputs):
    out = []
    for hidden, kwargs in inputs:
        y = block(hidden, **kwargs)
        out.append((y[0] if isinstance(y, (tuple, list)) else y, kwargs))
    return out


def _prune_linear(lin: nn.Linear, acc: ops.ActNormAccumulator, sparsity: float, config: PruneConfig) -> int:
    nm = PATTERNS[config.pattern]
    w = lin.weight.data
    kw = {"nm": nm} if nm is not None else {"sparsity": sparsity}
    if config.pruner == "wanda":
        return ops.wanda_prune_(w, acc.scaler_row, **kw)
    return ops.prune_by_scores_(w, w.abs(), **kw)  # magnitude


def measure_sparsity(model: nn.Module) -> tuple[float, dict[str, float]]:
    layers = blocks_mod.prunable(model)
    per = {name: float((lin.weight == 0).sum()) / lin.weight.numel() for name, lin in layers.items()}
    total = sum(lin.weight.numel() for lin in layers.values())
    zeros = sum(per[n] * layers[n].weight.numel() for n in layers)
    return zeros / total, per


def allocate(model: nn.Module, config: PruneConfig) -> dict[str, float]:
    """Per-Linear sparsity (full module name -> sparsity)."""
    layers = blocks_mod.prunable(model)
    nm = PATTERNS[config.pattern]
    if nm is not None:
        for name, lin in layers.items():
            if lin.in_features % nm[1]:
                raise ValueError(f"pattern {config.pattern} needs in_features divisible by {nm[1]}; "
                                 f"{name} has {lin.in_features}")
    if config.sparsity_map is not None:
        missing = sorted(set(layers) - set(config.sparsity_map))
        if missing:
            raise ValueError(f"sparsity map has no entry for {len(missing)} layers, first {missing[0]!r}")
        out = {n: float(config.sparsity_map[n]) for n in layers}
        bad = [n for n, v in out.items() if not 0 <= v < 1]
        if bad:
            raise ValueError(f"sparsity map entry {bad[0]!r} = {out[bad[0]]} is outside [0, 1)")
        return out
    return {n: float(config.sparsity) for n in layers}


@torch.no_grad()
def prune_(model: nn.Module, calibration: torch.Tensor, config: PruneConfig | None = None) -> dict:
    """Prune ``model`` in place with calibration token windows ``[n, seqlen]``; returns the report."""
    config = config or PruneConfig()
    config.validate()
    towers = blocks_mod.find_towers(model)
    if any(t.family.startswith("clip") for t in towers):
        raise NotImplementedError("CLIP pruning is not available yet in this driver")
    t0 = time.perf_counter()
    sparsities = allocate(model, config)
    t1 = time.perf_counter()
    tower = towers[0]
    inputs = capture_block_inputs(model, tower.blocks[0], calibration, config.batch_size)
    for i, block in enumerate(tqdm(tower.blocks, desc="stage 2: prune blocks", disable=not config.progress)):
        layers = blocks_mod.linears(block)
        accs = {name: ops.ActNormAccumulator(lin.in_features, lin.weight.device) for name, lin in layers.items()}
        hooks = [lin.register_forward_hook(lambda _m, inp, _out, a=accs[name]: a.add(inp[0].detach()))
                 for name, lin in layers.items()]
        try:
            _block_forward(block, inputs)
        finally:
            for h in hooks:
                h.remove()
        for name, lin in layers.items():
            _prune_linear(lin, accs[name], sparsities[f"{tower.path}.{i}.{name}"], config)
        inputs = _block_forward(block, inputs)
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
        "timings": {"stage1_s": t1 - t0, "stage2_s": t2 - t1},
        "seed": config.seed,
        "nsamples": config.nsamples,
        "seqlen": config.seqlen,
        "config": {k: v for k, v in asdict(config).items() if k != "sparsity_map"},
    }
