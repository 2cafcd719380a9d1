"""Depth pruning: remove whole blocks of a decoder (SPEC §9), a client of the walk.

Block scorers (lower score = removed first):
  iterative  the calibration loss of the model without the block; the block whose removal raises
             it least goes, then the remaining blocks are scored again, K times. Each candidate costs
             only the blocks after it: the inputs of every kept block are cached per batch, and the
             model's own forward starts at the candidate with the candidate itself skipped.
  bi         Block Influence, one shot on the dense model: 1 - cos(block input, block output),
             averaged over tokens (ShortGPT).
  ecoflap    one shot from ECoFLaP's stage 1: the sum of the zeroth-order scores of a block's matrices.

Removing blocks touches no other weight. The model that results is a real, smaller Hugging Face
model: the block list is rebuilt without the removed blocks, the config's layer count and every
per-layer list (``layer_types``, ...) are trimmed, index-valued fields (``mlp_only_layers``,
``first_k_dense_replace``, ``decoder_sparse_step``) are rewritten for the kept layers, and every
``layer_idx`` is renumbered. Before anything changes, a model built from the trimmed config (on the
meta device) must have exactly the state-dict keys and shapes of the trimmed model; otherwise the
class is refused and nothing changes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import objectives, stage1, walk

SCORERS = ("iterative", "bi", "ecoflap")


@dataclass
class DepthConfig:
    remove: float = 0  # a count of blocks (>= 1), or a fraction of them (0 < remove < 1)
    scorer: str = "iterative"
    seed: int = 0
    progress: bool = True


def block_count(remove, n_blocks: int) -> int:
    """K from ``--remove-blocks``: an integer count, or a fraction of the blocks (rounded)."""
    if isinstance(remove, bool) or not isinstance(remove, (int, float)) or not math.isfinite(remove) or remove < 0:
        raise ValueError(f"--remove-blocks must be a count >= 0 or a fraction in (0, 1), got {remove!r}")
    if 0 < remove < 1:
        k = round(remove * n_blocks)
    elif float(remove).is_integer():
        k = int(remove)
    else:
        raise ValueError(f"--remove-blocks must be a whole number of blocks or a fraction in (0, 1), got {remove}")
    if k >= n_blocks:
        raise ValueError(
            f"--remove-blocks {remove} would remove {k} of the model's {n_blocks} blocks; keep at least one"
        )
    return k


def check_supported(model, plan: walk.Plan, objective: objectives.Objective) -> walk.Stack:
    """The one stack of a decoder-only language model; ValueError for anything else."""
    if objective.kind != "causal-lm" or len(plan.stacks) != 1:
        towers = ", ".join(s.path for s in plan.stacks)
        raise ValueError(
            f"depth pruning supports decoder-only language models for now; {plan.model_class} is {objective.kind} "
            f"with stacks {towers}"
        )
    return plan.stacks[0]


def _kept_inputs(model, stack: walk.Stack, objective, batch: dict, removed: set[int]):
    """({kept block: its input hidden states}, the last block's output) of the model with ``removed``
    taken out, for one batch."""
    (inp,) = walk.capture(model, stack, [objective.inputs(batch)])
    out = {}
    for b in stack.blocks:
        if b.index in removed:
            continue
        out[b.index] = inp.hidden
        inp.hidden = walk.run_block(b, inp)
    return out, inp.hidden


@torch.no_grad()
def losses_without(model, stack: walk.Stack, objective, prepared: list[dict], removed: set[int]) -> dict[int, float]:
    """Mean calibration loss of the model without ``removed`` and without each further kept block."""
    skip_removed = [b for b in stack.blocks if b.index in removed]
    totals = {b.index: 0.0 for b in stack.blocks if b.index not in removed}
    with walk.skipped(skip_removed):
        for batch in prepared:
            inputs, _ = _kept_inputs(model, stack, objective, batch, removed)
            for j, hidden in inputs.items():
                block = stack.blocks[j]
                with walk.skipped([block]), walk.starting_at(block, hidden):
                    out = walk.forward(model, objective.inputs(batch))
                totals[j] += float(objective.per_sample(out, batch).mean())
    return {j: t / len(prepared) for j, t in totals.items()}


@torch.no_grad()
def block_influence(model, stack: walk.Stack, objective, prepared: list[dict]) -> dict[int, float]:
    """BI_j = 1 - mean over tokens of cos(input of block j, output of block j), dense model."""
    sums = {b.index: 0.0 for b in stack.blocks}
    for batch in prepared:
        inputs, last = _kept_inputs(model, stack, objective, batch, set())
        outputs = [inputs[j] for j in range(1, len(stack.blocks))] + [last]
        for j, y in enumerate(outputs):
            sums[j] += float(1 - F.cosine_similarity(inputs[j].float(), y.float(), dim=-1).mean())
    return {j: s / len(prepared) for j, s in sums.items()}


def choose_blocks(model, plan: walk.Plan, objective, batches: list[dict], k: int, config: DepthConfig) -> dict:
    """Which K blocks to remove (original indices) and the score of every step."""
    stack = check_supported(model, plan, objective)
    prepared = objective.prepare(model, batches)
    t0 = time.perf_counter()
    steps = []
    if config.scorer == "iterative":
        removed: set[int] = set()
        base = None
        for step in tqdm(range(k), desc="depth: iterative scoring", disable=not config.progress):
            losses = losses_without(model, stack, objective, prepared, removed)
            j = min(losses, key=lambda i: (losses[i], i))
            steps.append({"step": step + 1, "removed": j, "loss_after": losses[j], "losses": losses})
            removed.add(j)
            base = losses[j]
        order = [s["removed"] for s in steps]
        info = {"final_calibration_loss": base}
    else:
        if config.scorer == "bi":
            scores = block_influence(model, stack, objective, prepared)
        elif config.scorer == "ecoflap":
            res = stage1.tensor_scores(
                model, batches, plan=plan, objective=objective, seed=config.seed, progress=config.progress
            )
            scores = {b.index: sum(res.tensor_scores[m.name] for m in b.matrices) for b in stack.blocks}
        else:
            raise ValueError(f"block scorer must be one of {SCORERS}, got {config.scorer!r}")
        order = sorted(scores, key=lambda i: (scores[i], i))[:k]
        steps = [{"step": n + 1, "removed": j, "score": scores[j]} for n, j in enumerate(order)]
        info = {"scores": scores}
    return {
        "scorer": config.scorer,
        "removed_blocks": sorted(order),
        "removal_order": order,
        "steps": steps,
        "stack": stack.path,
        "blocks_before": len(stack.blocks),
        "blocks_after": len(stack.blocks) - len(order),
        "seconds": time.perf_counter() - t0,
        **info,
    }


# ----------------------------------------------------------------------------------------------
# removing blocks: a real, smaller checkpoint
# ----------------------------------------------------------------------------------------------
def _layer_count_attr(config) -> str:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, name, None), int):
            return name
    raise ValueError(f"{type(config).__name__} has no layer count field (num_hidden_layers)")


def trimmed_config(config, n_blocks: int, kept: list[int]):
    """A copy of ``config`` for a model that keeps the blocks ``kept`` (original indices, ascending)."""
    new = copy.deepcopy(config)
    new_index = {old: n for n, old in enumerate(kept)}
    for key, value in list(vars(new).items()):
        if isinstance(value, (list, tuple)) and len(value) == n_blocks and key not in ("mlp_only_layers",):
            setattr(new, key, type(value)(value[i] for i in kept))
    if getattr(new, "decoder_sparse_step", None) and getattr(new, "num_experts", 0):
        step, only = new.decoder_sparse_step, set(getattr(new, "mlp_only_layers", None) or [])
        sparse = {i for i in range(n_blocks) if i not in only and (i + 1) % step == 0}
        new.decoder_sparse_step = 1
        new.mlp_only_layers = [new_index[i] for i in kept if i not in sparse]
    elif getattr(new, "mlp_only_layers", None):
        new.mlp_only_layers = [new_index[i] for i in new.mlp_only_layers if i in new_index]
    if isinstance(getattr(new, "first_k_dense_replace", None), int):
        new.first_k_dense_replace = sum(1 for i in kept if i < config.first_k_dense_replace)
    setattr(new, _layer_count_attr(new), len(kept))
    return new


def _renamed_state(model, stack_path: str, kept: list[int]) -> dict[str, tuple]:
    """The trimmed model's state-dict keys -> shape, blocks renumbered."""
    new_index = {old: n for n, old in enumerate(kept)}
    out = {}
    prefix = stack_path + "."
    for key, t in model.state_dict().items():
        if key.startswith(prefix):
            idx, rest = key[len(prefix) :].split(".", 1)
            if int(idx) not in new_index:
                continue
            key = f"{prefix}{new_index[int(idx)]}.{rest}"
        out[key] = tuple(t.shape)
    return out


def remove_blocks_(model, plan: walk.Plan, removed: list[int]) -> dict:
    """Take the blocks ``removed`` (original indices) out of ``model`` in place; returns what changed.

    Checks first that a model built from the trimmed config has exactly the trimmed model's tensors
    (names and shapes), so a plain ``from_pretrained`` of the saved folder loads without missing or
    unexpected keys; raises ValueError and changes nothing otherwise."""
    stack = plan.stacks[0]
    n = len(stack.blocks)
    kept = [i for i in range(n) if i not in set(removed)]
    new_config = trimmed_config(model.config, n, kept)
    with torch.device("meta"):
        fresh = type(model)(new_config)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = _renamed_state(model, stack.path, kept)
    if want != have:
        missing = sorted(set(want) - set(have))[:3]
        extra = sorted(set(have) - set(want))[:3]
        shapes = [k for k in set(want) & set(have) if want[k] != have[k]][:3]
        raise ValueError(
            f"{plan.model_class}: a model built from the trimmed config would not match (missing {missing}, "
            f"unexpected {extra}, shapes {shapes}); its config cannot be trimmed consistently"
        )
    parent_path, _, attr = stack.path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList([stack.modules[i] for i in kept]))
    for new_idx, old in enumerate(kept):
        for m in stack.modules[old].modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_idx
    # the config object is shared by the model's submodules: update it in place
    for key, value in vars(new_config).items():
        if getattr(model.config, key, None) != value:
            setattr(model.config, key, value)
    return {"kept_blocks": kept, "num_hidden_layers": len(kept)}
