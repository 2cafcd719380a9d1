"""In-place ops refuse what autograd tracks (a tensor that requires grad, or a view of one) and every
op refuses meta tensors, with an error naming the argument and every input left unmodified; a
detached alias written in place bumps the version counter, so a pending backward fails loudly
instead of using the pruned values."""

import pytest
import torch

from ecoflap_fast import ops

S = torch.rand(16)


def _inplace_calls(w):
    return {
        "wanda_prune_": lambda: ops.wanda_prune_(w, S, 0.5),
        "wanda_prune_-2:4": lambda: ops.wanda_prune_(w, S, nm=(2, 4)),
        "prune_by_scores_": lambda: ops.prune_by_scores_(w, torch.rand(w.shape), 0.5),
    }


@pytest.mark.parametrize("op", ["wanda_prune_", "wanda_prune_-2:4", "prune_by_scores_"])
@pytest.mark.parametrize("kind", ["parameter", "leaf", "view-of-parameter", "non-leaf"])
def test_inplace_ops_refuse_tensors_autograd_tracks(op, kind):
    p = torch.nn.Parameter(torch.randn(8, 32))
    w = {
        "parameter": p,
        "leaf": torch.randn(8, 16, requires_grad=True),
        "view-of-parameter": p[:, :16],
        "non-leaf": p[:, :16] * 2,
    }[kind]
    before = w.detach().clone()
    with pytest.raises(TypeError, match="weight requires grad .* corrupt its gradients"):
        _inplace_calls(w)[op]()
    assert torch.equal(w.detach(), before), "a refused op changed its input"


def test_inplace_ops_accept_data_and_detached_views():
    p = torch.nn.Parameter(torch.randn(8, 16))
    assert ops.wanda_prune_(p.data, S, 0.5) == 64
    assert ops.prune_by_scores_(p.detach()[:, :8], torch.rand(8, 8), 0.5) == 32


def test_a_pending_backward_sees_the_write_and_fails_loudly():
    """Before, pruning the detached alias of a weight between forward and backward silently produced
    gradients of weights that no longer existed."""
    w = torch.randn(8, 16, requires_grad=True)
    y = (torch.randn(4, 16, requires_grad=True) @ w.t()).pow(2).sum()  # saves w for the input's gradient
    ops.wanda_prune_(w.detach(), S, 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


META_CALLS = {
    "wanda_prune_": lambda: ops.wanda_prune_(torch.empty(8, 16, device="meta"), torch.empty(16, device="meta"), 0.5),
    "wanda_mask": lambda: ops.wanda_mask(torch.empty(8, 16, device="meta"), torch.empty(16, device="meta"), 0.5),
    "wanda_scores": lambda: ops.wanda_scores(torch.empty(8, 16, device="meta"), torch.empty(16, device="meta")),
    "select_mask": lambda: ops.select_mask(torch.empty(8, 16, device="meta"), 0.5),
    "prune_by_scores_": lambda: ops.prune_by_scores_(
        torch.empty(8, 16, device="meta"), torch.empty(8, 16, device="meta"), 0.5
    ),
    "col_sq_norms": lambda: ops.col_sq_norms(torch.empty(4, 16, device="meta")),
    "pack_bitmask": lambda: ops.pack_bitmask(torch.empty(8, 16, device="meta")),
    "pack_24_cutlass": lambda: ops.pack_24_cutlass(torch.empty(32, 64, dtype=torch.half, device="meta")),
    "unpack_bitmask": lambda: ops.unpack_bitmask(
        torch.empty(4, device="meta"), torch.empty(2, 1, dtype=torch.uint8, device="meta"), (2, 8)
    ),
}


@pytest.mark.parametrize("op", list(META_CALLS))
def test_meta_tensors_are_refused_naming_the_argument(op):
    with pytest.raises(ValueError, match=r"^(weight|scores|x|dense|values) is a meta tensor \(it has no data\)"):
        META_CALLS[op]()


def test_a_meta_statistic_with_a_real_weight_names_the_devices():
    w = torch.randn(8, 16)
    before = w.clone()
    with pytest.raises(ValueError, match="tensors must be on one device"):
        ops.wanda_prune_(w, torch.empty(16, device="meta"), 0.5)
    assert torch.equal(w, before)
