"""SparseGPT local pruner (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", 2023, Alg. 1), in fp32.

H = 2 XᵀX / n over the calibration tokens, dampened by 1% of its mean diagonal (more when the
Cholesky factorisation fails). Columns are processed in blocks of 128: in each block the mask comes
from the OBS saliency w² / [H⁻¹]_jj² (unstructured: the block's smallest fraction, by the exact
selection of ``ops.select_mask``; n:m: per group), and the pruning error of every column is
propagated to the columns after it.
"""

from __future__ import annotations

import torch

from . import ops


class HessianAccumulator:
    """Running H = 2 XᵀX / n (fp32) of one Linear's inputs; ``x`` of shape [..., in] counts its
    leading rows as samples of the batch dimension like ActNormAccumulator (B for [B, T, C])."""

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, x: torch.Tensor) -> None:
        batch = 1 if x.dim() == 2 else x.shape[0]
        inp = x.reshape(-1, x.shape[-1]).float()
        self.H *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        inp = (2 / self.nsamples) ** 0.5 * inp
        self.H += inp.t() @ inp


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹, adding damping until the factorisation succeeds."""
    damp = percdamp * torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for _ in range(8):
        try:
            L = torch.linalg.cholesky(H + damp * eye)
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True)
        except torch.linalg.LinAlgError:
            damp = damp * 10 if damp > 0 else torch.tensor(1e-6, device=H.device)
    raise ValueError("SparseGPT: the Hessian stays singular after damping (are the calibration inputs all zero?)")


@torch.no_grad()
def sparsegpt_prune_(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None = None,
    *,
    nm=None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> int:
    """Prune ``weight`` [out, in] in place; returns the number of weights set to zero by the mask."""

    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _inverse_cholesky(H, percdamp)
    pruned = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        scores = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
        if nm is None:
            mask1 = ops.select_mask(scores, sparsity, per="matrix")
        else:
            mask1 = ops.select_mask(scores, nm=nm)
        pruned += int(mask1.sum())
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    weight.copy_(W.to(weight.dtype))
    return pruned
