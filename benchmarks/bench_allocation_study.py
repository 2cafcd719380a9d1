"""Variants of ECoFLaP's allocation rule on real models, against the default rule's stage-1 scores.

    python benchmarks/bench_allocation_study.py --model qwen2.5-coder-0.5b --sparsity 0.6 --seeds 0 --variants tensor
    python benchmarks/bench_allocation_study.py --model all-minilm-l6-v2 --sparsity 0.6 --seeds 0 1 2 3 --variants ends
    python benchmarks/bench_allocation_study.py --model all-minilm-l6-v2 --sparsity 0.6 --seeds 0 1 2 3 \\
        --variants default --directions 4

Same data as bench_quality.py for a seed (so the rows sit beside its uniform and ECoFLaP rows).
Stage 1 (zeroth order, the default estimator) runs once per seed; every variant then turns its
scores into per-matrix sparsities and stage 2 prunes with them as a sparsity map:

- ``default``: the engine's rule (checked to give the engine's own allocation);
- ``ends``: the first and last blocks no sparser than the target, the other blocks sharing the rest
  of the budget by the same rule;
- ``tensor``: every matrix its own group (the engine's ``group="tensor"``).

``--per-window`` prints every stage-1 window's own block scores first (each window a batch of its
own): its total and its blocks relative to its mean block, to see whether one window sets them.

``--directions K`` (encoders' embedding-sensitivity loss only): every stage-1 window is used K
times, each with its own random direction u, in batches of the 4 windows.
Rows are named "ecoflap-zo <variant>" (plus " u=K") in benchmarks/results/quality_cpu.csv.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import RESULTS_DIR  # noqa: E402
from benchmarks.bench_quality import _quality_fn  # noqa: E402
from ecoflap_fast import data, models, objectives, stage1, stream, walk  # noqa: E402
from ecoflap_fast.allocate import ecoflap_allocation  # noqa: E402
from ecoflap_fast.bench.harness import Results  # noqa: E402
from ecoflap_fast.prune import STAGE1_WINDOWS, PruneConfig, allocate, prepare, prune_  # noqa: E402

VARIANTS = ["default", "ends", "tensor"]


def ends_sparsity(sizes: list[int], scores: list[float], sparsity: float, bound: float) -> list[float]:
    """The default rule, then the first and last groups pinned at min(their sparsity, target) and
    the others re-allocated by the rule at the sparsity that keeps the total budget."""
    base = ecoflap_allocation(sizes, scores, sparsity, bound).sparsity
    ends = {0: min(base[0], sparsity), len(sizes) - 1: min(base[-1], sparsity)}
    mid = [g for g in range(len(sizes)) if g not in ends]
    kept = sum(sizes) * (1 - sparsity) - sum(sizes[g] * (1 - s) for g, s in ends.items())
    target = 1 - kept / sum(sizes[g] for g in mid)
    inner = ecoflap_allocation([sizes[g] for g in mid], [scores[g] for g in mid], target, max(bound, target))
    out = [0.0] * len(sizes)
    for g, s in ends.items():
        out[g] = s
    for g, s in zip(mid, inner.sparsity):
        out[g] = s
    return out


def variant_map(name: str, plan: walk.Plan, info: dict, sparsity: float, bound: float) -> dict[str, float]:
    """Matrix name -> sparsity for a variant, from one stage-1 run's report."""
    mats = plan.matrices()
    if name == "tensor":
        names = list(mats)
        alloc = ecoflap_allocation(
            [mats[n].numel for n in names], [info["tensor_scores"][n] for n in names], sparsity, bound
        )
        return dict(zip(names, alloc.sparsity))
    keys = list(info["group_scores"])
    sizes = [sum(m.numel for m in mats.values() if m.block.key == k) for k in keys]
    scores = [info["group_scores"][k] for k in keys]
    if name == "default":
        per = ecoflap_allocation(sizes, scores, sparsity, bound).sparsity
    else:
        per = ends_sparsity(sizes, scores, sparsity, bound)
    per_block = dict(zip(keys, per))
    return {n: per_block[m.block.key] for n, m in mats.items()}


