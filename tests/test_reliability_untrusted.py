"""Untrusted checkpoints: a folder's own code never runs without --trust-remote-code and nothing asks
on the terminal; pickles are never unpickled; safetensors headers are checked before anything is
read; an export of this engine given as --model loads through load_sparse, and a damaged or tampered
export is refused naming the tensor."""

import json
import shutil
import struct

import pytest
import torch
from reliability_helpers import ENV, make_tiny_folder, one_error_line, prune_args, run_cli
from safetensors.torch import load_file, save_file

from ecoflap_fast import load_sparse, models
from ecoflap_fast.cli import main

HOSTILE_CODE = """
from pathlib import Path
Path({marker!r}).write_text("foreign code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class HostileConfig(LlamaConfig):
    model_type = "hostile"
class HostileModel(LlamaForCausalLM):
    config_class = HostileConfig
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    make_tiny_folder(root)
    return root


@pytest.fixture()
def no_model_loading(monkeypatch):
    """Fails the test if a command gets as far as loading weights."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr(models, "load_model", refuse)


def _hostile(root, tmp_path, model_type="hostile", where="config.json"):
    h = tmp_path / "hostile"
    shutil.copytree(root / "tiny", h)
    marker = tmp_path / "MARKER"
    (h / "hostile_code.py").write_text(HOSTILE_CODE.format(marker=str(marker)))
    cfg = json.loads((h / where).read_text())
    if where == "config.json":
        cfg.update(model_type=model_type, architectures=["HostileModel"])
        cfg["auto_map"] = {
            "AutoConfig": "hostile_code.HostileConfig",
            "AutoModelForCausalLM": "hostile_code.HostileModel",
        }
    else:
        cfg["auto_map"] = {"AutoTokenizer": ["hostile_code.HostileTokenizer", None]}
        cfg["tokenizer_class"] = "HostileTokenizer"
    (h / where).write_text(json.dumps(cfg))
    return h, marker


def _commands(root, model, out):
    ev = ["--eval-text", str(root / "eval.txt"), "--eval-windows", "1", "--eval-seqlen", "16", "--no-progress"]
    return {
        "prune": prune_args(root, model, out),
        "eval": ["eval", "--model", str(model), *ev],
        "export": ["export", "--model", str(model), "--format", "hf-dense", "--output", str(out)],
        "inspect": ["inspect", "--model", str(model)],
    }


def test_hostile_folder_code_never_runs(root, tmp_path, capsys):
    h, marker = _hostile(root, tmp_path)
    for name, args in _commands(root, h, tmp_path / "out").items():
        assert main(args) == 2, name
        line = one_error_line(capsys.readouterr().err)
        assert "runs no code from a model folder unless you pass --trust-remote-code" in line, line
        assert not marker.exists(), f"{name} ran the folder's code"
    assert not (tmp_path / "out").exists()


def test_no_prompt_even_when_the_terminal_says_yes(root, tmp_path):
    h, marker = _hostile(root, tmp_path)
    env = dict(ENV, HF_MODULES_CACHE=str(tmp_path / "modules"))
    r = run_cli(_commands(root, h, tmp_path / "out")["eval"], stdin="y\ny\n", env=env)
    assert r.returncode == 2 and "[y/N]" not in r.stdout + r.stderr
    one_error_line(r.stderr)
    assert not marker.exists()


def test_trust_remote_code_is_the_only_gate(root, tmp_path):
    h, marker = _hostile(root, tmp_path)
    env = dict(ENV, HF_MODULES_CACHE=str(tmp_path / "modules"))
    run_cli(["inspect", "--model", str(h), "--trust-remote-code"], env=env)
    assert marker.exists(), "--trust-remote-code should let the folder's code run"


