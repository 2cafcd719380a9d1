"""The command line on a tiny saved model: a full run, and every bad-input path of the prune command."""

import hashlib
import json
from pathlib import Path

import pytest
from tiny_models import tiny_llama, word_text, word_tokenizer

from ecoflap_fast.cli import main


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for name, hidden in [("tiny", 64), ("odd", 66)]:
        model = tiny_llama(hidden=hidden) if hidden == 64 else _odd_llama()
        model.save_pretrained(root / name)
        word_tokenizer().save_pretrained(root / name)
    (root / "calib.txt").write_text(word_text(3000, seed=1))
    (root / "eval.txt").write_text(word_text(2000, seed=2))
    (root / "short.txt").write_text(word_text(5))
    return root


def _odd_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=66,
        intermediate_size=132,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        vocab_size=128,
    )
    return LlamaForCausalLM(cfg)


def _args(root, model="tiny", out="out", *extra):
    return [
        "prune",
        "--model",
        str(root / model),
        "--calib-text",
        str(root / "calib.txt"),
        "--eval-text",
        str(root / "eval.txt"),
        "--nsamples",
        "4",
        "--seqlen",
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


def test_prune_writes_report_and_plot(workdir, capsys):
    before = _tree_digest(workdir / "tiny")
    assert main(_args(workdir, "tiny", "run1", "--sparsity", "0.6", "--eval")) == 0
    rep = json.loads((workdir / "run1" / "report.json").read_text())
    for key in [
        "model",
        "allocator",
        "pruner",
        "pattern",
        "target_sparsity",
        "achieved_sparsity",
        "layer_sparsity",
        "ppl_dense",
        "ppl_pruned",
        "timings",
        "device",
        "seed",
        "nsamples",
        "seqlen",
    ]:
        assert key in rep, key
    assert set(rep["timings"]) >= {"stage1_s", "stage2_s", "eval_s", "total_s"}
    assert rep["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert rep["ppl_dense"] > 1 and rep["ppl_pruned"] > 1
    assert (workdir / "run1" / "sparsity.png").stat().st_size > 1000
    assert _tree_digest(workdir / "tiny") == before, "the source model was modified"
    assert f"achieved sparsity {rep['achieved_sparsity']:.4f} (target 0.6000)" in capsys.readouterr().out
    # the written sparsity map can drive another run
    assert main(_args(workdir, "tiny", "run2", "--sparsity-map", str(workdir / "run1" / "report.json"))) == 0
    rep2 = json.loads((workdir / "run2" / "report.json").read_text())
    assert rep2["layer_sparsity"] == rep["layer_sparsity"]


BAD = [
    ("missing-model", dict(model="nope"), "does not exist"),
    ("odd-width-2:4", dict(model="odd", extra=["--pattern", "2:4"]), "needs in_features divisible by 4"),
    ("short-calibration", dict(extra=["--calib-text", "SHORT", "--seqlen", "16"]), "too little calibration text"),
    ("missing-text", dict(extra=["--calib-text", "NOFILE"]), "does not exist"),
    ("missing-map", dict(extra=["--sparsity-map", "NOFILE"]), "does not exist"),
    ("max-below-target", dict(extra=["--sparsity", "0.6", "--max-sparsity", "0.5"]), "max sparsity must be in"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_one_line_error_nothing_written(workdir, capsys, case):
    _, opts, message = case
    extra = [
        str(workdir / "short.txt") if e == "SHORT" else (str(workdir / "nofile") if e == "NOFILE" else e)
        for e in opts.get("extra", [])
    ]
    out = f"bad-{case[0]}"
    args = _args(workdir, opts.get("model", "tiny"), out, *extra)
    if opts.get("model") == "nope":
        args[2] = str(workdir / "nope")
    before = _tree_digest(workdir / "tiny")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ecoflap-fast: error:") and message in err[0], err
    assert not (workdir / out).exists()
    assert not list(workdir.glob(f".{out}.tmp-*"))
    assert _tree_digest(workdir / "tiny") == before


def test_existing_output_refused_without_force(workdir, capsys):
    out = workdir / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(_args(workdir, "tiny", "existing")) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(_args(workdir, "tiny", "existing", "--force")) == 0
    assert (out / "report.json").exists() and not (out / "keep.txt").exists()


@pytest.mark.parametrize("content,message", [("{not json", "could not be read"), ("", "could not be read")])
def test_corrupt_model_files(workdir, capsys, content, message):
    bad = workdir / f"corrupt{len(content)}"
    bad.mkdir()
    (bad / "config.json").write_text(content)
    args = _args(workdir, "tiny", "never")
    args[2] = str(bad)
    assert main(args) == 2
    assert message in capsys.readouterr().err
    gguf = workdir / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    args[2] = str(gguf)
    assert main(args) == 2
    assert "could not be read as a GGUF model" in capsys.readouterr().err
    assert not (workdir / "never").exists()


@pytest.mark.parametrize("value", ["1.0", "-0.1", "abc"])
def test_sparsity_out_of_range(workdir, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(_args(workdir, "tiny", "never2", "--sparsity", value))
    assert e.value.code == 2
    assert "sparsity must be" in capsys.readouterr().err
    assert not (workdir / "never2").exists()


def test_eval_command(workdir, capsys):
    args = [
        "eval",
        "--model",
        str(workdir / "tiny"),
        "--eval-text",
        str(workdir / "eval.txt"),
        "--eval-windows",
        "2",
        "--eval-seqlen",
        "32",
        "--no-progress",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ppl"] > 1


def test_prune_with_export_and_export_command(workdir, capsys):
    assert main(_args(workdir, "tiny", "exp", "--pattern", "2:4", "--export", "ct-24", "torch-24", "--save-model")) == 0
    rep = json.loads((workdir / "exp" / "report.json").read_text())
    assert {e["format"] for e in rep["exports"]} == {"ct-24", "torch-24"}
    assert (workdir / "exp" / "ct-24" / "model.safetensors").exists()
    assert (workdir / "exp" / "torch-24" / "config.json").exists()
    assert (
        main(
            [
                "export",
                "--model",
                str(workdir / "exp" / "model"),
                "--format",
                "ct-bitmask",
                "--output",
                str(workdir / "exp-ct"),
            ]
        )
        == 0
    )
    assert "verified against the model" in capsys.readouterr().out
    assert (
        main(
            [
                "export",
                "--model",
                str(workdir / "exp" / "model"),
                "--format",
                "hf-dense",
                "--plain-config",
                "--output",
                str(workdir / "exp-plain"),
            ]
        )
        == 0
    )
    assert (workdir / "exp-plain" / "sparsity_config.json").exists()
    capsys.readouterr()
    # a dense model refuses to go into a 2:4 format, naming the layer, writing nothing
    assert (
        main(["export", "--model", str(workdir / "tiny"), "--format", "ct-24", "--output", str(workdir / "never-24")])
        == 2
    )
    assert "model.layers.0.self_attn.q_proj is not 2:4 sparse" in capsys.readouterr().err
    assert not (workdir / "never-24").exists()


def test_output_parents_created_only_after_validation(workdir, capsys):
    assert main(_args(workdir, "tiny", "nested/deeper/run")) == 0
    assert (workdir / "nested" / "deeper" / "run" / "report.json").exists()
    capsys.readouterr()
    # bad input: nothing written, not even the parent folders
    assert main(_args(workdir, "tiny", "nested2/run", "--pattern", "2:4", "--calib-text", str(workdir / "nofile"))) == 2
    assert not (workdir / "nested2").exists()
    (workdir / "afile").write_text("x")
    assert main(_args(workdir, "tiny", "afile/run")) == 2
    assert "is a file" in capsys.readouterr().err
