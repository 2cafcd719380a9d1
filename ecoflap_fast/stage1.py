"""Stage 1 of ECoFLaP: global importance of every prunable tensor (SPEC §3.1).

Zeroth-order score a_t = Σ_b |L(W_t + εz) − L(W_t − εz)| / (2ε), one noise draw per (tensor, batch)
(seeds shared with ``reference.stage1``). Two estimators:

``fd`` (forward-only, the paper's setting), made fast without changing the estimate:
  the dense inputs of block l are computed once and only blocks ≥ l and the head run; the +ε and −ε
  evaluations of every tensor of block l go into one forward of a 2·T-fold batch, each copy's Linear
  output shifted by ±ε·x zᵀ (the same as perturbing W, up to rounding).
``grad``: (L+ − L−)/(2ε) is a finite-difference estimate of ⟨z_t, ∇_{W_t} L⟩; one backward per batch
  gives every ⟨z_t, g_t⟩, consumed in a per-parameter hook that drops the gradient at once.

First-order score (``fo``): mean over batches of |g| element-wise, importance |W|·ḡ (or ḡ), summed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import blocks as blocks_mod
from .reference.stage1 import model_loss, noise_like, noise_seed, zo_tensor_scores


@dataclass
class Stage1Result:
    tensor_scores: dict[str, float]
    method: str
    seconds: float


def _head(model: nn.Module, tower: blocks_mod.Tower):
    """hidden states after the last block -> logits, for the supported causal LM families."""
    if tower.family == "llama":
        return lambda h: model.lm_head(model.model.norm(h))
    if tower.family == "opt":
        dec = model.model.decoder

        def head(h):
            if dec.final_layer_norm is not None:
                h = dec.final_layer_norm(h)
            if dec.project_out is not None:
                h = dec.project_out(h)
            return model.lm_head(h)

        return head
    raise NotImplementedError(f"zeroth-order finite differences are not available for {tower.family} models")


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean next-token cross-entropy, fp32: [batch]."""
    logits = logits.float()
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    return ce.view(ids.shape[0], -1).mean(1)


def _tile_kwargs(kwargs: dict, reps: int) -> dict:
    """Block kwargs for a batch repeated ``reps`` times along dim 0 (masks, position embeddings)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] > 1:
            out[k] = v.repeat(reps, *([1] * (v.dim() - 1)))
        elif isinstance(v, tuple) and all(isinstance(x, torch.Tensor) for x in v):
            out[k] = tuple(x.repeat(reps, *([1] * (x.dim() - 1))) if x.shape[0] > 1 else x for x in v)
        else:
            out[k] = v
    return out


@torch.no_grad()
def zo_fd_scores(
    model: nn.Module,
    batches: list[torch.Tensor],
    *,
    eps: float = 1e-3,
    seed: int = 0,
    only_blocks: set[int] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Fast forward-only finite differences (cached block inputs, batched ± perturbations)."""
    from .prune import capture_block_inputs

    towers = blocks_mod.find_towers(model)
    if len(towers) != 1 or towers[0].family not in ("llama", "opt"):
        # no cached-input fast path for multi-tower models: finite differences in the plain order
        return zo_tensor_scores(model, blocks_mod.prunable(model), batches, eps=eps, seed=seed)
    tower = towers[0]
    head = _head(model, tower)
    names = list(blocks_mod.prunable(model))
    index = {n: i for i, n in enumerate(names)}
    scores: dict[str, float] = {}
    for b, ids in enumerate(batches):
        device = next(model.parameters()).device
        ids = (ids["input_ids"] if isinstance(ids, dict) else ids).to(device)
        ((hidden, rest, kwargs),) = capture_block_inputs(model, tower.blocks[0], ids, ids.shape[0])
        bar = tqdm(
            list(enumerate(tower.blocks)),
            desc=f"stage 1 (fd) batch {b + 1}/{len(batches)}",
            disable=not progress,
            leave=False,
        )
        for li, block in bar:
            layers = blocks_mod.linears(block)
            if only_blocks is None or li in only_blocks:
                items = list(layers.items())
                reps = 2 * len(items)
                hooks = []
                for j, (lname, lin) in enumerate(items):
                    full = f"{tower.path}.{li}.{lname}"
                    z = noise_like(lin.weight, noise_seed(seed, index[full], b))

                    def shift(_m, inp, out, z=z, j=j):
                        # Copies are stacked along dim 0; some layers see it flattened with the
                        # tokens (OPT's MLP takes [B*T, C]), so slice by rows per copy.
                        x = inp[0]
                        per = x.shape[0] // reps
                        lo = 2 * j * per
                        delta = torch.nn.functional.linear(x[lo : lo + 2 * per].float(), z) * eps
                        delta[per:] *= -1
                        out = out.clone()
                        out[lo : lo + 2 * per] += delta.to(out.dtype)
                        return out

                    hooks.append(lin.register_forward_hook(shift))
                h = hidden.repeat(reps, *([1] * (hidden.dim() - 1)))
                kw = _tile_kwargs(kwargs, reps)
                args = tuple(_tile_kwargs(dict(enumerate(rest)), reps).values())
                try:
                    for k in range(li, len(tower.blocks)):
                        y = tower.blocks[k](h, *args, **kw)
                        h = y[0] if isinstance(y, (tuple, list)) else y
                        if k == li:
                            for hk in hooks:
                                hk.remove()
                            hooks = []
                finally:
                    for hk in hooks:
                        hk.remove()
                losses = _lm_loss(head(h), ids.repeat(reps, 1)).view(reps, -1).mean(1)
                for j, (lname, _) in enumerate(items):
                    full = f"{tower.path}.{li}.{lname}"
                    plus, minus = float(losses[2 * j]), float(losses[2 * j + 1])
                    scores[full] = scores.get(full, 0.0) + abs(plus - minus) / (2 * eps)
            y = block(hidden, *rest, **kwargs)
            hidden = y[0] if isinstance(y, (tuple, list)) else y
    return scores


