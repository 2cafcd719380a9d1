"""Vision backbones without a head (DINOv2's Dinov2Model): calibrated on images with the
embedding-sensitivity loss, every block matrix pruned, features compared with the dense model."""

import json

import pytest
import torch
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

from ecoflap_fast import data, objectives, walk
from ecoflap_fast.prune import PruneConfig, prune_


def _backbone():
    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=28, patch_size=7
    )
    processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28})
    return Dinov2Model(cfg).eval(), processor


def test_objective_and_batches_are_for_images():
    model, processor = _backbone()
    objective = objectives.for_model(model)
    assert objective.kind == "representation" and objective.images
    calib, _ = data.image_caption_pairs()
    batches = data.vlm_batches(calib[:5], processor, model, batch_size=2)
    assert [b["pixel_values"].shape for b in batches] == [(2, 3, 28, 28), (2, 3, 28, 28), (1, 3, 28, 28)]
    assert set(batches[0]) == {"pixel_values"}


@pytest.mark.parametrize("allocator", ["uniform", "ecoflap-zo"])
def test_every_block_matrix_is_pruned_and_nothing_else(allocator):
    model, processor = _backbone()
    calib, _ = data.image_caption_pairs()
    batches = data.vlm_batches(data.augment_pairs(calib, 16), processor, model, batch_size=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rep = prune_(model, batches, PruneConfig(sparsity=0.5, allocator=allocator, progress=False))
    plan = walk.plan(model, batches[0])
    names = set(plan.matrices())
    assert len(names) == 3 * 6  # query, key, value, attention output, fc1, fc2 per block
    for n, p in model.named_parameters():
        if n.endswith(".weight") and n[: -len(".weight")] in names:
            zero = float((p == 0).float().mean())
            assert 0.35 <= zero <= 0.65, (n, zero)  # pruned at its block's sparsity
        else:
            assert torch.equal(p, before[n]), n  # embeddings, norms, layer scales, biases untouched
    assert rep["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    if allocator == "ecoflap-zo":
        assert rep["stage1"]["split_half_spearman"] is None or -1 <= rep["stage1"]["split_half_spearman"] <= 1


def test_cli_prunes_a_backbone_folder_and_compares_features(tmp_path, capsys):
    from ecoflap_fast.cli import main

    model, processor = _backbone()
    folder = tmp_path / "dino"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    out = tmp_path / "out"
    args = ["prune", "--model", str(folder), "--sparsity", "0.5", "--eval", "--output", str(out), "--no-progress"]
    assert main(args + ["--allocator", "ecoflap-zo", "--nsamples", "8"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["eval_metric"] == "embedding_cosine"
    assert 0 < rep["cosine_pruned"] < 1
    assert rep["stage1"]["split_half_spearman"] is not None  # two stage-1 batches, as for token windows
    assert "embedding cosine" in capsys.readouterr().out


@pytest.mark.parametrize("allocator", ["uniform", "ecoflap-zo"])
def test_cli_stream_reads_a_folder_saved_under_the_names_transformers_renames(tmp_path, allocator):
    """save_pretrained writes DINOv2's attention as ``attention.attention.query`` (the hub names) and
    transformers renames them to ``attention.q_proj`` on load: a streamed run reads them through the same
    renaming and writes the same pruned tensors as an in-memory run, with the same report."""
    from safetensors import safe_open

    from ecoflap_fast import checkpoint
    from ecoflap_fast.cli import main

    model, processor = _backbone()
    folder = tmp_path / "dino"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "encoder.layer.0.attention.attention.query.weight" in stored  # the case this test is about
    assert "encoder.layer.0.attention.q_proj.weight" in model.state_dict()
    common = ["prune", "--model", str(folder), "--sparsity", "0.5", "--nsamples", "8", "--no-progress"]
    common += ["--allocator", allocator, "--eval"]
    assert main(common + ["--output", str(tmp_path / "mem"), "--no-stream", "--save-model"]) == 0
    assert main(common + ["--output", str(tmp_path / "str"), "--stream"]) == 0
    ra, rb = (json.loads((tmp_path / o / "report.json").read_text()) for o in ("mem", "str"))
    assert rb["streamed"] and not ra["streamed"]
    assert ra["layer_sparsity"] == rb["layer_sparsity"] and ra["cosine_pruned"] == rb["cosine_pruned"]
    a, b = (checkpoint.Checkpoint(tmp_path / o / "model") for o in ("mem", "str"))
    assert set(a.files) == set(b.files) and all(torch.equal(a.get(n), b.get(n)) for n in a.files)
    loaded, info = Dinov2Model.from_pretrained(tmp_path / "str" / "model", output_loading_info=True)
    assert not any(info.values())


def test_stream_refuses_a_tensor_stored_under_both_names(tmp_path, capsys):
    """A checkpoint holding the same model tensor under its own name and under a name transformers
    renames to it: which one a load takes depends on transformers' order, so --stream refuses it."""
    from safetensors.torch import load_file, save_file

    from ecoflap_fast.cli import main

    model, processor = _backbone()
    folder = tmp_path / "dino"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    hub = "encoder.layer.0.attention.attention.query.weight"
    tensors["encoder.layer.0.attention.q_proj.weight"] = torch.full_like(tensors[hub], 7.0)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    args = ["prune", "--model", str(folder), "--sparsity", "0.5", "--nsamples", "8", "--no-progress", "--stream"]
    capsys.readouterr()  # what saving the folder printed
    assert main(args + ["--output", str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "stores encoder.layer.0.attention.q_proj.weight twice" in errors[0]
    assert not (tmp_path / "out").exists()
