"""Every supported architecture, pruned by the engine, against the naive whole-model oracle.

For each tiny random model of the real transformers class (``arch_zoo``): uniform Wanda at 0.5 by
``prune_`` and by ``naive_reference.naive_wanda_`` (whole-model forwards, earlier blocks already
pruned, hooks on every weight, no walk): the masks agree >= 0.998 per matrix (expert slices each),
both prune the same matrices, zeros over every block matrix (experts and dense routers included) are
within 0.03 of the target, the dense parameters the report names are untouched, and expert token
counts and the magnitude fallback for a starved expert are the oracle's. ECoFLaP-zo hits the
target on every class too.
"""

from __future__ import annotations

import pytest
import torch
from arch_zoo import ALL_NAMES, DEAD_EXPERT, MOE_NAMES, ZOO_NAMES, B, block_lists, build
from naive_reference import block_zero_fraction, mask_agreement, naive_wanda_, param_name

from ecoflap_fast import PruneConfig, prune_

SPARSITY = 0.5
AGREEMENT = 0.998


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=ALL_NAMES)
def pruned_pair(request):
    name = request.param
    engine, batches = build(name)
    naive, _ = build(name)
    dense, _ = build(name)
    report = prune_(engine, batches, PruneConfig(sparsity=SPARSITY, allocator="uniform", batch_size=B, progress=False))
    oracle = naive_wanda_(naive, batches, SPARSITY, block_lists(name))
    return name, engine, naive, dense, report, oracle


def test_masks_agree_with_the_naive_reference(pruned_pair):
    name, engine, naive, _, report, oracle = pruned_pair
    ours = {param_name(n) for n in report["layer_sparsity"]}
    assert ours == set(oracle["pruned"]), (name, sorted(ours ^ set(oracle["pruned"]))[:5])
    agree = mask_agreement(engine, naive, sorted(oracle["pruned"]))
    worst = min(agree, key=agree.get)
    assert agree[worst] >= AGREEMENT, (name, worst, agree[worst])


def test_coverage_and_dense_parameters(pruned_pair):
    name, engine, _, dense, report, _ = pruned_pair
    assert block_zero_fraction(engine, block_lists(name)) == pytest.approx(SPARSITY, abs=0.03)
    assert report["achieved_sparsity"] == pytest.approx(SPARSITY, abs=0.01)
    assert report["plan"]["coverage_of_block_matrices"] >= 0.8
    pruned = {param_name(n).split("[")[0] for n in report["layer_sparsity"]}
    named_dense = {n for d in report["dense"].values() for n in d["names"]}
    fresh = dict(dense.named_parameters())
    for pname, p in engine.named_parameters():
        if pname in pruned:
            continue
        assert pname in named_dense, (name, pname, "neither pruned nor named dense")
        assert torch.equal(p, fresh[pname]), (name, pname, "a dense parameter changed")
    if name in MOE_NAMES:
        assert report["dense"]["router"]["names"], name


def test_expert_tokens_and_starved_expert(pruned_pair):
    name, _, _, _, report, oracle = pruned_pair
    assert report["expert_tokens"] == oracle["expert_tokens"]
    assert bool(report["expert_tokens"]) == (name in MOE_NAMES)
    starved = sorted(report["no_calibration_input"]["matrices"])
    assert starved == sorted(oracle["magnitude_pruned"])
    if name == "mixtral-dead-expert":
        block, expert = DEAD_EXPERT
        assert starved == sorted(
            f"model.layers.{block}.mlp.experts.{p}[{expert}]" for p in ("down_proj", "gate_up_proj")
        )


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_ecoflap_zo_hits_the_target(name):
    model, batches = build(name)
    rep = prune_(
        model,
        batches,
        PruneConfig(sparsity=SPARSITY, allocator="ecoflap-zo", batch_size=B, progress=False),
        stage1_calibration=batches[:2],
    )
    assert rep["stage1"]["method"].startswith("ECoFLaP stage 1")
    assert not rep["stage1"]["fallback"], rep["stage1"]["fallback"]
    assert len(set(rep["sparsity_map"].values())) > 1  # non-uniform
    assert block_zero_fraction(model, block_lists(name)) == pytest.approx(SPARSITY, abs=0.03)
