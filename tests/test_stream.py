"""Streaming: a meta skeleton whose blocks are read from the checkpoint when the walk reaches them
gives exactly the in-memory results (weights written, scores, perplexity), holding about one block."""

from __future__ import annotations

import json

import pytest
import torch
from arch_zoo import build

from ecoflap_fast import PruneConfig, checkpoint, evaluate, models, prune_, stage1, stream, walk

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny Llama and Mixtral checkpoints in bf16, in two shards each (the index path)."""
    root = tmp_path_factory.mktemp("stream")
    out = {}
    for name in ("llama", "mixtral", "gemma3"):
        model, batches = build(name)
        checkpoint.save_model(model, root / name, dtype=torch.bfloat16, shard_bytes=60_000)
        out[name] = (root / name, batches)
    return out


def _written(folder):
    ck = checkpoint.Checkpoint(folder)
    return {n: ck.get(n) for n in ck.files}


@pytest.mark.parametrize("name", ["llama", "mixtral", "gemma3"])
@pytest.mark.parametrize("allocator", ["uniform", "ecoflap-zo", "ecoflap-fo"])
def test_stream_writes_the_same_tensors_as_in_memory(saved, tmp_path, name, allocator):
    folder, batches = saved[name]
    cfg = dict(sparsity=0.5, allocator=allocator, batch_size=4, progress=False)
    # in memory: the whole model, fp32 compute, saved back in the source dtype
    model, _ = models.load_model(str(folder))
    rep_mem = prune_(model, batches, PruneConfig(**cfg), stage1_calibration=batches[:2])
    checkpoint.save_model(model, tmp_path / "mem", dtype=torch.bfloat16)
    # streamed: blocks read when reached, written as soon as they are pruned, freed
    skel, loader, ck = stream.open_streamed(folder)
    skip = checkpoint.tied_names(skel)
    writer = checkpoint.ShardWriter(tmp_path / "str", checkpoint.layout(skel, torch.bfloat16, skip), shard_bytes=60_000)
    held = []

    def write(block):
        held.append(len(loader.loaded))
        for n, t in block.module.state_dict().items():
            writer.add(f"{block.path}.{n}", t.to(torch.bfloat16) if t.is_floating_point() else t)

    rep_str = prune_(
        skel, batches, PruneConfig(**cfg), stage1_calibration=batches[:2], loader=loader, after_block=write
    )
    stacks = [s.path for s in walk.structure(skel).stacks]
    for n, t in skel.state_dict().items():
        if n not in skip and not any(n.startswith(p + ".") for p in stacks):
            writer.add(n, t.to(torch.bfloat16) if t.is_floating_point() else t)
    writer.close()
    a, b = _written(tmp_path / "mem"), _written(tmp_path / "str")
    assert set(a) == set(b)
    for n in a:
        assert a[n].dtype == torch.bfloat16 or not a[n].is_floating_point()
        assert torch.equal(a[n], b[n]), n
    assert rep_mem["sparsity_map"] == rep_str["sparsity_map"]
    assert rep_mem["layer_sparsity"] == rep_str["layer_sparsity"]
    assert max(held) == 1  # one block in memory at a time
    assert all(p.device.type == "meta" for s in walk.structure(skel).stacks for p in s.modules.parameters())


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_blockwise_gradient_scores_equal_whole_graph(saved, name):
    folder, batches = saved[name]
    model, _ = models.load_model(str(folder))
    want = stage1.zo_grad_scores(model, batches[:2], seed=3, progress=False)
    skel, loader, _ = stream.open_streamed(folder)
    plan = walk.plan(skel, batches[0], loader=loader)
    got = stage1.zo_grad_scores(skel, batches[:2], plan=plan, seed=3, progress=False)
    assert got == want


def test_streamed_perplexity_equals_in_memory(saved):
    folder, batches = saved["llama"]
    windows = torch.cat([b["input_ids"] for b in batches])
    model, _ = models.load_model(str(folder))
    want = evaluate.perplexity(model, windows, progress=False)
    skel, loader, _ = stream.open_streamed(folder)
    plan = walk.plan(skel, batches[0], loader=loader)
    reads = loader.reads
    got = evaluate.perplexity(skel, windows, progress=False, plan=plan)
    assert got == want
    per_block = len(list(skel.model.layers[0].named_parameters()))
    assert loader.reads - reads == per_block * len(skel.model.layers)  # every block read once


def test_missing_tensor_is_named(saved, tmp_path):
    folder, _ = saved["llama"]
    ck = checkpoint.Checkpoint(folder)
    kept = [n for n in ck.files if n != "model.layers.1.mlp.up_proj.weight"]
    writer = checkpoint.ShardWriter(tmp_path / "broken", [(n, *ck.meta[n]) for n in kept])
    for n in kept:
        writer.add(n, ck.get(n))
    writer.close()
    (tmp_path / "broken" / "config.json").write_bytes((folder / "config.json").read_bytes())
    with pytest.raises(
        ValueError, match=r"has no tensor model.layers.1.mlp.up_proj.weight \(nor one transformers renames to it\)"
    ):
        stream.open_streamed(tmp_path / "broken")


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    from tiny_models import tiny_llama, word_text, word_tokenizer

    root = tmp_path_factory.mktemp("stream-cli")
    model = tiny_llama(hidden=128, layers=4)
    checkpoint.save_model(model, root / "tiny", dtype=torch.bfloat16, tokenizer=word_tokenizer(), shard_bytes=200_000)
    (root / "calib.txt").write_text(word_text(3000, seed=1))
    (root / "eval.txt").write_text(word_text(2000, seed=2))
    return root


def _cli(root, out, *extra):
    return [
        "prune",
        "--model",
        str(root / "tiny"),
        "--calib-text",
        str(root / "calib.txt"),
        "--eval-text",
        str(root / "eval.txt"),
        "--nsamples",
        "8",
        "--seqlen",
        "16",
        "--stage1-nsamples",
        "4",
        "--stage1-seqlen",
        "16",
        "--eval-windows",
        "2",
        "--eval-seqlen",
        "32",
        "--output",
        str(root / out),
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize("allocator", ["uniform", "ecoflap-zo"])
def test_cli_stream_equals_in_memory(cli_model, allocator, capsys):

    from ecoflap_fast.cli import main

    assert main(_cli(cli_model, f"mem-{allocator}", "--allocator", allocator, "--save-model", "--eval")) == 0
    assert main(_cli(cli_model, f"str-{allocator}", "--allocator", allocator, "--stream", "--eval")) == 0
    a, b = _written(cli_model / f"mem-{allocator}" / "model"), _written(cli_model / f"str-{allocator}" / "model")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert all(t.dtype == torch.bfloat16 for t in a.values())  # the source's dtype, not the fp32 compute dtype
    ra = json.loads((cli_model / f"mem-{allocator}" / "report.json").read_text())
    rb = json.loads((cli_model / f"str-{allocator}" / "report.json").read_text())
    assert ra["ppl_dense"] == rb["ppl_dense"] and ra["ppl_pruned"] == rb["ppl_pruned"]
    assert rb["streamed"] and not ra["streamed"]
    assert not [p for p in cli_model.iterdir() if p.name.startswith(".")]  # no temporary folder left
    from transformers import AutoModelForCausalLM

    loaded, info = AutoModelForCausalLM.from_pretrained(
        cli_model / f"str-{allocator}" / "model", output_loading_info=True
    )
    assert not any(info.values())


def test_cli_switches_streaming_on_when_memory_is_short(cli_model, monkeypatch, capsys):
    from ecoflap_fast.cli import main

    est = stream.estimate(cli_model / "tiny", torch.float32, 8, 16, 8)
    available = 2 * est["weights"]
    assert est["peak_streamed"] < available  # the case this test is about
    monkeypatch.setattr(stream, "available_memory", lambda device="cpu": available)
    assert main(_cli(cli_model, "auto", "--allocator", "uniform")) == 0
    err = capsys.readouterr().err
    assert "over 40% of the" in err and "streaming block by block" in err
    assert (cli_model / "auto" / "model" / "config.json").is_file()
    monkeypatch.setattr(stream, "available_memory", lambda device="cpu": est["peak_streamed"] // 2)
    assert main(_cli(cli_model, "too-big", "--allocator", "uniform")) == 2
    assert "even streamed, the run needs about" in capsys.readouterr().err
    assert not (cli_model / "too-big").exists()
    # --no-stream keeps the model in memory whatever the estimate says, and so the in-memory peak is
    # checked: refused here before any work, run with --no-memory-check
    monkeypatch.setattr(stream, "available_memory", lambda device="cpu": available)
    assert main(_cli(cli_model, "kept", "--allocator", "uniform", "--no-stream", "--save-model")) == 2
    err = capsys.readouterr().err
    assert "this run needs about" in err and "stream" not in err.split("this run needs about")[0]
    assert not (cli_model / "kept").exists()
    args = _cli(cli_model, "kept", "--allocator", "uniform", "--no-stream", "--save-model", "--no-memory-check")
    assert main(args) == 0
    assert "streaming" not in capsys.readouterr().err
    assert not json.loads((cli_model / "kept" / "report.json").read_text())["streamed"]
