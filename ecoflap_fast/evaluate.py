"""Held-out quality: perplexity for causal language models."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True, desc="perplexity") -> float:
    """exp(mean next-token cross-entropy) over equal-length token windows ``[n, seqlen]``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for chunk in tqdm(windows.split(batch_size), desc=desc, disable=not progress, leave=False):
        chunk = chunk.to(device)
        logits = model(chunk, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def contrastive_loss(model, batches: list[dict], *, progress: bool = True) -> float:
    """Mean symmetric image-text contrastive loss of a CLIP-style model over held-out batches."""
    from .reference.stage1 import model_loss

    losses = [
        float(model_loss(model, b)) for b in tqdm(batches, desc="contrastive loss", disable=not progress, leave=False)
    ]
    return sum(losses) / len(losses)