def test_known_model_type_with_auto_map_loads_natively(root, tmp_path, capsys):
    """config.json and tokenizer_config.json point at the folder's code, but the model type is one
    transformers ships: its own classes load the folder and the code is never imported."""
    h, marker = _hostile(root, tmp_path, model_type="llama")
    cfg = json.loads((h / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (h / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((h / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["hostile_code.HostileTokenizer", None]}
    (h / "tokenizer_config.json").write_text(json.dumps(tc))
    assert main(_commands(root, h, tmp_path / "out")["eval"]) == 0, capsys.readouterr().err
    assert not marker.exists()


def test_pickled_weights_are_never_unpickled(root, tmp_path, capsys):
    f = tmp_path / "binonly"
    f.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "tiny" / name, f)
    marker = tmp_path / "PICKLE_MARKER"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model.embed_tokens.weight": Evil()}, f / "pytorch_model.bin")
    assert main(_commands(root, f, tmp_path / "out")["eval"]) == 2
    assert "never unpickles" in one_error_line(capsys.readouterr().err)
    assert not marker.exists()


def _header_bytes(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


def _damage(data: bytes, kind: str) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    first = next(k for k in header if k != "__metadata__")
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "header-length-bomb":
        return struct.pack("<Q", 2**62) + data[8:]
    if kind == "header-not-json":
        return struct.pack("<Q", 16) + b"{not json at all" + body
    if kind == "unknown-dtype":
        header[first]["dtype"] = "Q9"
    elif kind == "shape-vs-offsets":
        header[first]["shape"] = [s * 2 for s in header[first]["shape"]]
    elif kind == "overlapping":
        second = [k for k in header if k not in ("__metadata__", first)][0]
        header[second]["data_offsets"] = header[first]["data_offsets"]
    elif kind == "negative-shape":
        header[first]["shape"] = [-1, 64]
    return _header_bytes(header) + body


DAMAGES = [
    "truncated",
    "header-length-bomb",
    "header-not-json",
    "unknown-dtype",
    "shape-vs-offsets",
    "overlapping",
    "negative-shape",
]


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_safetensors_refused_before_loading(root, tmp_path, capsys, no_model_loading, kind):
    f = tmp_path / kind
    shutil.copytree(root / "tiny", f)
    w = f / "model.safetensors"
    w.write_bytes(_damage(w.read_bytes(), kind))
    assert main(prune_args(root, f, tmp_path / "out")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "model.safetensors" in line, line
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def exports(root):
    out = root / "exports"
    args = prune_args(root, root / "tiny", out, "--pattern", "2:4", "--save-model")
    args += ["--export", "hf-dense", "ct-bitmask", "ct-24", "torch-24"]
    assert main(args) == 0
    return out


@pytest.mark.parametrize("fmt", ["hf-dense", "ct-bitmask", "ct-24", "torch-24"])
def test_export_given_as_model_loads_the_pruned_weights(exports, fmt):
    want = load_file(str(exports / "model" / "model.safetensors"))
    with pytest.warns(UserWarning) if fmt == "torch-24" else _nothing():
        model, tok = models.load_model(str(exports / fmt))
    assert tok is not None
    got = model.state_dict()
    dtype = torch.bfloat16 if fmt == "torch-24" else torch.float32  # torch-24 stores 16-bit values
    for name, t in want.items():
        assert torch.equal(got[name], t.to(dtype)), f"{fmt}: {name} differs from the pruned model"


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_re_export_of_an_export_is_verified_for_real(exports, tmp_path, capsys):
    assert (
        main(["export", "--model", str(exports / "ct-24"), "--format", "ct-bitmask", "--output", str(tmp_path / "x")])
        == 0
    )
    out = capsys.readouterr().out
    assert "global sparsity 0.5000" in out and "verified against the model" in out


def _tamper(folder, edit):
    t = load_file(str(folder / "model.safetensors"))
    edit(t)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})


L = "model.layers.0.mlp.up_proj"


def _flip_bit(t):
    b = t[f"{L}.bitmask"].clone()
    b[0, 0] ^= 1
    t[f"{L}.bitmask"] = b


def _meta(t):
    m = t[f"{L}.meta"].clone()
    m[0, 0] = 0
    t[f"{L}.meta"] = m


TAMPERED = [
    ("torch-24", "meta", _meta, "CUTLASS metadata does not match its values"),
    ("ct-bitmask", "bitmask-bit", _flip_bit, "the bitmask keeps"),
    ("ct-24", "bitmask-bit", _flip_bit, "2 of every 4"),
    (
        "ct-bitmask",
        "row-offsets",
        lambda t: t.__setitem__(f"{L}.row_offsets", t[f"{L}.row_offsets"] + 1),
        "row_offsets",
    ),
    ("ct-bitmask", "shape", lambda t: t.__setitem__(f"{L}.shape", torch.tensor([[4096], [4096]])), "shape says"),
    (
        "ct-24",
        "values-dropped",
        lambda t: t.__setitem__(f"{L}.compressed", t[f"{L}.compressed"][:, :-2].contiguous()),
        "needs",
    ),
    ("hf-dense", "extra-tensor", lambda t: t.__setitem__("evil.weight", torch.zeros(2)), "is not part of"),
    ("hf-dense", "missing-tensor", lambda t: t.pop(f"{L}.weight"), "no tensor for"),
    ("ct-bitmask", "missing-part", lambda t: t.pop(f"{L}.row_offsets"), "has no"),
]


@pytest.mark.parametrize("case", TAMPERED, ids=[f"{c[0]}-{c[1]}" for c in TAMPERED])
def test_tampered_export_is_refused_naming_the_tensor(exports, tmp_path, capsys, case):
    fmt, _, edit, message = case
    folder = tmp_path / fmt
    shutil.copytree(exports / fmt, folder)
    _tamper(folder, edit)
    with pytest.raises(ValueError, match=message):
        load_sparse(folder)
    ev = ["--eval-text", str(exports.parent / "eval.txt"), "--eval-windows", "1", "--eval-seqlen", "16"]
    assert main(["eval", "--model", str(folder), *ev]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line, line


def test_foreign_compressed_tensors_checkpoint_is_refused_with_what_to_do(exports, tmp_path, capsys):
    folder = tmp_path / "quantized"
    shutil.copytree(exports / "hf-dense", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["config_groups"] = {"group_0": {"weights": {"num_bits": 4}}}
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", "--model", str(folder)]) == 2
    assert "decompress it" in one_error_line(capsys.readouterr().err)
