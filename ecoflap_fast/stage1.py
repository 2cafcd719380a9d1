"""Stage 1 of ECoFLaP: global importance of every prunable matrix (SPEC §3.1), through the walk.

Zeroth-order score a_t = Σ_b |L(W_t + εz) − L(W_t − εz)| / (2ε), one noise draw per (matrix, batch)
(``noise.noise_seed``), with the model's own loss (``objectives``). Two estimators:

``fd`` (forward-only finite differences, the paper's setting), made fast without changing the
  estimate: for a matrix in block l, the model's own forward runs with the blocks before l replaced
  by the identity and block l fed the cached dense inputs, so only blocks ≥ l and the model's own
  remainder (final norm, head, later towers) are computed. For Linear / Conv1D matrices and a loss
  that is a mean over sequences, the +ε and −ε evaluations of every matrix of block l go into one
  forward of a 2·n-fold batch, each copy's output shifted by ±ε·x zᵀ (the same as perturbing W, up
  to rounding). Expert matrices (and contrastive losses) perturb the weight itself, one at a time,
  restoring it from a copy.
``grad``: (L+ − L−)/(2ε) is a finite-difference estimate of ⟨z_t, ∇_{W_t} L⟩; one backward per batch
  gives every ⟨z_t, g_t⟩, consumed in a per-parameter hook that drops the gradient at once.

First-order score (``fo``): mean over batches of |g| element-wise, importance |W|·ḡ (or ḡ), summed.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import objectives, parallel, walk
from .noise import noise_like, noise_seed


@dataclass
class Stage1Result:
    tensor_scores: dict[str, float]
    method: str
    seconds: float
    loss: str = ""
    batch_scores: dict[int, dict[str, float]] | None = None  # per calibration batch (gradient-based estimators)


def _setup(model, batches, plan, objective):
    objective = objective or objectives.for_model(model)
    batches = walk.as_batches(batches, 1 << 30, objective.from_ids)
    plan = plan or walk.plan(model, objective.inputs(batches[0]))
    return plan, objective, batches


def _tile(batch: dict, reps: int) -> dict:
    """Every tensor of a batch repeated ``reps`` times along dim 0 (copy j holds rows j*B..)."""
    return {
        k: v.repeat(reps, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) and v.dim() else v
        for k, v in batch.items()
    }


def _from_block(model, objective, block: walk.Block, batch: dict, hidden: torch.Tensor):
    """The model's outputs on ``batch``, computed from ``block`` on with ``hidden`` as its input."""
    extra = {"return_loss": True} if objective.kind == "contrastive" else {}
    with walk.starting_at(block, hidden):
        return walk.forward(model, objective.inputs(batch), **extra)


def _loss_of(objective, outputs, batch) -> torch.Tensor:
    if objective.separable:
        return objective.per_sample(outputs, batch)
    return outputs.loss.float().reshape(1)


@torch.no_grad()
def zo_fd_scores(
    model: nn.Module,
    batches,
    *,
    plan: walk.Plan | None = None,
    objective: objectives.Objective | None = None,
    eps: float = 1e-3,
    seed: int = 0,
    only: set[str] | None = None,
    progress: bool = True,
    batch_ids: list[int] | None = None,
) -> dict[str, float]:
    """Forward-only finite differences (cached block inputs, batched ± perturbations). ``batch_ids``:
    the batches' indices in the whole calibration set (their noise seeds; data-parallel ranks)."""
    plan, objective, batches = _setup(model, batches, plan, objective)
    ids = batch_ids or list(range(len(batches)))
    index = {name: i for i, name in enumerate(plan.matrices())}
    scores: dict[str, float] = defaultdict(float)
    prepared = objective.prepare(model, batches)
    for b, batch in zip(ids, prepared):
        for stack in plan.stacks:
            (inp,) = walk.capture(model, stack, [objective.inputs(batch)])
            bar = tqdm(
                stack.blocks,
                desc=f"stage 1 (fd) batch {b + 1}/{len(prepared)} {stack.name}",
                disable=not progress,
                leave=False,
            )
            for block in bar:
                todo = [m for m in block.matrices if only is None or m.name in only]
                shifted = [m for m in todo if m.kind != "expert"] if objective.separable else []
                direct = [m for m in todo if m not in shifted]
                if shifted:
                    for m, d in zip(
                        shifted,
                        _shifted_differences(model, objective, block, batch, inp.hidden, shifted, index, seed, b, eps),
                    ):
                        scores[m.name] += d
                for m in direct:
                    w = m.weight()
                    original = w.clone()
                    z = noise_like(w, noise_seed(seed, index[m.name], b))
                    losses = []
                    for sign in (1.0, -1.0):
                        w.copy_((original.float() + sign * eps * z).to(w.dtype))
                        out = _from_block(model, objective, block, batch, inp.hidden)
                        losses.append(float(_loss_of(objective, out, batch).mean()))
                    w.copy_(original)
                    scores[m.name] += abs(losses[0] - losses[1]) / (2 * eps)
                walk.advance(block, [inp])
    return parallel.all_reduce_scores(dict(scores)) if parallel.active() else dict(scores)


