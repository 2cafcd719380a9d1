"""Vision(-language) models through the command line and the evaluation functions.

Tiny random models of the real classes (``vlm_zoo``), saved with their processors to a folder and
loaded back the way a user's checkpoint is (``AutoProcessor.from_pretrained``): calibration on the
embedded pairs, on a folder of images with captions and on a JSON-lines file; ``--towers``; the
evaluation of every kind in report.json; every bad input refused with one line before any work.
The evaluation functions are checked against the same quantities computed here from the model's
raw outputs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from naive_reference import block_zero_fraction
from vlm_zoo import TOWERS, build_model, build_vlm, held_out

from ecoflap_fast import checkpoint, evaluate
from ecoflap_fast.cli import main
from ecoflap_fast.prune import PruneConfig, prune_

pytestmark = pytest.mark.usefixtures("one_thread")

SAVED = ("llava", "blip2", "vit", "siglip")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    for name in SAVED:
        model, proc = build_model(name)
        model.save_pretrained(root / name)
        proc.save_pretrained(root / name)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    captions = ["a red square on a table", "a photo of a cat", "a blue circle"]
    for i, c in enumerate(captions):
        Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(images / f"im{i}.png")
        (images / f"im{i}.txt").write_text(c)
    (root / "pairs.jsonl").write_text(
        "\n".join(json.dumps({"image": f"images/im{i}.png", "caption": c}) for i, c in enumerate(captions))
    )
    return root


def _run(root: Path, name: str, out: str, *extra) -> list[str]:
    return [
        "prune", "--model", str(root / name), "--sparsity", "0.5", "--nsamples", "8", "--stage1-nsamples", "4",
        "--batch-size", "4", "--no-progress", "--output", str(root / "runs" / out), *extra,
    ]  # fmt: skip


def _report(root: Path, out: str) -> dict:
    return json.loads((root / "runs" / out / "report.json").read_text())


# ---- towers -------------------------------------------------------------------------------------
def test_one_global_budget_across_towers_by_default():
    model, _, batches = build_vlm("blip2")
    rep = prune_(model, batches, PruneConfig(sparsity=0.5, allocator="ecoflap-zo", batch_size=4, progress=False))
    towers = rep["towers"]
    assert list(towers) == ["vision", "qformer", "language"] and all(t["pruned"] for t in towers.values())
    assert rep["achieved_sparsity"] == pytest.approx(0.5, abs=0.03)
    per = [t["achieved_sparsity"] for t in towers.values()]
    assert max(per) - min(per) > 0.05  # one budget shared, not 0.5 in every tower
    total = sum(t["numel"] * t["achieved_sparsity"] for t in towers.values()) / sum(t["numel"] for t in towers.values())
    assert total == pytest.approx(rep["achieved_sparsity"], abs=1e-9)
    for name, t in towers.items():
        assert t["achieved_sparsity"] == pytest.approx(block_zero_fraction(model, TOWERS["blip2"][name]), abs=1e-9)


def test_towers_restrict_pruning_to_the_named_towers():
    model, _, batches = build_vlm("blip2")
    fresh, _ = build_model("blip2")
    rep = prune_(
        model, batches, PruneConfig(sparsity=0.5, towers=("vision", "language"), batch_size=4, progress=False)
    )
    assert {n for n, t in rep["towers"].items() if t["pruned"]} == {"vision", "language"}
    assert rep["towers"]["qformer"] == {
        "path": "qformer.encoder.layer", "pruned": False, "numel": rep["towers"]["qformer"]["numel"],
        "achieved_sparsity": 0.0,
    }  # fmt: skip
    for n, p in model.qformer.named_parameters():
        assert torch.equal(p, fresh.qformer.get_parameter(n)), n
    for tower in ("vision", "language"):
        assert block_zero_fraction(model, TOWERS["blip2"][tower]) == pytest.approx(0.5, abs=0.03)
    assert not any(n.startswith("qformer.") for n in rep["layer_sparsity"])
    assert rep["plan"]["towers_left_dense"] == [{"name": "qformer", "path": "qformer.encoder.layer"}]


def test_unknown_tower_is_refused_before_any_weight_changes():
    model, _, batches = build_vlm("llava")
    fresh, _ = build_model("llava")
    with pytest.raises(ValueError, match="no tower named 'qformer'; its towers are vision, language"):
        prune_(model, batches, PruneConfig(towers=("vision", "qformer"), progress=False))
    for n, p in model.named_parameters():
        assert torch.equal(p, fresh.get_parameter(n)), n
    with pytest.raises(ValueError, match="tuple of tower names"):
        PruneConfig(towers="vision").validate()


# ---- the command line ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAVED)
def test_cli_prunes_and_evaluates_every_kind(folders, name, capsys):
    assert main(_run(folders, name, f"eval-{name}", "--eval", "--allocator", "ecoflap-zo")) == 0
    rep = _report(folders, f"eval-{name}")
    assert (folders / "runs" / f"eval-{name}" / "sparsity.png").is_file()
    assert list(rep["towers"]) == list(TOWERS[name])
    assert rep["achieved_sparsity"] == pytest.approx(0.5, abs=0.03)
    assert rep["stage1"]["method"].startswith("ECoFLaP stage 1")
    dense, pruned = rep["eval"]["dense"], rep["eval"]["pruned"]
    line = capsys.readouterr().out
    if name in ("llava", "blip2"):
        assert rep["eval_metric"] == "caption_loss"
        assert dense["caption_ppl"] == pytest.approx(math.exp(dense["caption_loss"]))
        assert pruned["caption_loss"] > 0 and pruned["caption_loss"] != dense["caption_loss"]
        assert "caption loss" in line
    elif name == "vit":
        assert rep["eval_metric"] == "top1_agreement"
        assert dense == {"top1_agreement": 1.0} and 0 <= pruned["top1_agreement"] <= 1
    else:
        assert rep["eval_metric"] == "contrastive_loss" and rep["loss_pruned"] == pruned["contrastive_loss"]
        assert set(pruned) == {"contrastive_loss", "image_to_text_r1", "text_to_image_r1", "pairs"}
        assert "R@1" in line


def test_cli_own_pairs_and_towers_as_a_user_runs_it(folders):
    """``python -m ecoflap_fast prune`` on a saved folder, with a folder of captioned images."""
    cmd = [sys.executable, "-m", "ecoflap_fast", *_run(folders, "blip2", "own", "--allocator", "uniform")]
    cmd += ["--calib-images", str(folders / "images"), "--towers", "vision,language"]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PATH": "/usr/bin:/bin"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rep = _report(folders, "own")
    assert {n: t["pruned"] for n, t in rep["towers"].items()} == {"vision": True, "language": True, "qformer": False}
    assert rep["towers"]["vision"]["achieved_sparsity"] == pytest.approx(0.5, abs=0.03)
    assert rep["config"]["towers"] == ["vision", "language"]


def test_cli_jsonl_pairs(folders):
    jsonl = str(folders / "pairs.jsonl")
    assert main(_run(folders, "llava", "jsonl", "--allocator", "uniform", "--calib-jsonl", jsonl)) == 0
    assert _report(folders, "jsonl")["achieved_sparsity"] == pytest.approx(0.5, abs=0.03)


def _bad_inputs(root: Path) -> list[tuple[list[str], str]]:
    from PIL import Image

    for sub in ("nocap", "broken"):
        (root / sub).mkdir(exist_ok=True)
    Image.new("RGB", (20, 20), (200, 10, 10)).save(root / "nocap" / "a.png")
    (root / "broken" / "x.png").write_bytes(b"not an image")
    (root / "broken" / "x.txt").write_text("a caption")
    (root / "nocaption.jsonl").write_text(json.dumps({"image": "images/im1.png"}))
    return [
        (["--towers", "vision,lang"], "no tower named 'lang'; its towers are vision, qformer, language"),
        (["--calib-images", str(root / "missing")], "does not exist"),
        (["--calib-images", str(root / "nocap")], "has no caption file 'a.txt'"),
        (["--calib-images", str(root / "broken")], "could not be read"),
        (["--calib-jsonl", str(root / "nocaption.jsonl")], "has no 'caption'"),
        (["--calib-images", str(root / "images"), "--calib-jsonl", str(root / "pairs.jsonl")], "not both"),
        (["--calib-text", str(root / "pairs.jsonl")], "calibrated on image-caption pairs"),
    ]


def test_cli_bad_inputs_one_line_nothing_written(folders, capsys):
    for k, (extra, message) in enumerate(_bad_inputs(folders)):
        out = f"bad-{k}"
        assert main(_run(folders, "blip2", out, "--allocator", "uniform", *extra)) != 0, extra
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("ecoflap-fast: error:") and message in err[0], (extra, err)
        assert not (folders / "runs" / out).exists()


def test_cli_model_without_processor_and_text_model_with_images(folders, tmp_path, capsys):
    from tiny_models import tiny_llama, word_tokenizer

    bare = tmp_path / "bare"
    build_model("llava")[0].save_pretrained(bare)  # weights and config, no processor files
    args = ["prune", "--model", str(bare), "--nsamples", "4", "--allocator", "uniform", "--no-progress",
            "--output", str(tmp_path / "np")]  # fmt: skip
    assert main(args) != 0
    assert "has no processor files" in capsys.readouterr().err
    lm = tmp_path / "lm"
    tiny_llama().save_pretrained(lm)
    word_tokenizer().save_pretrained(lm)
    args = ["prune", "--model", str(lm), "--calib-images", str(folders / "images"), "--nsamples", "4", "--seqlen", "16",
            "--allocator", "uniform", "--no-progress", "--output", str(tmp_path / "o")]  # fmt: skip
    assert main(args) != 0
    assert "--calib-images / --calib-jsonl are for vision models" in capsys.readouterr().err


# ---- evaluation functions -----------------------------------------------------------------------
def test_caption_loss_is_the_mean_over_caption_tokens():
    model, proc, _ = build_vlm("llava")
    held = held_out("llava", proc, model)
    got = evaluate.caption_loss(model, held, progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in held:
            logits = model(**b, use_cache=False).logits[:, :-1].float()
            target = b["labels"][:, 1:]
            keep = (target != -100) & b["attention_mask"][:, 1:].bool()
            ce = F.cross_entropy(logits[keep], target[keep], reduction="sum")
            total, count = total + float(ce), count + int(keep.sum())
    assert got["caption_tokens"] == count > 0
    assert got["caption_loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["caption_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_retrieval_recall_and_loss():
    model, proc, _ = build_vlm("clip")
    held = held_out("clip", proc, model)
    got = evaluate.retrieval(model, held, progress=False)
    with torch.no_grad():
        img = [model.get_image_features(pixel_values=b["pixel_values"]).pooler_output for b in held]
        txt = [
            model.get_text_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).pooler_output
            for b in held
        ]
        img, txt = F.normalize(torch.cat(img), dim=-1), F.normalize(torch.cat(txt), dim=-1)
        loss = sum(float(model(**b, return_loss=True).loss) for b in held) / len(held)
    sim = img @ txt.T
    n = sim.shape[0]
    assert got["pairs"] == n == 7
    assert got["image_to_text_r1"] == pytest.approx(float((sim.argmax(1) == torch.arange(n)).float().mean()))
    assert got["text_to_image_r1"] == pytest.approx(float((sim.argmax(0) == torch.arange(n)).float().mean()))
    assert got["contrastive_loss"] == pytest.approx(loss, rel=1e-5)


def test_retrieval_counts_a_perfect_match():
    """Text embeddings equal to the image embeddings: every pair is retrieved (R@1 = 1 both ways)."""
    model, proc, _ = build_vlm("clip")
    held = held_out("clip", proc, model)
    forward = model.forward

    def mirrored(*a, **k):
        out = forward(*a, **k)
        out.text_embeds = out.image_embeds.clone()
        return out

    model.forward = mirrored
    got = evaluate.retrieval(model, held, progress=False)
    assert got["image_to_text_r1"] == got["text_to_image_r1"] == 1.0


def test_top1_agreement_with_the_dense_model():
    model, proc, batches = build_vlm("vit")
    held = held_out("vit", proc, model)
    dense = evaluate.predictions(model, held)
    assert evaluate.top1_agreement(model, held, dense) == 1.0
    with torch.no_grad():
        model.classifier.weight.mul_(-1)  # reverses the ranking of the classes: argmax becomes argmin
        model.classifier.bias.mul_(-1)
    flipped = evaluate.top1_agreement(model, held, dense)
    assert flipped == 0.0
    with pytest.raises(ValueError, match="needs a classifier model"):
        evaluate.predictions(build_model("clip")[0], held)


def test_inspect_lists_the_towers(folders, capsys):
    assert main(["inspect", "--model", str(folders / "blip2")]) == 0
    out = capsys.readouterr().out
    for tower, (path,) in TOWERS["blip2"].items():
        assert f"{tower:9s} {path}:" in out


@pytest.mark.parametrize("name, allocator", [(n, "uniform") for n in SAVED] + [("llava", "owl")])
def test_streamed_run_equals_in_memory(folders, name, allocator):
    """--stream --eval on every kind of vision model (caption loss, contrastive loss, top-1 agreement):
    the later towers are calibrated on the pruned upstream towers (spilled, not read again from the
    checkpoint), the blocks are read on their call during the evaluation, and the figures equal an
    in-memory run's (uniform and OWL allocation: a streamed stage 1 needs a single block stack)."""
    mem, streamed = f"{name}-{allocator}-mem", f"{name}-{allocator}-str"
    assert main(_run(folders, name, mem, "--eval", "--no-stream", "--allocator", allocator, "--save-model")) == 0
    assert main(_run(folders, name, streamed, "--eval", "--stream", "--allocator", allocator)) == 0
    a, b = (checkpoint.Checkpoint(folders / "runs" / o / "model") for o in (mem, streamed))
    assert set(a.files) == set(b.files) and all(torch.equal(a.get(n), b.get(n)) for n in a.files)
    ra, rb = (json.loads((folders / "runs" / o / "report.json").read_text()) for o in (mem, streamed))
    assert rb["streamed"] and not ra["streamed"]
    assert ra["layer_sparsity"] == rb["layer_sparsity"]
    figures = {k: ra[k] for k in ("loss_dense", "loss_pruned") if ra.get(k) is not None}
    for phase in ("dense", "pruned"):  # nested figures (caption loss, top-1 agreement)
        figures |= {f"{phase}.{k}": v for k, v in (ra.get("eval") or {}).get(phase, {}).items()}
    streamed = {k: rb[k] for k in ("loss_dense", "loss_pruned") if k in figures}
    for phase in ("dense", "pruned"):
        streamed |= {f"{phase}.{k}": v for k, v in (rb.get("eval") or {}).get(phase, {}).items()}
    assert figures and streamed == pytest.approx(figures, rel=1e-6)
    assert not [p.name for p in (folders / "runs").iterdir() if p.name.startswith(".")]  # no spill left


def test_streamed_run_checks_the_disk_for_its_checkpoint_and_spill(folders, monkeypatch, capsys):
    """Before any work: the pruned checkpoint a streamed run writes as it goes, plus the upstream towers
    it keeps in the compute dtype, must fit; with room for the checkpoint alone a LLaVA run is refused."""
    import shutil as sh

    from ecoflap_fast import _fs

    written = sum(p.stat().st_size for p in (folders / "llava").glob("*.safetensors"))  # fp32 source, fp32 out
    real = sh.disk_usage

    def short(path, free):
        return real(path)._replace(free=free)

    out = folders / "runs" / "disk"
    monkeypatch.setattr(_fs.shutil, "disk_usage", lambda p: short(p, int(written * 1.02)))
    assert main(_run(folders, "llava", "disk", "--stream", "--allocator", "uniform")) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in out.parent.glob(".disk*")]
    monkeypatch.setattr(_fs.shutil, "disk_usage", lambda p: short(p, int(written * 3)))
    assert main(_run(folders, "llava", "disk", "--stream", "--allocator", "uniform")) == 0
