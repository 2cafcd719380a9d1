"""Exports: every format round-trips exactly, writes are atomic and verified, bad requests are refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import block_linears
from tiny_models import tiny_llama

from ecoflap_fast import export_, load_sparse
from ecoflap_fast.export import FORMATS
from ecoflap_fast.prune import PruneConfig, prune_

HERE = Path(__file__).resolve().parent


def _pruned(pattern="2:4", hidden=64, layers=2, dtype=torch.float32):
    model = tiny_llama(hidden=hidden, layers=layers)
    prune_(model, torch.randint(0, 128, (4, 16)), PruneConfig(sparsity=0.5, pattern=pattern, progress=False))
    return model.to(dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_every_format(tmp_path, fmt):
    model = _pruned()  # fp32; torch-24 stores bf16 values
    info = export_(model, tmp_path / fmt, fmt)
    assert info["format"] == fmt and info["bytes"] > 0
    if fmt == "torch-24":
        with pytest.warns(UserWarning, match="loaded dense"):
            back = load_sparse(tmp_path / fmt)
    else:
        back = load_sparse(tmp_path / fmt)
    if fmt == "torch-24":
        assert info["dtype"] == "bfloat16"
        export_(model, tmp_path / "ref", "hf-dense", dtype=torch.bfloat16)
        model = load_sparse(tmp_path / "ref")  # the same weights in bf16, built the same way
    sd, bd = model.state_dict(), back.state_dict()
    for name in sd:
        assert sd[name].dtype == bd[name].dtype and torch.equal(sd[name], bd[name]), name
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    cfg = json.loads((tmp_path / fmt / "config.json").read_text())
    if fmt != "torch-24":
        sc = cfg["quantization_config"]["sparsity_config"]
        assert sc["format"] == {"hf-dense": "dense", "ct-bitmask": "sparse-bitmask", "ct-24": "sparse-24-bitmask"}[fmt]
        assert sc["sparsity_structure"] == ("2:4" if fmt == "ct-24" else "unstructured")
        assert sc["global_sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_unstructured_bitmask_is_smaller(tmp_path):
    model = _pruned(pattern="unstructured", hidden=128, dtype=torch.bfloat16)
    dense = export_(model, tmp_path / "d", "hf-dense")["weights_bytes"]
    ct = export_(model, tmp_path / "c", "ct-bitmask")["weights_bytes"]
    assert ct < dense


def test_non_24_layer_is_named_and_nothing_written(tmp_path):
    model = _pruned(pattern="unstructured")
    first = next(iter(block_linears(model, ["model.layers"])))
    for fmt in ("ct-24", "torch-24"):
        with pytest.raises(ValueError, match=f"layer {first} is not 2:4 sparse"):
            export_(model, tmp_path / fmt, fmt, dtype=torch.bfloat16)
        assert not (tmp_path / fmt).exists()
    assert not list(tmp_path.iterdir())


def test_existing_destination_refused_then_replaced_with_force(tmp_path):
    model = _pruned()
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="force"):
        export_(model, dest, "hf-dense")
    assert (dest / "keep").read_text() == "x"
    export_(model, dest, "hf-dense", force=True)
    assert not (dest / "keep").exists() and (dest / "config.json").exists()


def test_model_is_not_modified(tmp_path):
    model = _pruned()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_(model, tmp_path / "t", "torch-24")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype, k


def test_killed_export_leaves_no_destination(tmp_path):
    """SIGKILL part way (once the temporary folder exists): no destination, only a stray temp folder."""
    code = (
        "import sys, torch; sys.path.insert(0, %r)\n"
        "from tiny_models import tiny_llama\n"
        "from ecoflap_fast import export_\n"
        "m = tiny_llama(hidden=512, layers=8)\n"
        "print('ready', flush=True)\n"
        "for i in range(50): export_(m, %r, 'ct-bitmask', force=True)\n"
    ) % (str(HERE), str(tmp_path / "dest"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 120
    while not list(tmp_path.glob(".dest.tmp-*")) and time.time() < deadline:
        time.sleep(0.01)
    assert list(tmp_path.glob(".dest.tmp-*")), "the export never started"
    first_run = not (tmp_path / "dest").exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if first_run:
        assert not (tmp_path / "dest").exists()
    else:  # killed during a replacing run: the previous complete export is still there or swapped whole
        assert (tmp_path / "dest" / "model.safetensors").exists() or not (tmp_path / "dest").exists()


@pytest.mark.skipif(
    not os.environ.get("ECOFLAP_CT012_PATH"),
    reason="compressed-tensors 0.12 test environment not prepared (make setup creates .ct-0.12)",
)
@pytest.mark.parametrize("fmt", ["ct-bitmask", "ct-24"])
def test_compressed_tensors_012_decompresses_our_checkpoint(tmp_path, fmt):
    """compressed-tensors 0.12.2's own decompressors, in their own environment, read every tensor exactly."""
    model = _pruned(pattern="2:4", dtype=torch.bfloat16)
    export_(model, tmp_path / fmt, fmt)
    expected = {f"{n}.weight": lin.weight.detach() for n, lin in block_linears(model, ["model.layers"]).items()}
    torch.save(expected, tmp_path / "expected.pt")
    code = r"""
import sys, torch, compressed_tensors
from safetensors.torch import load_file
from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import bitmask_decompress
from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import sparse24_bitmask_decompress
assert compressed_tensors.__version__.startswith("0.12"), compressed_tensors.__version__
fmt, folder, expected = sys.argv[1], sys.argv[2], torch.load(sys.argv[3])
t = load_file(folder + "/model.safetensors")
for name, want in expected.items():
    p = name[: -len(".weight")]
    shape = t[p + ".shape"].flatten().tolist()
    if fmt == "ct-24":
        got = sparse24_bitmask_decompress(t[p + ".compressed"], t[p + ".bitmask"], shape)
    else:
        got = bitmask_decompress(t[p + ".compressed"], t[p + ".bitmask"], shape)
    assert got.dtype == want.dtype and torch.equal(got, want), name
print("compressed-tensors", compressed_tensors.__version__, "read", len(expected), "tensors exactly")
"""
    env = dict(os.environ, PYTHONPATH=os.environ["ECOFLAP_CT012_PATH"])
    out = subprocess.run(
        [sys.executable, "-c", code, fmt, str(tmp_path / fmt), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "read 14 tensors exactly" in out.stdout


def test_hf_dense_plain_config_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _pruned(pattern="unstructured")
    export_(model, tmp_path / "plain", "hf-dense", plain_config=True)
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in cfg
    meta = json.loads((tmp_path / "plain" / "sparsity_config.json").read_text())
    assert meta["sparsity_config"]["format"] == "dense"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    for name, t in model.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name
    with pytest.raises(ValueError, match="hf-dense only"):
        export_(model, tmp_path / "x", "ct-bitmask", plain_config=True)
