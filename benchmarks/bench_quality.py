"""Held-out quality of real models pruned with each allocator at several sparsities, over seeds.

    python benchmarks/bench_quality.py --models default --sparsities 0.5 0.6 0.7 --seeds 0 1 2 3
    python benchmarks/bench_quality.py --models qwen2.5-coder-0.5b --dtype bfloat16
    python benchmarks/bench_quality.py --models all-minilm-l6-v2 all-mpnet-base-v2
    python benchmarks/bench_quality.py --models dinov2-small

Same calibration for every method of a seed: 32 windows x 256 tokens for stage 2 and OWL (x 128 for
encoders), 4 windows x 128 tokens (2 batches) for ECoFLaP's stage 1, drawn from the calibration split with the
seed; Wanda is the local pruner; ECoFLaP with m = s + 0.1 and block groups. Quality: held-out
perplexity on the first 16 non-overlapping 512-token windows (language models), or the cosine of
mean-pooled sentence embeddings with the dense model's on 64 held-out windows of 128 tokens
(text encoders), or of the mean-pooled features of the 35 views (5 each) of the 7 held-out sample
images (vision backbones, calibrated on a seeded draw of 32 of the 95 views of the 19 others; stage
1 on 4 more). Appends rows to benchmarks/results/quality_cpu.csv (shape "<model> s=<sparsity>
seed=<seed>"); the stage-1 split-half agreement and timings are recorded beside the quality.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import RESULTS_DIR  # noqa: E402
from ecoflap_fast import data, evaluate, models, objectives, stream, walk  # noqa: E402
from ecoflap_fast.bench.harness import Results  # noqa: E402
from ecoflap_fast.prune import STAGE1_WINDOWS, PruneConfig, prune_  # noqa: E402

METHODS = ["uniform", "owl", "ecoflap-zo", "ecoflap-fo"]


VIEWS = 5  # distinct views of every image (data.augment_pairs: original, mirrored, three crops)


def _image_batches(model, proc, pairs: list, n: int, seed: int | None, batch_size: int) -> list[dict]:
    """``n`` distinct views of the images (all of them in order when ``seed`` is None, otherwise a
    draw with the seed) as the model's pixel inputs."""
    views = data.augment_pairs(pairs, VIEWS * len(pairs))
    if seed is not None:
        views = random.Random(seed).sample(views, n)
    return data.vlm_batches(views[:n], proc, model, batch_size=batch_size)


