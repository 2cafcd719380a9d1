"""The noise of the zeroth-order estimate: z ~ N(0, I) per (tensor, batch), regenerated from a seed
and never stored. Every implementation of stage 1 (fast and reference) draws the same z."""

from __future__ import annotations

import torch


def noise_seed(seed: int, tensor_index: int, batch_index: int) -> int:
    """The seed of z for (tensor, batch); shared by every implementation so scores are comparable."""
    return (seed * 1_000_003 + tensor_index * 10_007 + batch_index * 101 + 17) % (2**63 - 1)


def noise_like(weight: torch.Tensor, seed: int) -> torch.Tensor:
    """z ~ N(0, I) in fp32 with the shape of ``weight``, regenerated from ``seed`` (never stored)."""
    g = torch.Generator(device=weight.device).manual_seed(seed)
    return torch.randn(weight.shape, generator=g, dtype=torch.float32, device=weight.device)
