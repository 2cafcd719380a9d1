"""Stage 1 against a naive full-model reference on every class of the zoo: for each calibration
batch, one whole-model forward and backward of the model's own loss (no walk, no hooks), then
|<z, g>| per matrix with the same z, and the block sums. Block scores: Spearman >= 0.99; per matrix:
within float noise. The noise-free estimator is the large-draw limit of the one-draw estimator."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from arch_zoo import ZOO_NAMES, block_lists, build
from naive_reference import _SLICE, prunable_names

from ecoflap_fast import stage1, walk
from ecoflap_fast.noise import noise_like, noise_seed
from ecoflap_fast.prune import spearman

pytestmark = pytest.mark.usefixtures("one_thread")


def _own_loss(model, batch):
    """The model's own training loss on a batch, written here: next-token CE (decoders), the
    decoder's labels (T5), masked-token CE on 15% of positions replaced (masked LMs)."""
    name = type(model).__name__
    if name.endswith("ForMaskedLM"):
        g = torch.Generator().manual_seed(7919)  # the engine's corruption convention, first batch
        ids = batch["input_ids"]
        where = torch.rand(ids.shape, generator=g) < 0.15
        where[:, 0] |= ~where.any(1)
        rnd = torch.randint(0, model.config.vocab_size, ids.shape, generator=g)
        logits = model(input_ids=torch.where(where, rnd, ids), attention_mask=batch.get("attention_mask")).logits
        per = [F.cross_entropy(logits[r][where[r]], ids[r][where[r]]) for r in range(ids.shape[0])]
        return torch.stack(per).mean()
    if getattr(model.config, "is_encoder_decoder", False):
        out = model(**batch, use_cache=False)
        dec = batch["decoder_input_ids"]
        ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), dec[:, 1:].reshape(-1))
        return ce
    logits = model(**batch, use_cache=False).logits
    ids = batch["input_ids"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _naive_terms(model, batches, names, order, seed):
    """{batch: {name: |<z, g>|}} from whole-model backward passes; z from the shared seed convention."""
    out = {}
    for b, batch in enumerate(batches):
        model.zero_grad(set_to_none=True)
        _own_loss(model, batch).backward()
        out[b] = {}
        for name in names:
            m = _SLICE.match(name)
            if m:
                g = model.get_parameter(m.group(1)).grad[int(m.group(2))]
                key = name
            else:
                p = model.get_parameter(f"{name}.weight")
                g = p.grad.t() if type(model.get_submodule(name)).__name__ == "Conv1D" else p.grad
                key = name
            z = noise_like(g.float(), noise_seed(seed, order[key], b))
            out[b][key] = abs(float((z * g.float()).sum()))
    model.zero_grad(set_to_none=True)
    return out


def _block_of(name: str, paths: list[str]) -> str:
    for p in paths:
        if name.startswith(p + "."):
            return ".".join(name.split(".")[: p.count(".") + 2])
    raise KeyError(name)


# the masked-LM corruption is drawn per batch; the naive loss reproduces the first batch's only
SINGLE_BATCH = {"bert", "roberta"}


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_block_scores_match_a_naive_full_model_reference(name):
    model, batches = build(name)
    batches = batches[:1] if name in SINGLE_BATCH else batches[:2]
    paths = block_lists(name)
    plan = walk.plan(model, batches[0])
    order = {n: i for i, n in enumerate(plan.matrices())}  # the seed index of each matrix: a convention
    naive_names = [n[: -len(".weight")] if n.endswith(".weight") else n for n in prunable_names(model, paths)]
    naive_names = [n[: -len(".weight")] if n.endswith(".weight") else n for n in naive_names]
    assert set(naive_names) == set(order)
    fast = stage1.zo_grad_scores(model, batches, plan=plan, seed=11, progress=False)
    naive = _naive_terms(model, batches, naive_names, order, seed=11)
    for n in naive_names:
        want = sum(naive[b][n] for b in naive)
        assert fast[n] == pytest.approx(want, rel=1e-4, abs=1e-7), (name, n, fast[n], want)
    blocks = sorted({_block_of(n, paths) for n in naive_names})
    fb = [sum(v for n, v in fast.items() if _block_of(n, paths) == blk) for blk in blocks]
    nb = [sum(naive[b][n] for b in naive for n in naive_names if _block_of(n, paths) == blk) for blk in blocks]
    assert spearman(fb, nb) >= 0.99, (name, fb, nb)


def test_expected_estimator_is_the_limit_of_many_draws():
    model, batches = build("llama")
    plan = walk.plan(model, batches[0])
    exp = stage1.zo_grad_scores(model, batches[:1], plan=plan, expected=True, progress=False)
    many = stage1.zo_grad_scores(model, batches[:1], plan=plan, draws=400, seed=3, progress=False)
    one = [stage1.zo_grad_scores(model, batches[:1], plan=plan, seed=s, progress=False) for s in range(4)]
    for n in exp:  # sqrt(2/pi)|g| is E|<z, g>|; 400 draws land within a few percent of it, one draw does not
        assert many[n] == pytest.approx(exp[n], rel=0.12), n
    rel_one = [abs(o[n] - exp[n]) / exp[n] for o in one for n in exp]
    rel_many = [abs(many[n] - exp[n]) / exp[n] for n in exp]
    assert sum(rel_many) / len(rel_many) < 0.25 * sum(rel_one) / len(rel_one)
    again = stage1.zo_grad_scores(model, batches[:1], plan=plan, expected=True, seed=99, progress=False)
    assert again == exp  # no noise, no seed


def test_split_half_agreement_is_reported():
    from ecoflap_fast import PruneConfig, prune_

    model, batches = build("llama")
    extra = build("llama", seed=1)[1]
    rep = prune_(
        model,
        batches,
        PruneConfig(sparsity=0.5, allocator="ecoflap-zo", progress=False),
        stage1_calibration=batches + extra,
    )
    info = rep["stage1"]
    assert "expectation over the noise" in info["method"]
    assert -1 <= info["split_half_spearman"] <= 1
    assert math.isfinite(info["split_half_spearman"])


def test_split_half_agreement_ranks_what_is_allocated():
    from ecoflap_fast.prune import split_half_agreement

    # three groups of sizes 1, 10, 100; the halves order the sums differently but the averages alike
    groups = {"a": ["a.w"], "b": ["b.w"], "c": ["c.w"]}
    batches = {0: {"a.w": 1.0, "b.w": 20.0, "c.w": 50.0}, 1: {"a.w": 1.0, "b.w": 30.0, "c.w": 25.0}}
    assert split_half_agreement(batches, groups, ["a", "b", "c"]) == pytest.approx(0.5)
    assert split_half_agreement(batches, groups, ["a", "b", "c"], sizes=[1, 10, 100]) == pytest.approx(1.0)


def test_allocation_reports_the_split_half_of_averaged_scores(monkeypatch):
    """Per-tensor groups of different sizes with group_reduce="avg": the reported agreement is that of
    the per-parameter scores the allocation uses, not of the sums (halves built so the two differ)."""
    from ecoflap_fast import PruneConfig, objectives, prune, stage1
    from ecoflap_fast.prune import spearman

    model, batches = build("llama")
    plan = walk.plan(model, batches[0])
    mats = plan.matrices()
    names = sorted(mats, key=lambda n: mats[n].numel)
    sizes = {n: mats[n].numel for n in names}
    g = torch.Generator().manual_seed(0)
    # per-parameter scores drawn independently for the two halves, in a narrow range: the averages
    # disagree, while the sums follow the sizes and agree
    halves = {h: {n: (1 + 0.1 * float(torch.rand((), generator=g))) * sizes[n] for n in names} for h in (0, 1)}
    fake = stage1.Stage1Result(
        tensor_scores={n: halves[0][n] + halves[1][n] for n in names}, method="fake", seconds=0.0, batch_scores=halves
    )
    monkeypatch.setattr(stage1, "tensor_scores", lambda *a, **k: fake)
    cfg = PruneConfig(sparsity=0.5, allocator="ecoflap-zo", group="tensor", group_reduce="avg", progress=False)
    _, info = prune.allocate(model, plan, cfg, batches, batches, objectives.for_model(model))
    keys = list(info["group_scores"])
    want = spearman([halves[0][k] / sizes[k] for k in keys], [halves[1][k] / sizes[k] for k in keys])
    sums = spearman([halves[0][k] for k in keys], [halves[1][k] for k in keys])
    assert sums - want > 0.3  # the case this test is about
    assert info["split_half_spearman"] == pytest.approx(want)


def _bare_encoder(kind: str):
    from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel

    torch.manual_seed(0)
    shape = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    if kind == "bert":
        return BertModel(BertConfig(**shape), add_pooling_layer=False).eval(), "encoder.layer"
    if kind == "dinov2":  # a bare vision encoder (DINOv2's backbone): the same loss on pixel inputs
        from transformers import Dinov2Config, Dinov2Model

        vision = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=28)
        return Dinov2Model(Dinov2Config(patch_size=7, **vision)).eval(), "encoder.layer"
    return MPNetModel(MPNetConfig(**shape), add_pooling_layer=False).eval(), "encoder.layer"


