"""SparseGPT restated for the tests: the oracle of ``ecoflap_fast.sparsegpt``.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(2023), Alg. 1, in its plainest form: fp64 throughout, H⁻¹ by a direct inverse, and after each
column the whole remainder of the row updated at once (no lazy block updates). The mask of every
block of 128 columns is chosen when the sweep reaches the block, from the OBS saliency
w² / [chol(H⁻¹)]_jj² of the weights as updated so far: the block's smallest fraction (unstructured)
or the m - n smallest of every group of m (n:m), by the selection rule of ``reference.select_mask``.
"""

from __future__ import annotations

import torch

from .ops import select_mask


def hessian(inputs: list[torch.Tensor]) -> torch.Tensor:
    """H = 2 XᵀX / n (fp64), n = the number of samples (leading rows of [B, T, C], 1 for [T, C])."""
    n = sum(1 if x.dim() == 2 else x.shape[0] for x in inputs)
    xs = torch.cat([x.reshape(-1, x.shape[-1]).double() for x in inputs])
    return 2 * xs.t() @ xs / n


def sparsegpt_prune_(weight, H, sparsity=None, *, nm=None, blocksize=128, percdamp=0.01) -> int:
    W = weight.detach().double().clone()
    H = H.double().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    eye = torch.eye(cols, dtype=torch.float64)
    for _ in range(8):
        try:
            U = torch.linalg.cholesky(torch.linalg.inv(H + damp * eye), upper=True)
            break
        except torch.linalg.LinAlgError:
            damp = damp * 10
    pruned = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        saliency = (W[:, i1:i2] ** 2 / torch.diag(U)[i1:i2].reshape(1, -1) ** 2).float()
        if nm is None:
            mask = select_mask(saliency, sparsity, per="matrix")
        else:
            mask = select_mask(saliency, nm=nm)
        pruned += int(mask.sum())
        for j in range(i2 - i1):
            i = i1 + j
            q = torch.where(mask[:, j], torch.zeros_like(W[:, i]), W[:, i])
            err = (W[:, i] - q) / U[i, i]
            W[:, i:] -= err.unsqueeze(1) * U[i, i:].unsqueeze(0)
            W[:, i] = q
    weight.copy_(W.to(weight.dtype))
    return pruned