def _quality_fn(model, tok, kind: str, held: list[str]):
    """(name, unit, measure(model) -> float): perplexity for language models, embedding cosine with
    the dense model (computed now, before any pruning) for encoders (mean-pooled last hidden states:
    of 64 held-out text windows, or of every view of the held-out images for vision backbones)."""
    if walk.takes_argument(model, "pixel_values"):
        _, held_pairs = data.image_caption_pairs()
        batches = _image_batches(model, tok, held_pairs, VIEWS * len(held_pairs), None, 8)
        dense = evaluate.sentence_embeddings(model, batches)
        return "embedding_cosine", "cos", lambda m: evaluate.embedding_cosine(m, batches, dense)
    if kind in ("causal-lm", "seq2seq"):
        windows = data.eval_windows(data.tokenize(tok, held[:1500]), 512, 16)
        return "ppl", "ppl", lambda m: evaluate.perplexity(m, windows, progress=False)
    windows = data.eval_windows(data.tokenize(tok, held[:1500]), 128, 64)
    batches = [{"input_ids": w} for w in windows.split(8)]
    dense = evaluate.sentence_embeddings(model, batches)
    return "embedding_cosine", "cos", lambda m: evaluate.embedding_cosine(m, batches, dense)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["default"])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--seed-methods",
        nargs="+",
        default=None,
        choices=METHODS,
        help="methods run for every seed (default: all); the others run with the first seed only",
    )
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=None, help="stage-2 window length (default 256; 128 for encoders)")
    p.add_argument("--zo-estimator", default="expected", choices=["expected", "grad", "fd"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--max-sparsity-offset",
        type=float,
        default=None,
        help="ECoFLaP's bound m = sparsity + this (default: the engine's, 0.1); rows are then named "
        '"<method> m=s+<offset>"',
    )
    p.add_argument(
        "--stage1-nsamples",
        type=int,
        default=STAGE1_WINDOWS,
        help=f"ECoFLaP's stage-1 windows of 128 tokens (default {STAGE1_WINDOWS}; batches of up to 4, at least "
        'two); rows are then named "<method> n1=<windows>"',
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "quality_cpu.csv")
    a = p.parse_args(argv)
    if a.stage1_nsamples < 2:
        p.error(f"--stage1-nsamples must be at least 2, got {a.stage1_nsamples}")
    dtype = getattr(torch, a.dtype)
    calib_texts, held_texts = data.split(data.wiki_articles())
    for name in a.models:
        base, tok = models.load_model(name, dtype=dtype)
        kind = objectives.for_model(base).kind
        seqlen = a.seqlen or (256 if kind in ("causal-lm", "seq2seq") else 128)
        metric, unit, measure = _quality_fn(base, tok, kind, held_texts)
        vision = walk.takes_argument(base, "pixel_values")
        if vision:
            calib_pairs, _ = data.image_caption_pairs()
            nsamples = min(a.nsamples, VIEWS * len(calib_pairs))
        else:
            tokens = data.tokenize(tok, calib_texts, max_tokens=4_000_000)
            nsamples = a.nsamples
        res = Results("quality", "cpu")
        t = time.perf_counter()
        dense = measure(base)
        res.add(metric, "dense", f"{name} s=0 seed=0", a.dtype, metric, unit, dense)
        print(f"{name}: dense {metric} {dense:.4f} ({time.perf_counter() - t:.0f}s)", flush=True)
        res.write(a.out)
        for seed in a.seeds:
            if vision:  # images: batches of 8 views for stage 2, 2 batches of 2 for stage 1
                calibration = _image_batches(base, tok, calib_pairs, nsamples, seed, 8)
                stage1 = _image_batches(base, tok, calib_pairs, a.stage1_nsamples, seed + 1, 2)
            else:
                calibration = data.calibration_windows(tokens, nsamples, seqlen, seed)
                stage1 = data.calibration_windows(tokens, a.stage1_nsamples, 128, seed + 1)
            for s in a.sparsities:
                for method in a.methods:
                    if seed != a.seeds[0] and a.seed_methods is not None and method not in a.seed_methods:
                        continue
                    res = Results("quality", "cpu")
                    model = copy.deepcopy(base)
                    bound = a.max_sparsity_offset is not None and method.startswith("ecoflap")
                    cfg = PruneConfig(
                        sparsity=s,
                        allocator=method,
                        nsamples=nsamples,
                        seqlen=seqlen,
                        seed=seed,
                        zo_estimator=a.zo_estimator,
                        max_sparsity=min(s + a.max_sparsity_offset, 0.99) if bound else None,
                        progress=False,
                    )
                    provider = f"{method} m=s+{a.max_sparsity_offset:g}" if bound else method
                    if method.startswith("ecoflap") and a.stage1_nsamples != STAGE1_WINDOWS:
                        provider += f" n1={a.stage1_nsamples}"
                    t = time.perf_counter()
                    rep = prune_(model, calibration, cfg, stage1_calibration=stage1)
                    q = measure(model)
                    shape = f"{name} s={s} seed={seed}"
                    res.add(metric, provider, shape, a.dtype, metric, unit, q)
                    res.add(
                        "achieved_sparsity", provider, shape, a.dtype, "sparsity", "ratio", rep["achieved_sparsity"]
                    )
                    res.add("stage1_time", provider, shape, a.dtype, "time", "s", rep["timings"]["stage1_s"])
                    res.add("stage2_time", provider, shape, a.dtype, "time", "s", rep["timings"]["stage2_s"])
                    half = rep["stage1"].get("split_half_spearman")
                    if half is not None:
                        res.add("split_half_spearman", provider, shape, a.dtype, "spearman", "rho", half)
                    print(
                        f"{name} seed {seed} sparsity {s:.2f} {provider:11s} {metric} {q:10.4f} achieved "
                        f"{rep['achieved_sparsity']:.4f} stage1 {rep['timings']['stage1_s']:.1f}s stage2 "
                        f"{rep['timings']['stage2_s']:.1f}s"
                        + (f" split-half rho {half:.3f}" if half is not None else "")
                        + f" ({time.perf_counter() - t:.0f}s)",
                        flush=True,
                    )
                    if "decision" in rep["stage1"]:
                        print(f"  {rep['stage1']['decision']}", flush=True)
                    res.write(a.out)
                    del model
                    stream.release_memory()  # or every freed copy of the model stays in the heap
        del base
    return 0


if __name__ == "__main__":
    sys.exit(main())
