"""Bounded memory: calibration text is read and tokenized as a stream, only as far as the windows
need; runs too large for the machine are refused before any work with the estimate in the message;
a crafted checkpoint cannot make the loader allocate what its files do not hold. Checked by the peak
RSS of subprocesses (their own rusage)."""

import shutil
import sys

import pytest
import torch
from reliability_helpers import make_tiny_folder, one_error_line, peak_rss_run, prune_args
from safetensors.torch import load_file, save_file
from tiny_models import word_tokenizer

from ecoflap_fast import data, export, models
from ecoflap_fast.cli import main


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    make_tiny_folder(root)
    return root


@pytest.fixture(scope="module")
def baseline():
    """Peak RSS (GiB) of an interpreter that imports what a run imports and loads nothing: the bounds
    below are over it, so they hold with any torch build."""
    code = (
        "import torch, transformers, safetensors.torch\n"
        "from transformers import AutoTokenizer, LlamaForCausalLM\n"
        "import ecoflap_fast.cli, ecoflap_fast.export, ecoflap_fast.prune, ecoflap_fast.data"
    )
    rc, _, err, peak = peak_rss_run([sys.executable, "-c", code])
    assert rc == 0, err
    return peak


@pytest.fixture()
def no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the run was refused")

    monkeypatch.setattr(models, "load_model", refuse)


def test_a_large_calibration_file_is_read_only_as_far_as_needed(root, tmp_path, baseline):
    """A 40 MiB calibration file: before, tokenizing it whole peaked at ~6 GiB (2.98 GiB measured for
    20 MiB); now the run stays near the interpreter's own footprint."""
    big = tmp_path / "big.txt"
    block = ((root / "calib.txt").read_text() + "\n\n") * 64
    with big.open("w") as f:
        for _ in range(40 * 2**20 // len(block) + 1):
            f.write(block)
    args = prune_args(root, root / "tiny", tmp_path / "out")
    args[args.index("--calib-text") + 1] = str(big)
    rc, _, err, peak = peak_rss_run([sys.executable, "-m", "ecoflap_fast", *args])
    assert rc == 0, err[-2000:]
    assert peak < baseline + 0.75, f"peak RSS {peak:.2f} GiB (imports alone: {baseline:.2f} GiB)"


def test_streamed_text_is_the_joined_text(tmp_path, monkeypatch):
    import random

    rng = random.Random(0)
    texts = []
    for k in range(4):
        t = "".join(rng.choice(["w1", "w2", " ", "\n", "\n\n", "\n\n\n", "w3 "]) for _ in range(rng.randint(0, 2000)))
        texts.append(t)
        (tmp_path / f"{k}.txt").write_text(t)
    files = data.TextFiles(sorted(tmp_path.glob("*.txt")))
    for block, piece in [(1, 8), (7, 50), (1 << 20, 1 << 20)]:
        monkeypatch.setattr(data, "BLOCK_CHARS", block)
        monkeypatch.setattr(data, "PIECE_CHARS", piece)
        assert "".join(s + t for s, t in files.pieces()) == "\n\n".join(texts)
    tok = word_tokenizer()
    whole = tok("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert torch.equal(data.tokenize(tok, files), whole)
    assert torch.equal(data.tokenize(tok, texts), whole)
    assert torch.equal(data.tokenize(tok, files, max_tokens=100), whole[:100])


def test_tokenizing_stops_once_the_windows_are_covered():
    consumed = []

    def articles():
        for i in range(100_000):
            consumed.append(i)
            yield " ".join(f"w{j % 100}" for j in range(50))

    ids = data.tokenize(word_tokenizer(), articles(), max_tokens=5000)
    assert ids.numel() == 5000
    assert len(consumed) <= 1025 + 1  # one batch of articles, not the 100,000


def test_nsamples_cap(root, tmp_path, capsys, no_model_loading):
    assert main(prune_args(root, root / "tiny", tmp_path / "out", "--nsamples", "100000")) == 2
    assert "--nsamples 100000 is beyond the 65536" in one_error_line(capsys.readouterr().err)


def test_a_run_too_large_for_this_machine_is_refused_with_the_estimate(root, tmp_path, capsys, no_model_loading):
    big = ["--nsamples", "65536", "--seqlen", "256", "--batch-size", "65536"]
    assert main(prune_args(root, root / "tiny", tmp_path / "out", *big)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "this run needs about" in line and "65536x256 calibration activations" in line and "available" in line
    assert not (tmp_path / "out").exists()


def test_refused_run_never_grows(root, tmp_path, baseline):
    big = ["--nsamples", "65536", "--seqlen", "256", "--batch-size", "65536"]
    cmd = [sys.executable, "-m", "ecoflap_fast", *prune_args(root, root / "tiny", tmp_path / "out", *big)]
    rc, _, err, peak = peak_rss_run(cmd)
    assert rc == 2 and "needs about" in err
    assert peak < baseline + 0.5, f"peak RSS {peak:.2f} GiB (imports alone: {baseline:.2f} GiB)"


CRAFT = "model.layers.0.mlp.up_proj"


def test_crafted_bitmask_cannot_amplify_memory(root, tmp_path, baseline):
    """A ct-bitmask layer whose stored shape claims 16384 x 32768 (a 64 MiB all-zero bitmask): before,
    the loader allocated the 2 GiB dense matrix (32x the file); now the layout is checked against the
    model's shape from the headers, before any tensor is read."""
    out = tmp_path / "run"
    assert main(prune_args(root, root / "tiny", out, "--export", "ct-bitmask")) == 0
    folder = out / "ct-bitmask"
    t = load_file(str(folder / "model.safetensors"))
    rows, cols = 16384, 32768
    t[f"{CRAFT}.shape"] = torch.tensor([[rows], [cols]])
    t[f"{CRAFT}.bitmask"] = torch.zeros(rows, cols // 8, dtype=torch.uint8)
    t[f"{CRAFT}.compressed"] = torch.zeros(0)
    t[f"{CRAFT}.row_offsets"] = torch.zeros(rows, dtype=torch.int64)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del t
    code = "import sys; from ecoflap_fast import load_sparse; load_sparse(sys.argv[1])"
    rc, _, err, peak = peak_rss_run([sys.executable, "-c", code, str(folder)])
    assert rc != 0 and f"{CRAFT}.bitmask is U8 [16384, 4096]" in err, err[-2000:]
    assert peak < baseline + 0.5, f"peak RSS {peak:.2f} GiB (imports alone: {baseline:.2f} GiB)"


def test_loader_checks_the_dense_size_against_available_memory(root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(prune_args(root, root / "tiny", out, "--export", "ct-bitmask")) == 0
    monkeypatch.setattr(export, "_available_memory", lambda: 1 << 16)
    with pytest.raises(MemoryError, match="decodes to .* nothing was loaded"):
        export.load_sparse(out / "ct-bitmask")
    shutil.rmtree(out)