def _shifted_differences(model, objective, block, batch, hidden, mats, index, seed, b, eps) -> list[float]:
    """|L+ − L−| / (2ε) of every matrix in ``mats`` (Linear / Conv1D of ``block``) from one forward of
    a 2·len(mats)-fold batch: copy 2j is shifted by +ε·x zⱼᵀ at matrix j's output, copy 2j+1 by −ε·x zⱼᵀ."""
    reps = 2 * len(mats)
    hooks = []
    for j, m in enumerate(mats):
        z = noise_like(m.weight(), noise_seed(seed, index[m.name], b))

        def shift(_mod, inp, out, z=z, j=j):
            # Copies are stacked along dim 0; some layers see it flattened with the tokens (OPT's MLP
            # takes [B*T, C]), so slice by rows per copy.
            x = inp[0]
            per = x.shape[0] // reps
            lo = 2 * j * per
            delta = F.linear(x[lo : lo + 2 * per].float(), z) * eps
            delta[per:] *= -1
            out = out.clone()
            out[lo : lo + 2 * per] += delta.to(out.dtype)
            return out

        hooks.append(m.module.register_forward_hook(shift))
    tiled = _tile(batch, reps)
    fed = hidden.repeat(reps, *([1] * (hidden.dim() - 1)))
    try:
        out = _from_block(model, objective, block, tiled, fed)
    finally:
        for h in hooks:
            h.remove()
    losses = _loss_of(objective, out, tiled).view(reps, -1).mean(1)
    return [abs(float(losses[2 * j]) - float(losses[2 * j + 1])) / (2 * eps) for j in range(len(mats))]


def _backward_pass(model, plan: walk.Plan, objective, batches, on_grad, progress: bool, desc: str, ids=None) -> None:
    """One backward per batch; ``on_grad(matrix, grad_view, batch_index)`` is called for every
    prunable matrix as soon as its parameter's gradient is complete; the gradient is dropped after.
    A streamed model goes block by block (:func:`_blockwise_backward`)."""
    ids = ids or list(range(len(batches)))
    if plan.loader is not None:
        return _blockwise_backward(model, plan, objective, batches, on_grad, progress, desc, ids)
    by_param: dict[int, tuple[torch.Tensor, list[walk.Matrix]]] = {}
    for m in plan.matrices().values():
        by_param.setdefault(id(m.param), (m.param, []))[1].append(m)
    flags = {p: p.requires_grad for p in model.parameters()}
    handles = []
    state = {"batch": 0}
    prepared = objective.prepare(model, batches)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for param, mats in by_param.values():
            param.requires_grad_(True)

            def hook(p, mats=mats):
                for m in mats:
                    on_grad(m, m.view_of(p.grad), state["batch"])
                p.grad = None

            handles.append(param.register_post_accumulate_grad_hook(hook))
        for b, batch in zip(ids, tqdm(prepared, desc=desc, disable=not progress, leave=False)):
            state["batch"] = b
            with torch.enable_grad():
                objective.loss(model, batch).backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None


