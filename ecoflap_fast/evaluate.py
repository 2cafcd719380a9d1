"""Held-out quality, through the walk's forward (caches off): perplexity for language models, the
contrastive loss for CLIP-style models, and for encoders without a head the cosine between the
model's and the dense model's mean-pooled sentence embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import objectives, parallel, walk


@torch.no_grad()
def perplexity(
    model, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True, desc="perplexity", plan=None
) -> float:
    """exp(mean token cross-entropy) over equal-length token windows ``[n, seqlen]``: next-token for
    causal LMs, the decoder's labels for encoder-decoder models (first half in, second half out).
    ``plan`` of a streamed model: evaluated block by block, each block read once."""
    objective = objectives.for_model(model)
    if objective.kind not in ("causal-lm", "seq2seq"):
        raise ValueError(f"perplexity needs a language model; {type(model).__name__} is {objective.kind}")
    batches = [objective.from_ids(c) for c in windows.split(batch_size)]
    if parallel.active():  # every rank evaluates every world()-th batch; the sums are reduced
        batches, _ = parallel.shard(batches)
    if plan is not None and plan.loader is not None:
        outputs = blockwise_outputs(model, plan, batches, progress=progress, desc=desc)
    else:
        outputs = (walk.forward(model, b) for b in tqdm(batches, desc=desc, disable=not progress, leave=False))
    total, count = 0.0, 0
    for batch, out in zip(batches, outputs):
        per = objective.per_sample(out, walk.to_device(batch, out.logits.device))
        tokens = batch["labels"].shape[1] if objective.kind == "seq2seq" else batch["input_ids"].shape[1] - 1
        total += float(per.sum()) * tokens
        count += tokens * per.shape[0]
    total, count = parallel.all_reduce_floats(total, count)
    return math.exp(total / count)


@torch.no_grad()
def blockwise_outputs(model, plan, batches: list[dict], *, progress: bool = True, desc: str = "evaluation"):
    """The model's outputs on every batch, computed block-major (a single-stack model): every block is
    held once for all batches, the last block runs inside the model's own forward for the remainder."""
    if len(plan.stacks) != 1:
        with walk.on_demand(plan):
            return [walk.forward(model, b) for b in batches]
    (stack,) = plan.stacks
    inputs = walk.capture(model, stack, batches)
    for block in tqdm(stack.blocks[:-1], desc=desc, disable=not progress, leave=False):
        with walk.holding(block):
            walk.advance(block, inputs)
    last = stack.blocks[-1]
    outs = []
    with walk.holding(last):
        for batch, inp in zip(batches, inputs):
            with walk.starting_at(last, inp.hidden):
                outs.append(walk.forward(model, batch))
    return outs


@torch.no_grad()
def contrastive_loss(model, batches: list[dict], *, progress: bool = True) -> float:
    """Mean symmetric image-text contrastive loss of a CLIP-style model over held-out batches."""
    objective = objectives.for_model(model)
    losses = [
        float(objective.loss(model, b))
        for b in tqdm(batches, desc="contrastive loss", disable=not progress, leave=False)
    ]
    return sum(losses) / len(losses)


@torch.no_grad()
def sentence_embeddings(model, batches: list[dict]) -> list[torch.Tensor]:
    """Mean-pooled last hidden states (padding excluded), fp32 [B, C] per batch."""
    out = []
    for b in batches:
        out = walk.forward(model, b, output_hidden_states=True)
        h = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]
        h = h.float()
        mask = b.get("attention_mask")
        mask = torch.ones(h.shape[:2], device=h.device) if mask is None else mask.to(h.device).float()
        out.append((h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1))
    return out


@torch.no_grad()
def embedding_cosine(model, batches: list[dict], dense: list[torch.Tensor]) -> float:
    """Mean cosine between the model's sentence embeddings and the dense model's (``dense``)."""
    cos = [F.cosine_similarity(e, d.to(e.device), dim=-1) for e, d in zip(sentence_embeddings(model, batches), dense)]
    return float(torch.cat(cos).mean())
