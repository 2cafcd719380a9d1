"""Checks of the naive Wanda oracle (``naive_reference.py``) on the architecture zoo (``arch_zoo.py``).

(a) every zoo model builds, runs, and the oracle prunes every block matrix it lists at the target;
(b) on Llama and OPT the oracle agrees with the current engine (``ecoflap_fast.prune_``, public API);
(c) on Gemma-2 a deliberately wrong variant (block 0's attention mask given to every block) is
    caught, far above the float-order noise floor;
(d) the dead-expert Mixtral really starves one expert and the oracle flags it.

``naive_reference.mask_agreement`` and ``block_zero_fraction`` serve the engine's comparison test too.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from arch_zoo import ALL_NAMES, DEAD_EXPERT, MOE_NAMES, block_lists, build
from naive_reference import (
    _SLICE,
    _param,
    block_zero_fraction,
    expert_inputs,
    mask_agreement,
    naive_wanda_,
    prunable_names,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

import ecoflap_fast
from ecoflap_fast import reference

SPARSITY = 0.5
AGREEMENT = 0.998  # SPEC §7: engine masks agree with the oracle >= 0.998 per weight

def _block_params(model, block_paths) -> dict[str, torch.Tensor]:
    out = {}
    for path in block_paths:
        for name, p in model.get_submodule(path).named_parameters():
            out[f"{path}.{name}"] = p
    return out


@pytest.fixture
def seed():
    """The zoo seed of every test here (weights and batches)."""
    return 0


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The zoo's matrices are tiny: one intra-op thread is faster than two, and it does not stall when
    other processes share the two cores. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    yield
    torch.set_num_threads(threads)
    print(f"\ntest_naive_reference: {time.perf_counter() - t0:.1f}s")


# ---------------------------------------------------------------------------------------------- (a)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_zoo_builds_and_oracle_prunes_every_block_matrix(name, seed):
    model, batches = build(name, seed=seed)
    assert type(model).__module__.startswith("transformers.models."), type(model)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    paths = block_lists(name)
    for path in paths:
        blocks = model.get_submodule(path)
        assert isinstance(blocks, nn.ModuleList) and len(blocks) >= 2, path
    with torch.no_grad():
        for batch in batches:
            logits = model(**batch).logits
            assert torch.isfinite(logits).all() and logits.abs().sum() > 0

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    listed = prunable_names(model, paths)
    res = naive_wanda_(model, batches, SPARSITY, paths)

    # every listed matrix pruned, exactly floor(in * s) per output row
    assert list(res["pruned"]) == listed
    for key in listed:
        w = _param(model, key)
        rows = w.t() if isinstance(model.get_submodule(key.rsplit(".", 1)[0]), Conv1D) else w
        per_row = (rows == 0).sum(dim=1)
        k = int(rows.shape[1] * SPARSITY)
        assert (per_row == k).all(), (key, per_row.tolist()[:8], k)
    # coverage: every dim >= 2 block parameter is pruned or reported dense; dense ones untouched
    block = _block_params(model, paths)
    dense = dict(res["dense_in_blocks"])
    pruned_params = {_SLICE.sub(r"\1", k) for k in listed}
    for pname, p in block.items():
        if p.dim() < 2:
            continue
        assert (pname in pruned_params) != (pname in dense), pname
        if pname in dense:
            assert torch.equal(p, before[pname]), f"dense {pname} was modified"
    for pname, p in model.named_parameters():
        if pname not in block:
            assert torch.equal(p, before[pname]), f"{pname} outside the blocks was modified"
    zeros = sum(int((_param(model, k) == 0).sum()) for k in listed)
    total = sum(_param(model, k).numel() for k in listed)
    assert abs(zeros / total - SPARSITY) <= 0.01
    assert abs(block_zero_fraction(model, paths) - SPARSITY) <= 0.01

    if name in MOE_NAMES:
        starved = [k for k, n in res["expert_tokens"].items() if n == 0]
        assert res["expert_tokens"] and starved == res["magnitude_pruned"]
        if name == "mixtral-dead-expert":
            ename = f"model.layers.{DEAD_EXPERT[0]}.mlp.experts"
            assert starved == [f"{ename}.{p}[{DEAD_EXPERT[1]}]" for p in ("gate_up_proj", "down_proj")]
        else:
            assert not starved, starved
        assert any("router" in why for why in dense.values())
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits).all()


def test_conv1d_is_pruned_per_output_row(seed):
    """GPT-2's Conv1D stores [in, out]: the rule runs on the transpose, so each output column of the
    stored weight (a row of W.T) loses exactly half its entries, with the in-features statistic."""
    model, batches = build("gpt2", seed=seed)
    dense = copy.deepcopy(model)
    naive_wanda_(model, batches, SPARSITY, block_lists("gpt2"))
    conv = model.transformer.h[0].mlp.c_fc
    assert conv.weight.shape == (64, 256)  # [in, out]
    assert ((conv.weight == 0).sum(dim=0) == 32).all()
    # block 0 sees the dense model's inputs: redo its statistic with a plain hook
    acc = reference.ActNormAccumulator(64)
    h = dense.transformer.h[0].mlp.c_fc.register_forward_pre_hook(lambda m, a: acc.add(a[0]))
    with torch.no_grad():
        for b in batches:
            dense(**b)
    h.remove()
    mask = reference.wanda_mask(dense.transformer.h[0].mlp.c_fc.weight.t(), acc.scaler_row, SPARSITY)
    assert torch.equal(mask, conv.weight.t() == 0)


def test_block0_linear_matches_plain_hook(seed):
    """Block 0's inputs do not depend on any pruning: its masks equal Wanda with a plain hook."""
    model, batches = build("llama", seed=seed)
    dense = copy.deepcopy(model)
    naive_wanda_(model, batches, SPARSITY, block_lists("llama"))
    for lname in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        lin = dense.model.layers[0].get_submodule(lname)
        acc = reference.ActNormAccumulator(lin.in_features)
        h = lin.register_forward_pre_hook(lambda m, a: acc.add(a[0]))
        with torch.no_grad():
            for b in batches:
                dense(**b)
        h.remove()
        mask = reference.wanda_mask(lin.weight, acc.scaler_row, SPARSITY)
        assert torch.equal(mask, model.model.layers[0].get_submodule(lname).weight == 0), lname


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3"])
def test_expert_math_restates_the_module(name, seed):
    """The per-expert inputs the oracle recomputes give back the experts module's own output:
    sum_e index_add(w_{t,e} * down_proj[e](h_e)) equals what the module returned."""
    model, batches = build(name, seed=seed)
    seen = []

    def grab(mod, args, kwargs, out):
        seen.append((mod, args, kwargs, out))

    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    assert experts
    handles = [m.register_forward_hook(grab, with_kwargs=True) for m in experts]
    with torch.no_grad():
        model(**batches[0])
    for h in handles:
        h.remove()
    assert len(seen) == len(experts)
    for mod, args, kwargs, out in seen:
        hidden, top_k_index, top_k_weights = args
        recon = torch.zeros_like(hidden)
        for e, (rows, _x_e, h_e) in expert_inputs(mod, args, kwargs).items():
            pos = (top_k_index[rows] == e).float().argmax(dim=-1)
            y = nn.functional.linear(h_e, mod.down_proj[e]) * top_k_weights[rows, pos, None]
            recon.index_add_(0, rows, y)
        torch.testing.assert_close(recon, out, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- (b)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_oracle_agrees_with_current_engine(name, seed):
    model, batches = build(name, seed=seed)
    engine = copy.deepcopy(model)
    res = naive_wanda_(model, batches, SPARSITY, block_lists(name))
    ecoflap_fast.prune_(
        engine,
        torch.cat([b["input_ids"] for b in batches]),
        ecoflap_fast.PruneConfig(sparsity=SPARSITY, allocator="uniform", batch_size=4, progress=False),
    )
    agree = mask_agreement(model, engine, list(res["pruned"]))
    worst = min(agree, key=agree.get)
    print(f"\n{name}: oracle vs engine, {len(agree)} weights, min agreement {agree[worst]:.6f} ({worst})")
    assert all(a >= AGREEMENT for a in agree.values()), {k: a for k, a in agree.items() if a < AGREEMENT}
    assert block_zero_fraction(engine, block_lists(name)) == pytest.approx(SPARSITY, abs=0.01)


# ---------------------------------------------------------------------------------------------- (c)


class _Block0MaskEverywhere:
    """The bug the engine used to have: every block of ``path`` gets block 0's attention mask (a
    sliding-window mask for Gemma-2's global blocks), within the same forward."""

    def __init__(self, model, path):
        self.blocks = model.get_submodule(path)
        self.mask = None

    def __enter__(self):
        def first(_m, args, kwargs):
            self.mask = kwargs["attention_mask"]

        def later(_m, args, kwargs):
            return args, {**kwargs, "attention_mask": self.mask}

        self.handles = [self.blocks[0].register_forward_pre_hook(first, with_kwargs=True)]
        self.handles += [b.register_forward_pre_hook(later, with_kwargs=True) for b in self.blocks[1:]]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_wrong_mask_variant_is_detected_on_gemma2(seed):
    model, batches = build("gemma2", seed=seed)
    paths = block_lists("gemma2")
    right, noisy, wrong = model, copy.deepcopy(model), copy.deepcopy(model)
    res = naive_wanda_(right, batches, SPARSITY, paths)
    names = list(res["pruned"])
    # noise floor: the same oracle with the calibration set as one batch of 12 in reverse order
    # (different matmul shapes and summation order, same math)
    one = {"input_ids": torch.cat([b["input_ids"] for b in batches]).flip(0)}
    naive_wanda_(noisy, [one], SPARSITY, paths)
    with _Block0MaskEverywhere(wrong, paths[0]):
        naive_wanda_(wrong, batches, SPARSITY, paths)
    noise = mask_agreement(right, noisy, names)
    bad = mask_agreement(right, wrong, names)
    floor = 1 - min(noise.values())
    block0 = [k for k in names if k.startswith(f"{paths[0]}.0.")]
    later = [k for k in names if k not in block0]
    worst = min(later, key=bad.get)
    mean_later = sum(1 - bad[k] for k in later) / len(later)
    print(f"\ngemma2: noise floor {floor:.6f}; wrong variant: block 0 min agreement "
          f"{min(bad[k] for k in block0):.6f}, later blocks min {bad[worst]:.4f} ({worst}), "
          f"mean disagreement {mean_later:.4f}")
    assert floor <= 1 - AGREEMENT
    assert all(bad[k] == 1.0 for k in block0)  # block 0 is computed the same way
    assert 1 - bad[worst] > max(10 * floor, 10 * (1 - AGREEMENT)), (bad[worst], floor)
    # the bug shows where it lives: the global blocks' attention output projection
    assert bad[f"{paths[0]}.1.self_attn.o_proj.weight"] < AGREEMENT


# ---------------------------------------------------------------------------------------------- (d)


def test_dead_expert_is_flagged_and_magnitude_pruned(seed):
    model, batches = build("mixtral-dead-expert", seed=seed)
    block, expert = DEAD_EXPERT
    ename = f"model.layers.{block}.mlp.experts"
    dead = [f"{ename}.gate_up_proj[{expert}]", f"{ename}.down_proj[{expert}]"]
    before = {k: _param(model, k).clone() for k in dead}
    res = naive_wanda_(model, batches, SPARSITY, block_lists("mixtral-dead-expert"))
    print(f"\nmixtral-dead-expert: tokens per expert of block {block}: "
          f"{[res['expert_tokens'][f'{ename}.gate_up_proj[{e}]'] for e in range(6)]}")
    assert res["magnitude_pruned"] == dead
    assert all(res["expert_tokens"][k] == 0 for k in dead)
    assert all(n > 0 for k, n in res["expert_tokens"].items() if k not in dead)
    for k in dead:
        w = before[k]
        assert torch.equal(_param(model, k) == 0, reference.select_mask(w.abs(), SPARSITY)), k
        assert res["pruned"][k] == SPARSITY
