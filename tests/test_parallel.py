"""Data-parallel calibration: two gloo ranks on the CPU (torchrun) against one process on the same
calibration batches: masks agree >= 0.9999, the allocation and the expert token counts are equal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from arch_zoo import B, build

from ecoflap_fast import PruneConfig, prune_

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize(
    "name,allocator",
    [("llama", "uniform"), ("llama", "ecoflap-zo"), ("llama", "ecoflap-fo"), ("mixtral", "ecoflap-zo")],
)
def test_two_ranks_match_one_process(tmp_path, name, allocator):
    out = tmp_path / "dp.pt"
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    worker = [str(HERE / "dp_worker.py"), name, allocator, str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *worker]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out)
    model, batches = build(name)
    batches = batches + build(name, seed=1)[1]
    rep = prune_(
        model,
        batches,
        PruneConfig(sparsity=0.5, allocator=allocator, batch_size=B, progress=False),
        stage1_calibration=batches[:4],
    )
    assert got["map"] == rep["sparsity_map"]
    assert got["tokens"] == rep["expert_tokens"]
    half = rep["stage1"].get("split_half_spearman")  # from every rank's batches, as in one process
    assert (got["half"] is None) == (half is None) and (half is None or got["half"] == pytest.approx(half, abs=1e-9))
    if allocator.startswith("ecoflap"):
        assert half is not None
        assert got["decision"] == rep["stage1"]["decision"]  # the batch count over all ranks, not one's
    agree, total = 0, 0
    for k, v in model.state_dict().items():
        w = got["state"][k]
        agree += int(((w == 0) == (v == 0)).sum())
        total += v.numel()
    assert agree / total >= 0.9999, agree / total


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    from tiny_models import tiny_llama, word_text, word_tokenizer

    from ecoflap_fast import checkpoint

    root = tmp_path_factory.mktemp("dp-cli")
    checkpoint.save_model(
        tiny_llama(hidden=64, layers=3), root / "tiny", dtype=torch.bfloat16, tokenizer=word_tokenizer()
    )
    (root / "calib.txt").write_text(word_text(3000, seed=1))
    (root / "eval.txt").write_text(word_text(2000, seed=2))
    return root


def _args(root, out, *extra):
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
        "--batch-size",
        "2",
        "--stage1-nsamples",
        "8",
        "--stage1-seqlen",
        "16",
        "--eval-windows",
        "4",
        "--eval-seqlen",
        "16",
        "--allocator",
        "ecoflap-zo",
        "--eval",
        "--output",
        str(root / out),
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streamed"])
def test_cli_under_torchrun(cli_model, stream):
    import json

    from ecoflap_fast import checkpoint
    from ecoflap_fast.cli import main

    extra = ["--stream"] if stream else ["--save-model"]
    assert main(_args(cli_model, f"one-{stream}", *extra)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "ecoflap_fast",
        *_args(cli_model, f"two-{stream}", *extra),
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("pruned ") == 1  # rank 0 reports
    one = json.loads((cli_model / f"one-{stream}" / "report.json").read_text())
    two = json.loads((cli_model / f"two-{stream}" / "report.json").read_text())
    assert two["ranks"] == 2 and one["ranks"] == 1
    assert one["sparsity_map"] == two["sparsity_map"]
    assert two["ppl_dense"] == pytest.approx(one["ppl_dense"], rel=1e-5)
    a = checkpoint.Checkpoint(cli_model / f"one-{stream}" / "model")
    b = checkpoint.Checkpoint(cli_model / f"two-{stream}" / "model")
    assert set(a.files) == set(b.files)
    agree = total = 0
    for n in a.files:
        x, y = a.get(n), b.get(n)
        agree += int(((x == 0) == (y == 0)).sum())
        total += x.numel()
    assert agree / total >= 0.9999
    assert not [p for p in cli_model.iterdir() if p.name.startswith(".") and "lock" not in p.name]
