"""Stage 1 on every kind of model: the objectives are the models' own losses, and the fast finite
differences (blocks before the perturbed one skipped, cached inputs, batched ± shifts, per-expert
weight perturbations) equal the plain reference (one full forward per perturbation)."""

from __future__ import annotations

import math

import pytest
import torch
from arch_zoo import build

from ecoflap_fast import objectives, stage1, walk
from ecoflap_fast.reference import stage1 as ref_stage1

pytestmark = pytest.mark.usefixtures("one_thread")


def test_objectives_are_the_models_own_losses():
    with torch.no_grad():
        model, batches = build("llama")
        obj = objectives.for_model(model)
        assert obj.kind == "causal-lm"
        own = model(**batches[0], labels=batches[0]["input_ids"]).loss
        assert float(obj.loss(model, batches[0])) == pytest.approx(float(own), rel=1e-5)

        model, batches = build("t5")
        obj = objectives.for_model(model)
        assert obj.kind == "seq2seq"
        ids = batches[0]["input_ids"]
        batch = obj.from_ids(ids)
        own = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        assert float(obj.loss(model, batch)) == pytest.approx(float(own), rel=1e-5)

        model, batches = build("bert")
        obj = objectives.for_model(model)
        assert obj.kind == "masked-lm"
        (prepared,) = obj.prepare(model, batches[:1])
        labels = torch.where(prepared["_where"], prepared["_clean"], torch.full_like(prepared["_clean"], -100))
        own = model(**obj.inputs(prepared), labels=labels).loss
        # the objective averages per sequence, the model over all masked tokens: equal when every
        # sequence has the same number of masked positions, so compare per sequence instead
        per = obj.per_sample(model(**obj.inputs(prepared)), prepared)
        logits = model(**obj.inputs(prepared)).logits
        for r in range(per.shape[0]):
            w = prepared["_where"][r]
            ce = torch.nn.functional.cross_entropy(logits[r][w], prepared["_clean"][r][w])
            assert float(per[r]) == pytest.approx(float(ce), rel=1e-5)
        assert float(own) > 0

    from transformers import BertConfig, BertModel

    bare = BertModel(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    ).eval()
    obj = objectives.for_model(bare)
    assert obj.kind == "representation" and "sentence embedding" in obj.description
    ids = torch.randint(3, 64, (2, 12))
    (prepared,) = obj.prepare(bare, [{"input_ids": ids}])
    assert torch.equal(prepared["input_ids"], ids)  # the clean inputs
    loss = obj.loss(bare, prepared)
    # written here: <u, e> with e the unit-length mean of the last hidden states, u ~ N(0, I) per sequence
    with torch.no_grad():
        h = bare(input_ids=ids).last_hidden_state
        e = h.mean(1) / h.mean(1).norm(dim=-1, keepdim=True)
        u = torch.randn(e.shape, generator=torch.Generator().manual_seed(prepared["_direction_seed"]))
    assert torch.allclose(loss.detach(), (e * u).sum(-1).mean(), atol=1e-6)
    bare.zero_grad()
    loss.backward()  # not zero at the dense weights, in every block
    for layer in bare.encoder.layer:
        assert float(layer.intermediate.dense.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", ["gpt2", "gemma3", "mixtral", "t5", "bert", "falcon"])
def test_fast_fd_equals_plain_reference(name):
    model, batches = build(name)
    obj = objectives.for_model(model)
    batches = batches[:2]
    plan = walk.plan(model, batches[0])
    mats = plan.matrices()
    prepared = obj.prepare(model, batches)
    slow = ref_stage1.zo_tensor_scores(
        model, {n: m.weight() for n, m in mats.items()}, prepared, eps=1e-3, seed=4, loss_fn=obj.loss
    )
    fast = stage1.zo_fd_scores(model, batches, plan=plan, objective=obj, eps=1e-3, seed=4, progress=False)
    assert set(fast) == set(slow)
    with torch.no_grad():
        loss = max(float(obj.loss(model, b)) for b in prepared)
    quantum = len(batches) * 2.0 ** (math.floor(math.log2(loss)) - 23) / (2 * 1e-3)  # fp32 resolution
    for n in slow:
        assert abs(fast[n] - slow[n]) <= 0.01 * slow[n] + 8 * quantum, (name, n, fast[n], slow[n])
    fresh, _ = build(name)
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), (name, k, "not restored")


@pytest.mark.parametrize("name", ["gpt2", "mixtral", "t5", "bert"])
def test_gradient_estimator_tracks_finite_differences(name):
    model, batches = build(name)
    obj = objectives.for_model(model)
    plan = walk.plan(model, batches[0])
    fd = stage1.zo_fd_scores(model, batches[:2], plan=plan, objective=obj, seed=2, progress=False)
    gr = stage1.zo_grad_scores(model, batches[:2], plan=plan, objective=obj, seed=2, progress=False)
    rel = sorted(abs(gr[n] - fd[n]) / max(fd[n], 1e-12) for n in fd)
    assert rel[len(rel) // 2] < 0.02, (name, rel[len(rel) // 2])
    assert all(p.grad is None for p in model.parameters())