def _blockwise_backward(model, plan: walk.Plan, objective, batches, on_grad, progress: bool, desc: str, ids) -> None:
    """The same gradients, one block in memory at a time: the inputs of every block are stored on a
    forward pass; then from the last block down, each block is read, its forward recomputed with its
    matrices and its input requiring grad, and its output's gradient propagated (the last block's
    forward runs the model's own remainder and loss). On CPU the gradients equal the whole-graph
    backward's bit for bit (tests/test_stream.py)."""
    (stack,) = plan.stacks
    flags = {p: p.requires_grad for p in model.parameters()}
    with walk.on_demand(plan):  # a classifier loss needs the dense model's outputs first
        prepared = objective.prepare(model, batches)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for b, batch in zip(ids, tqdm(prepared, desc=desc, disable=not progress, leave=False)):
            (inp,) = walk.capture(model, stack, [objective.inputs(batch)])
            hidden = []
            with torch.no_grad():
                for block in stack.blocks:
                    hidden.append(inp.hidden)
                    with walk.holding(block):
                        inp.hidden = walk.run_block(block, inp)
            grad_out = None
            for block in reversed(stack.blocks):
                with walk.holding(block):
                    params = list({id(m.param): m.param for m in block.matrices}.values())
                    for p in params:
                        p.requires_grad_(True)
                    x = hidden[block.index].detach().requires_grad_(True)
                    with torch.enable_grad():
                        if grad_out is None:  # the last block: the model's own remainder and loss
                            with walk.starting_at(block, x):
                                objective.loss(model, batch).backward()
                        else:
                            walk.run_block(block, inp, hidden=x).backward(grad_out)
                    for m in block.matrices:
                        on_grad(m, m.view_of(m.param.grad), b)
                    for p in params:
                        p.grad = None
                        p.requires_grad_(False)
                    grad_out = x.grad
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None


def zo_grad_scores(
    model: nn.Module,
    batches,
    *,
    plan: walk.Plan | None = None,
    objective: objectives.Objective | None = None,
    seed: int = 0,
    progress: bool = True,
    only: set[str] | None = None,
    batch_ids: list[int] | None = None,
    draws: int = 1,
    expected: bool = False,
    per_batch: dict | None = None,
) -> dict[str, float]:
    """a_t = Σ_b |⟨z_tb, ∇_{W_t} L_b⟩| with the same z as the finite differences.

    ``draws`` > 1 averages that many independent z per (matrix, batch) from the one gradient (the
    first draw is the finite differences' z). ``expected``: the noise-free limit of that average,
    E_z |⟨z, g⟩| = sqrt(2/π) ‖g‖_F for z ~ N(0, I), exact and seed-free. ``per_batch`` (a dict) gets
    every batch's terms, ``per_batch[b][name]``."""
    plan, objective, batches = _setup(model, batches, plan, objective)
    index = {name: i for i, name in enumerate(plan.matrices())}
    scores = {n: 0.0 for n in index if only is None or n in only}
    terms: dict[int, dict[str, float]] = per_batch if per_batch is not None else {}

    def on_grad(m, grad, b):
        if m.name not in scores:
            return
        g = grad.float()
        if expected:
            v = math.sqrt(2 / math.pi) * float(g.norm())
        else:
            v = 0.0
            for k in range(draws):
                z = noise_like(g, noise_seed(seed + 7919 * k, index[m.name], b))
                v += abs(float((z * g).sum()))
            v /= draws
        scores[m.name] += v
        terms.setdefault(b, {})[m.name] = v

    desc = "stage 1 (zo, " + ("expectation over z)" if expected else f"gradient estimator, {draws} draw(s))")
    _backward_pass(model, plan, objective, batches, on_grad, progress, desc, batch_ids)
    if parallel.active():
        _reduce_terms(terms, list(index))
        return parallel.all_reduce_scores(scores)
    return scores