def _print_windows(model, plan: walk.Plan, objective, windows: torch.Tensor) -> None:
    """Every window's block scores from a stage-1 run with one window per batch."""
    batches = walk.as_batches(windows, 1, objective.from_ids)
    res = stage1.tensor_scores(
        model, batches, plan=plan, objective=objective, method="zo", estimator="expected", progress=False
    )
    mats = plan.matrices()
    keys = list(dict.fromkeys(m.block.key for m in mats.values()))
    for b, scores in sorted(res.batch_scores.items()):
        per = [sum(v for n, v in scores.items() if mats[n].block.key == k) for k in keys]
        mean = sum(per) / len(per)
        print(f"  window {b}: total {sum(per):.4g}, blocks / mean " + " ".join(f"{x / mean:.2f}" for x in per))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="*", default=VARIANTS, choices=VARIANTS, help="none: stage 1 only")
    p.add_argument("--directions", type=int, default=1)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--per-window", action="store_true", help="print every stage-1 window's own block scores")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "quality_cpu.csv")
    a = p.parse_args(argv)
    if a.directions < 1:
        p.error(f"--directions must be at least 1, got {a.directions}")
    calib_texts, held_texts = data.split(data.wiki_articles())
    base, tok = models.load_model(a.model, dtype=torch.float32)
    kind = objectives.for_model(base).kind
    if walk.takes_argument(base, "pixel_values"):
        p.error(f"{a.model} takes images: this study runs on text models")
    if a.directions > 1 and kind != "representation":
        p.error(f"--directions needs the embedding-sensitivity loss; {a.model}'s stage-1 loss is {kind}")
    seqlen = 256 if kind in ("causal-lm", "seq2seq") else 128
    metric, unit, measure = _quality_fn(base, tok, kind, held_texts)
    tokens = data.tokenize(tok, calib_texts, max_tokens=4_000_000)
    for seed in a.seeds:
        calibration = data.calibration_windows(tokens, a.nsamples, seqlen, seed)
        stage1 = data.calibration_windows(tokens, STAGE1_WINDOWS, 128, seed + 1).repeat(a.directions, 1)
        cfg = PruneConfig(
            sparsity=a.sparsity, allocator="ecoflap-zo", nsamples=a.nsamples, seqlen=seqlen, seed=seed, progress=False
        )
        plan, objective, batches, stage1_batches, ids = prepare(base, calibration, cfg, stage1)
        engine_map, info = allocate(base, plan, cfg, batches, stage1_batches, objective, ids)
        print(f"{a.model} seed {seed}: split-half rho {info['split_half_spearman']:.3f}", flush=True)
        if a.per_window:
            _print_windows(base, plan, objective, stage1)
        for v in a.variants:
            smap = variant_map(v, plan, info, a.sparsity, cfg.m)
            if v == "default" and smap != engine_map:
                raise SystemExit("the study's default rule differs from the engine's allocation")
            model = copy.deepcopy(base)
            t = time.perf_counter()
            rep = prune_(
                model,
                calibration,
                PruneConfig(
                    sparsity=a.sparsity,
                    nsamples=a.nsamples,
                    seqlen=seqlen,
                    seed=seed,
                    progress=False,
                    sparsity_map=smap,
                ),
            )
            q = measure(model)
            provider = f"ecoflap-zo {v}" + (f" u={a.directions}" if a.directions > 1 else "")
            shape = f"{a.model} s={a.sparsity} seed={seed}"
            res = Results("quality", "cpu")
            res.add(metric, provider, shape, "float32", metric, unit, q)
            res.add("achieved_sparsity", provider, shape, "float32", "sparsity", "ratio", rep["achieved_sparsity"])
            res.add("split_half_spearman", provider, shape, "float32", "spearman", "rho", info["split_half_spearman"])
            res.write(a.out)
            blocks = {}
            for n, m in plan.matrices().items():
                blocks.setdefault(m.block.key, []).append((smap[n], m.numel))
            per_block = [sum(s * k for s, k in b) / sum(k for _, k in b) for b in blocks.values()]
            print(
                f"  {provider}: {metric} {q:.4f}, achieved {rep['achieved_sparsity']:.4f}, block sparsities "
                + " ".join(f"{s:.3f}" for s in per_block)
                + f" ({time.perf_counter() - t:.0f}s)",
                flush=True,
            )
            del model
            stream.release_memory()
    return 0


if __name__ == "__main__":
    sys.exit(main())
