"""CLIP-style models: both towers discovered and pruned in order under one global budget."""

import pytest
import torch
from tiny_models import clip_processors, tiny_clip

from ecoflap_fast import data, evaluate, walk
from ecoflap_fast.prune import PruneConfig, prune_


@pytest.fixture(scope="module")
def batches():
    image_processor, tokenizer = clip_processors()
    calib, held = data.image_text_pairs()
    assert len(calib) == 19 and len(held) == 7
    return (
        data.clip_batches(calib, image_processor, tokenizer, batch_size=8),
        data.clip_batches(held, image_processor, tokenizer, batch_size=8),
    )


def test_towers_found_in_forward_order(batches):
    plan = walk.plan(tiny_clip(), batches[0][0])
    assert sorted(s.path for s in plan.stacks) == ["text_model.encoder.layers", "vision_model.encoder.layers"]
    assert {s.name for s in plan.stacks} == {"vision", "text"}
    names = list(plan.matrices())
    assert not any("projection" in n or "embeddings" in n for n in names)


@pytest.mark.parametrize("allocator", ["uniform", "ecoflap-zo", "ecoflap-fo", "owl"])
def test_clip_prune_and_evaluate(batches, allocator):
    calib, held = batches
    model = tiny_clip()
    dense = evaluate.contrastive_loss(model, held, progress=False)
    rep = prune_(model, calib, PruneConfig(sparsity=0.5, allocator=allocator, progress=False, batch_size=8))
    pruned = evaluate.contrastive_loss(model, held, progress=False)
    assert rep["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)
    towers = {n.split(".")[0] for n in rep["layer_sparsity"]}
    assert towers == {"vision_model", "text_model"}
    assert all(s > 0.3 for s in rep["layer_sparsity"].values())  # every Linear of both towers pruned
    assert dense > 0 and pruned > 0
    # projection heads and embeddings stay dense
    fresh = tiny_clip()
    assert torch.equal(model.visual_projection.weight, fresh.visual_projection.weight)
    assert torch.equal(
        model.text_model.embeddings.token_embedding.weight, fresh.text_model.embeddings.token_embedding.weight
    )


def test_clip_zo_fd_matches_reference(batches):
    from ecoflap_fast import stage1
    from ecoflap_fast.reference import stage1 as ref_stage1

    calib, _ = batches
    model = tiny_clip()
    fast = stage1.zo_fd_scores(model, calib[:1], seed=3, progress=False)
    mats = walk.plan(model, calib[0]).matrices()
    slow = ref_stage1.zo_tensor_scores(model, {n: m.weight() for n, m in mats.items()}, calib[:1], seed=3)
    assert set(fast) == set(slow)
    for n in slow:  # weights perturbed one at a time; only the blocks before the perturbed one are skipped
        assert fast[n] == pytest.approx(slow[n], rel=1e-3, abs=1e-3), n


def test_cli_prunes_a_clip_folder(tmp_path, capsys):
    from ecoflap_fast.cli import main

    image_processor, tokenizer = clip_processors()
    folder = tmp_path / "clip"
    tiny_clip().save_pretrained(folder)
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    assert (
        main(
            [
                "prune",
                "--model",
                str(folder),
                "--sparsity",
                "0.4",
                "--eval",
                "--output",
                str(out),
                "--no-progress",
                "--allocator",
                "ecoflap-zo",
            ]
        )
        == 0
    )
    import json

    rep = json.loads((out / "report.json").read_text())
    assert rep["eval_metric"] == "contrastive_loss" and rep["loss_pruned"] > 0
    assert rep["achieved_sparsity"] == pytest.approx(0.4, abs=0.02)
    assert "contrastive loss" in capsys.readouterr().out
