"""Plain, slow zeroth-order stage 1 in the official order: the oracle of the fast implementations.

For every calibration batch b and every prunable tensor t: draw z ~ N(0, I) from the seed of (t, b),
evaluate the model's full loss at W_t + εz and at W_t − εz (one full forward each), restore W_t
from a copy, and accumulate a_t += |L+ − L−| / (2ε). (Sung et al., ECoFLaP, ICLR 2024, §3.1.)
"""

from __future__ import annotations

import torch

from ecoflap_fast.noise import noise_like, noise_seed  # the shared noise convention, not under test


def causal_lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the whole sequence, in fp32."""
    logits = model(input_ids, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch.to(device)


def model_loss(model, batch) -> torch.Tensor:
    """The model's own objective in fp32: next-token cross-entropy for token windows (a tensor or
    {"input_ids"}), the symmetric image-text contrastive loss for CLIP-style batches (pixel_values)."""
    batch = to_device(batch, next(model.parameters()).device)
    if isinstance(batch, dict) and "pixel_values" in batch:
        return model(**batch, return_loss=True).loss.float()
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    return causal_lm_loss(model, ids)


@torch.no_grad()
def zo_tensor_scores(
    model,
    layers: dict,
    batches: list[torch.Tensor],
    eps: float = 1e-3,
    seed: int = 0,
    loss_fn=model_loss,
    only: set[str] | None = None,
) -> dict[str, float]:
    """a_t for every tensor in ``layers`` (name -> nn.Linear, or name -> the [out, in] view of a
    matrix, e.g. one expert's slice), or only those named in ``only``; tensor t's noise seed uses
    its position in ``layers``."""
    scores = {name: 0.0 for name in layers if only is None or name in only}
    for b, batch in enumerate(batches):
        for t, (name, lin) in enumerate(layers.items()):
            if name not in scores:
                continue
            w = lin.weight.data if isinstance(lin, torch.nn.Module) else lin
            original = w.clone()
            z = noise_like(w, noise_seed(seed, t, b))
            w.copy_((original.float() + eps * z).to(w.dtype))
            plus = float(loss_fn(model, batch))
            w.copy_((original.float() - eps * z).to(w.dtype))
            minus = float(loss_fn(model, batch))
            w.copy_(original)
            scores[name] += abs(plus - minus) / (2 * eps)
    return scores
