"""Verification that verifies: an export is read back the way load_sparse reads it (class from the
written config, names, shapes, decoded layers) and compared with the pruned weights in the export
dtype; values the export dtype cannot hold are refused naming the tensor; nothing appears when any
of it fails."""

import json

import pytest
import torch
from reliability_helpers import make_tiny_folder, one_error_line, prune_args
from tiny_models import tiny_llama, tiny_opt

from ecoflap_fast import export, export_, load_sparse
from ecoflap_fast.cli import main
from ecoflap_fast.prune import PruneConfig, prune_


def _pruned(factory=tiny_llama, pattern="2:4"):
    model = factory(hidden=64)
    prune_(model, torch.randint(0, 128, (4, 16)), PruneConfig(sparsity=0.5, pattern=pattern, progress=False))
    return model


def _nothing_written(tmp_path):
    assert not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["hf-dense", "ct-bitmask", "torch-24"])
def test_overflow_in_the_export_dtype_is_refused_naming_the_tensor(tmp_path, fmt):
    model = _pruned()
    with torch.no_grad():
        w = model.model.layers[1].mlp.down_proj.weight
        w[0, w[0].nonzero()[0, 0]] = 1e6
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight has 1 value\(s\) that float16"):
        export_(model, tmp_path / "out", fmt, dtype=torch.float16)
    _nothing_written(tmp_path)
    export_(model, tmp_path / "bf16", fmt, dtype=torch.bfloat16)  # bfloat16 holds it


def test_non_finite_weights_are_refused(tmp_path):
    model = _pruned()
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight holds 1 inf/NaN"):
        export_(model, tmp_path / "out", "hf-dense")
    _nothing_written(tmp_path)


def test_cli_overflow_leaves_no_output(tmp_path, capsys):
    folder = make_tiny_folder(tmp_path / "in")
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[:] = 7e4
    m.save_pretrained(folder)
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(prune_args(tmp_path / "in", folder, out, "--export", "ct-bitmask", "--export-dtype", "fp16")) == 2
    assert "float16 cannot hold" in one_error_line(capsys.readouterr().err)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_a_writer_bug_is_caught_before_the_destination_appears(tmp_path, monkeypatch):
    model = _pruned(pattern="unstructured")
    real = export._encode

    def off_by_one_value(fmt, name, w):
        out = real(fmt, name, w)
        if name == "model.layers.0.mlp.up_proj.weight":
            out["model.layers.0.mlp.up_proj.compressed"] = out["model.layers.0.mlp.up_proj.compressed"].clone()
            out["model.layers.0.mlp.up_proj.compressed"][5] += 1
        return out

    monkeypatch.setattr(export, "_encode", off_by_one_value)
    with pytest.raises(RuntimeError, match=r"verification failed for model\.layers\.0\.mlp\.up_proj\.weight"):
        export_(model, tmp_path / "out", "ct-bitmask")
    _nothing_written(tmp_path)


def test_a_config_the_loader_cannot_use_fails_verification(tmp_path, monkeypatch):
    """Verification builds the model from the config.json it wrote: a config that does not describe
    the stored tensors is caught (here: one block too few)."""
    model = _pruned()
    real = json.dumps

    def fewer_layers(obj, *a, **k):
        if isinstance(obj, dict) and "num_hidden_layers" in obj:
            obj = {**obj, "num_hidden_layers": obj["num_hidden_layers"] - 1}
        return real(obj, *a, **k)

    monkeypatch.setattr(export.json, "dumps", fewer_layers)
    with pytest.raises(ValueError, match="is not part of a LlamaForCausalLM"):
        export_(model, tmp_path / "out", "hf-dense")
    _nothing_written(tmp_path)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_export_loads_as_the_class_it_came_from_with_the_weights_it_had(tmp_path, factory):
    model = _pruned(factory).to(torch.bfloat16)
    export_(model, tmp_path / "ct", "ct-24")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["architectures"] == [type(model).__name__]
    back = load_sparse(tmp_path / "ct")
    assert type(back) is type(model)
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
