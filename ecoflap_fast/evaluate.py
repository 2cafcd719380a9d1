"""Held-out quality, through the walk's forward (caches off): perplexity for language models, the
contrastive loss for CLIP-style models, and for encoders without a head the cosine between the
model's and the dense model's mean-pooled sentence embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import objectives, walk


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True, desc="perplexity") -> float:
    """exp(mean token cross-entropy) over equal-length token windows ``[n, seqlen]``: next-token for
    causal LMs, the decoder's labels for encoder-decoder models (first half in, second half out)."""
    objective = objectives.for_model(model)
    if objective.kind not in ("causal-lm", "seq2seq"):
        raise ValueError(f"perplexity needs a language model; {type(model).__name__} is {objective.kind}")
    total, count = 0.0, 0
    for chunk in tqdm(windows.split(batch_size), desc=desc, disable=not progress, leave=False):
        batch = objective.from_ids(chunk)
        out = walk.forward(model, batch)
        per = objective.per_sample(out, walk.to_device(batch, out.logits.device))
        tokens = batch["labels"].shape[1] if objective.kind == "seq2seq" else chunk.shape[1] - 1
        total += float(per.sum()) * tokens
        count += tokens * chunk.shape[0]
    return math.exp(total / count)


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