def _backward_pass(model: nn.Module, batches: list[torch.Tensor], on_grad, progress: bool, desc: str):
    """One backward per batch; ``on_grad(name, param, grad, batch_index)`` is called for every
    prunable weight as soon as its gradient is complete, and the gradient is dropped right after."""
    layers = blocks_mod.prunable(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    handles = []
    state = {"batch": 0}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, lin in layers.items():
            w = lin.weight
            w.requires_grad_(True)

            def hook(p, name=name):
                on_grad(name, p, p.grad, state["batch"])
                p.grad = None

            handles.append(w.register_post_accumulate_grad_hook(hook))
        for b, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
            state["batch"] = b
            with torch.enable_grad():
                model_loss(model, batch).backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None


def zo_grad_scores(
    model: nn.Module, batches: list[torch.Tensor], *, seed: int = 0, progress: bool = True, only: set[str] | None = None
) -> dict[str, float]:
    """a_t = Σ_b |⟨z_tb, ∇_{W_t} L_b⟩| with the same z as the finite differences."""
    names = list(blocks_mod.prunable(model))
    index = {n: i for i, n in enumerate(names)}
    scores = {n: 0.0 for n in names if only is None or n in only}

    def on_grad(name, p, grad, b):
        if name in scores:
            z = noise_like(p, noise_seed(seed, index[name], b))
            scores[name] += abs(float((z * grad.float()).sum()))

    _backward_pass(model, batches, on_grad, progress, "stage 1 (zo, gradient estimator)")
    return scores


def fo_scores(
    model: nn.Module, batches: list[torch.Tensor], *, metric: str = "wg", progress: bool = True
) -> dict[str, float]:
    """First-order: ḡ = mean_b |g| element-wise; score Σ |W|·ḡ ('wg') or Σ ḡ ('g')."""
    sums: dict[str, torch.Tensor] = {}

    def on_grad(name, p, grad, b):
        g = grad.detach().float().abs()
        sums[name] = g if name not in sums else sums[name].add_(g)

    _backward_pass(model, batches, on_grad, progress, "stage 1 (first order)")
    layers = blocks_mod.prunable(model)
    out = {}
    for name, g in sums.items():
        gbar = g / len(batches)
        out[name] = float((layers[name].weight.detach().float().abs() * gbar).sum() if metric == "wg" else gbar.sum())
    return out


def tensor_scores(
    model: nn.Module,
    batches: list[torch.Tensor],
    *,
    method: str = "zo",
    estimator: str = "grad",
    eps: float = 1e-3,
    seed: int = 0,
    fo_metric: str = "wg",
    progress: bool = True,
) -> Stage1Result:
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        if method == "zo" and estimator == "fd":
            scores, label = (
                zo_fd_scores(model, batches, eps=eps, seed=seed, progress=progress),
                "zeroth-order, finite differences (forward only)",
            )
        elif method == "zo":
            scores, label = (
                zo_grad_scores(model, batches, seed=seed, progress=progress),
                "zeroth-order, gradient estimator <z, grad L>",
            )
        elif method == "fo":
            scores, label = fo_scores(model, batches, metric=fo_metric, progress=progress), f"first-order ({fo_metric})"
        else:
            raise ValueError(f"unknown stage-1 method {method!r}")
    finally:
        model.train(was_training)
    return Stage1Result(scores, label, time.perf_counter() - t0)
