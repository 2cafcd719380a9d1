"""Depth pruning: held-out perplexity after removing K blocks with each scorer, measured speed of the
smaller checkpoints, and depth + width against width alone at the same parameter budget.

    python benchmarks/bench_depth.py --model default
    python benchmarks/bench_depth.py --model qwen2.5-coder-0.5b

Scorers: iterative, bi, ecoflap (the engine's) and "last" (drop the last K blocks). The iterative
order for the largest K gives every smaller K (each step is greedy); the one-shot scorers rank once.
Calibration for the scorers: 8 windows x 128 tokens of the calibration split; perplexity: the first
16 non-overlapping 512-token windows of the held-out articles. Speed: each model is saved and loaded
back with plain ``transformers.AutoModelForCausalLM.from_pretrained`` in fp32; prefill of 512 tokens
(batch 1) and greedy decoding of 32 tokens, medians of 9 runs after a warm-up; the ideal ratio is the
dense model's compute parameters (blocks + head) over the pruned model's. Appends rows to
benchmarks/results/depth_cpu.csv.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import RESULTS_DIR  # noqa: E402
from ecoflap_fast import data, depth, evaluate, models, objectives, stream, walk  # noqa: E402
from ecoflap_fast.bench.harness import Results  # noqa: E402
from ecoflap_fast.prune import PruneConfig, prune_  # noqa: E402

SCORERS = ["iterative", "bi", "ecoflap", "last"]


def _compute_params(model) -> int:
    """Parameters a forward multiplies with: every block parameter plus the head (not the embedding
    lookup)."""
    plan = walk.structure(model)
    blocks = sum(p.numel() for s in plan.stacks for p in s.modules.parameters())
    return blocks + model.get_output_embeddings().weight.numel()


@torch.no_grad()
def _speeds(folders: dict[str, Path], prompt: torch.Tensor, reps: int = 9) -> dict[str, tuple[float, float]]:
    """{name: (prefill ms, decode ms for 32 greedy tokens)}, medians over ``reps`` rounds; every folder
    loaded with plain transformers, and the models measured in turn within each round (so a slow
    stretch of the machine hits all of them alike), after one warm-up round."""
    from transformers import AutoModelForCausalLM

    models_ = {k: AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval() for k, f in folders.items()}
    samples = {k: ([], []) for k in folders}
    for i in range(reps + 1):
        for k, model in models_.items():
            t = time.perf_counter()
            model(prompt, use_cache=False)
            p = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
            d = time.perf_counter() - t
            if i:  # the first round warms up
                samples[k][0].append(p * 1e3)
                samples[k][1].append(d * 1e3)
    return {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6, 8])
    p.add_argument("--scorers", nargs="+", default=SCORERS, choices=SCORERS)
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows of the scorers")
    p.add_argument("--width-k", type=int, default=4, help="K of the depth + width comparison")
    p.add_argument("--width-sparsity", type=float, default=0.5)
    p.add_argument("--no-speed", action="store_true", help="perplexities only")
    p.add_argument("--speed-only", action="store_true", help="speed of the iterative choices only")
    p.add_argument(
        "--iterative-order",
        type=int,
        nargs="+",
        default=None,
        help="reuse an iterative removal order (original indices)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "depth_cpu.csv")
    a = p.parse_args(argv)
    quality, speed = not a.speed_only, not a.no_speed
    if a.speed_only:
        a.scorers = ["iterative"]
    base, tok = models.load_model(a.model)
    obj = objectives.for_model(base)
    calib, held = data.split(data.wiki_articles())
    tokens = data.tokenize(tok, calib[:3000])
    windows = data.calibration_windows(tokens, a.nsamples, 128, a.seed + 2)
    batches = walk.as_batches(windows, 4, obj.from_ids)
    stage2 = data.calibration_windows(tokens, 32, 256, a.seed)
    stage1 = data.calibration_windows(tokens, 8, 128, a.seed + 1)
    held_windows = data.eval_windows(data.tokenize(tok, held[:1500]), 512, 16)
    plan = walk.plan(base, batches[0])
    n = len(plan.stacks[0].blocks)
    kmax = max(a.ks)
    res = Results("depth", "cpu")
    label = f"{a.model}, {n} blocks"
    if quality:
        t = time.perf_counter()
        dense_ppl = evaluate.perplexity(base, held_windows, progress=False)
        res.add("perplexity", "dense", f"{label} K=0", "float32", "ppl", "ppl", dense_ppl)
        print(f"dense perplexity {dense_ppl:.2f} ({time.perf_counter() - t:.0f}s)", flush=True)

    orders = {}
    for scorer in a.scorers:
        t = time.perf_counter()
        if scorer == "last":
            orders[scorer] = list(range(n - 1, n - 1 - kmax, -1))
        elif scorer == "iterative" and a.iterative_order:
            orders[scorer] = a.iterative_order[:kmax]
        else:
            cfg = depth.DepthConfig(remove=kmax, scorer=scorer, seed=a.seed, progress=False)
            orders[scorer] = depth.choose_blocks(base, plan, obj, batches, kmax, cfg)["removal_order"]
        secs = time.perf_counter() - t
        if scorer != "last" and not (scorer == "iterative" and a.iterative_order):
            res.add("scoring_time", scorer, f"{label} K={kmax}", "float32", "time", "s", secs)
        print(f"{scorer:9s} removal order {orders[scorer]} ({secs:.0f}s)", flush=True)

    prompt = held_windows[:1]
    with tempfile.TemporaryDirectory(prefix="ecoflap-depth-") as tmp:
        folders = {0: Path(tmp) / "dense"}
        if speed:
            base.save_pretrained(folders[0])
        dense_params = _compute_params(base)
        ideal = {}
        for k in a.ks:
            for scorer in a.scorers:
                model = copy.deepcopy(base)
                mplan = walk.plan(model, batches[0])
                depth.remove_blocks_(model, mplan, sorted(orders[scorer][:k]))
                shape = f"{label} K={k}"
                line = f"K={k} {scorer:9s} removed {sorted(orders[scorer][:k])}"
                if quality:
                    ppl = evaluate.perplexity(model, held_windows, progress=False)
                    res.add("perplexity", scorer, shape, "float32", "ppl", "ppl", ppl)
                    line += f" ppl {ppl:10.2f}"
                if scorer == "iterative" and speed:
                    folders[k] = Path(tmp) / f"k{k}"
                    model.save_pretrained(folders[k])
                    ideal[k] = dense_params / _compute_params(model)
                print(line, flush=True)
                del model, mplan
                gc.collect()
                stream.release_memory()  # or the freed copies stay in the heap, a model per round
        if speed:
            for k, (pre, dec) in _speeds(folders, prompt).items():
                prov, shape = ("dense", f"{label} K=0") if k == 0 else ("iterative", f"{label} K={k}")
                res.add("prefill_512", prov, shape, "float32", "time", "ms", pre)
                res.add("decode_32", prov, shape, "float32", "time", "ms", dec)
                if k:
                    res.add("ideal_speedup", prov, shape, "float32", "ratio", "x", ideal[k])
                print(f"K={k}: prefill {pre:.0f} ms, decode {dec:.0f} ms" + (f", ideal {ideal[k]:.3f}x" if k else ""))

    if not quality:
        print(f"wrote {len(res.rows)} rows to {res.write(a.out)}")
        return 0
    # depth K + width s against width alone at the same number of remaining block weights
    k, s = a.width_k, a.width_sparsity
    model = copy.deepcopy(base)
    depth.remove_blocks_(model, walk.plan(model, batches[0]), sorted(orders.get("iterative", orders[a.scorers[0]])[:k]))
    cfg = dict(nsamples=32, seqlen=256, seed=a.seed, progress=False)
    prune_(model, stage2, PruneConfig(sparsity=s, allocator="uniform", **cfg))
    both = evaluate.perplexity(model, held_windows, progress=False)
    equiv = 1 - (n - k) / n * (1 - s)
    res.add("depth_plus_width", "iterative+uniform", f"{label} K={k} s={s}", "float32", "ppl", "ppl", both)
    print(f"depth K={k} + width {s}: ppl {both:.2f}; width alone at {equiv:.4f}:", flush=True)
    for alloc in ("uniform", "ecoflap-zo"):
        del model
        gc.collect()
        stream.release_memory()
        model = copy.deepcopy(base)
        prune_(model, stage2, PruneConfig(sparsity=equiv, allocator=alloc, **cfg), stage1_calibration=stage1)
        ppl = evaluate.perplexity(model, held_windows, progress=False)
        res.add("width_only", alloc, f"{label} s={equiv:.4f}", "float32", "ppl", "ppl", ppl)
        print(f"  {alloc:10s} ppl {ppl:.2f}", flush=True)
    print(f"wrote {len(res.rows)} rows to {res.write(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