def _encoder_batches(kind: str, g: torch.Generator) -> list[dict]:
    if kind == "dinov2":
        return [{"pixel_values": torch.randn(2, 3, 28, 28, generator=g)} for _ in range(2)]
    return [{"input_ids": torch.randint(3, 96, (2, 10), generator=g)} for _ in range(2)]


@pytest.mark.parametrize("kind", ["bert", "mpnet", "dinov2"])
def test_bare_encoder_scores_match_a_naive_embedding_sensitivity(kind):
    """Encoders without a head (sentence embedders, vision backbones): the naive loss, written here,
    is <u, e> per sequence with e the unit-length mean of the last hidden states and u ~ N(0, I) from
    the engine's per-batch seed."""
    model, path = _bare_encoder(kind)
    g = torch.Generator().manual_seed(5)
    batches = _encoder_batches(kind, g)
    plan = walk.plan(model, batches[0])
    names = list(plan.matrices())
    assert len(names) == 3 * 6  # q, k, v, attention output, intermediate, output per block
    fast = stage1.zo_grad_scores(model, batches, plan=plan, expected=True, progress=False)
    want = dict.fromkeys(names, 0.0)
    for b, batch in enumerate(batches):
        model.zero_grad(set_to_none=True)
        h = model(**batch).last_hidden_state
        e = h.mean(1) / h.mean(1).norm(dim=-1, keepdim=True)
        u = torch.randn(e.shape, generator=torch.Generator().manual_seed(7919 * (b + 1)))
        (e * u).sum(-1).mean().backward()
        for n in names:
            want[n] += math.sqrt(2 / math.pi) * float(model.get_parameter(f"{n}.weight").grad.norm())
    for n in names:
        assert fast[n] == pytest.approx(want[n], rel=1e-4), n
    blocks = [[n for n in names if n.startswith(f"{path}.{i}.")] for i in range(3)]
    assert spearman([sum(fast[n] for n in b) for b in blocks], [sum(want[n] for n in b) for b in blocks]) >= 0.99