def _reduce_terms(terms: dict, names: list[str]) -> None:
    """Every rank's per-batch terms on every rank, in place (each batch was scored by one rank; the
    global batch ids are 0..N-1 with N the number of batches over all ranks)."""
    (total,) = parallel.all_reduce_floats(len(terms))
    table = torch.zeros(int(total), len(names), dtype=torch.float64)
    col = {n: j for j, n in enumerate(names)}
    for b, row in terms.items():
        for n, v in row.items():
            table[b, col[n]] = v
    table = parallel.all_reduce_tensors({"t": table})["t"]
    terms.clear()
    for b in range(table.shape[0]):
        terms[b] = {n: float(table[b, j]) for n, j in col.items()}


def fo_scores(
    model: nn.Module,
    batches,
    *,
    plan: walk.Plan | None = None,
    objective: objectives.Objective | None = None,
    metric: str = "wg",
    progress: bool = True,
    batch_ids: list[int] | None = None,
    per_batch: dict | None = None,
) -> dict[str, float]:
    """First-order: ḡ = mean_b |g| element-wise; score Σ |W|·ḡ ('wg') or Σ ḡ ('g'). ``per_batch`` (a
    dict) gets every batch's own term, Σ |W|·|g_b| or Σ |g_b| (the score is their mean)."""
    plan, objective, batches = _setup(model, batches, plan, objective)
    terms: dict[int, dict[str, float]] = per_batch if per_batch is not None else {}

    def on_grad(m, grad, b):  # while the block's weights are there (a streamed block is freed after)
        g = grad.detach().float().abs()
        terms.setdefault(b, {})[m.name] = float((m.weight().float().abs() * g).sum() if metric == "wg" else g.sum())

    _backward_pass(model, plan, objective, batches, on_grad, progress, "stage 1 (first order)", batch_ids)
    if parallel.active():
        _reduce_terms(terms, list(plan.matrices()))
    # Σ |W|·ḡ with ḡ = mean_b |g_b| is the mean over the batches of Σ |W|·|g_b|
    # (a matrix without a gradient in a batch, e.g. an expert no token reached, adds 0 for it)
    names = [n for n in plan.matrices() if any(n in row for row in terms.values())]
    return {n: sum(row.get(n, 0.0) for row in terms.values()) / len(terms) for n in names}


def tensor_scores(
    model: nn.Module,
    batches,
    *,
    plan: walk.Plan | None = None,
    objective: objectives.Objective | None = None,
    method: str = "zo",
    estimator: str = "grad",
    eps: float = 1e-3,
    seed: int = 0,
    fo_metric: str = "wg",
    progress: bool = True,
    batch_ids: list[int] | None = None,
    draws: int = 1,
) -> Stage1Result:
    """Every prunable matrix's stage-1 score. ``method`` "zo" with ``estimator`` "expected" (the
    noise-free expectation of the zeroth-order estimate), "grad" (``draws`` noise draws from one
    backward per batch) or "fd" (forward-only finite differences); "fo": first order."""
    t0 = time.perf_counter()
    per_batch: dict[int, dict[str, float]] = {}
    plan, objective, batches = _setup(model, batches, plan, objective)
    was_training = model.training
    model.eval()
    kw = dict(plan=plan, objective=objective, progress=progress, batch_ids=batch_ids)
    try:
        if method == "zo" and estimator == "fd":
            scores = zo_fd_scores(model, batches, eps=eps, seed=seed, **kw)
            label = "zeroth-order, finite differences (forward only)"
        elif method == "zo" and estimator == "expected":
            scores = zo_grad_scores(model, batches, seed=seed, expected=True, per_batch=per_batch, **kw)
            label = "zeroth-order, expectation over the noise: sqrt(2/pi) |grad L| per batch (no draw)"
        elif method == "zo":
            scores = zo_grad_scores(model, batches, seed=seed, draws=draws, per_batch=per_batch, **kw)
            label = f"zeroth-order, gradient estimator <z, grad L>, {draws} draw(s) per tensor and batch"
        elif method == "fo":
            scores = fo_scores(model, batches, metric=fo_metric, per_batch=per_batch, **kw)
            label = f"first-order ({fo_metric})"
        else:
            raise ValueError(f"unknown stage-1 method {method!r}")
    finally:
        model.train(was_training)
    return Stage1Result(scores, label, time.perf_counter() - t0, objective.description, per_batch or None)
