"""Stage 1 on the default model: the fast zeroth-order implementations against the slow reference.

    python benchmarks/bench_stage1.py --blocks 26 27 28 29

Reference: one full forward per perturbation, in the official order (ecoflap_fast.reference.stage1).
Fast 'fd': cached block inputs, ± perturbations of a block's tensors batched into one forward.
'grad': one backward per batch, ⟨z, ∇L⟩ with the same z. All three use the same seeds and batches
(2 batches of 4 x 128 tokens by default). Per-tensor agreement (relative error of fast vs reference)
and wall time are appended to benchmarks/results/stage1_cpu.csv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import RESULTS_DIR  # noqa: E402
from ecoflap_fast import data, models, stage1, walk  # noqa: E402
from ecoflap_fast.bench.harness import Results  # noqa: E402
from ecoflap_fast.reference import stage1 as ref_stage1  # noqa: E402


def _errors(fast: dict, ref: dict) -> list[float]:
    return sorted(abs(fast[n] - ref[n]) / ref[n] for n in ref)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs="+", default=[26, 27, 28, 29])
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "stage1_cpu.csv")
    a = p.parse_args(argv)
    model, tok = models.load_model("default")
    calib, _ = data.split(data.wiki_articles())
    windows = data.calibration_windows(data.tokenize(tok, calib), a.batches * a.batch_size, a.seqlen, a.seed + 1)
    batches = list(windows.split(a.batch_size))
    mats = walk.plan(model, {"input_ids": batches[0]}).matrices()
    layers = {n: m.weight() for n, m in mats.items()}
    only = {n for n, m in mats.items() if m.block.index in set(a.blocks)}
    res = Results("stage1", "cpu")
    shape = f"{len(only)} tensors in blocks {a.blocks}, {a.batches}x{a.batch_size}x{a.seqlen} tokens"

    t = time.perf_counter()
    ref = ref_stage1.zo_tensor_scores(model, layers, batches, seed=a.seed, only=only)
    t_ref = time.perf_counter() - t
    print(f"reference (full forward per perturbation): {t_ref:.1f}s", flush=True)

    t = time.perf_counter()
    fd = stage1.zo_fd_scores(model, batches, seed=a.seed, only=only, progress=False)
    t_fd = time.perf_counter() - t
    fd = {n: fd[n] for n in only}
    t = time.perf_counter()
    gr_all = stage1.zo_grad_scores(model, batches, seed=a.seed, progress=False)
    t_gr = time.perf_counter() - t
    gr = {n: gr_all[n] for n in only}
    # The gradient estimator scores every tensor of the model in that time; the reference would take
    # about t_ref * (all tensors / scored tensors) x (mean depth factor) for the same: report both.
    res.add("zo_stage1", "reference", shape, "float32", "time", "s", t_ref)
    for name, scores, secs in [("fast_fd", fd, t_fd), ("grad_estimator", gr, t_gr)]:
        err = _errors(scores, ref)
        med, p90, worst = statistics.median(err), err[int(0.9 * (len(err) - 1))], err[-1]
        res.add("zo_stage1", name, shape, "float32", "time", "s", secs)
        res.add("zo_stage1", name, shape, "float32", "speedup_vs_reference", "x", t_ref / secs)
        res.add("zo_stage1", name, shape, "float32", "rel_err_median", "ratio", med)
        res.add("zo_stage1", name, shape, "float32", "rel_err_p90", "ratio", p90)
        res.add("zo_stage1", name, shape, "float32", "rel_err_max", "ratio", worst)
        within = sum(e <= 0.01 for e in err)
        print(
            f"{name:15s} {secs:7.1f}s ({t_ref / secs:5.1f}x faster); rel. error vs reference: median {100 * med:.3f}%, "
            f"p90 {100 * p90:.3f}%, max {100 * worst:.3f}%; {within}/{len(err)} tensors within 1%",
            flush=True,
        )
    print(f"(the gradient estimator's {t_gr:.1f}s covers all {len(layers)} tensors, not only the {len(only)} compared)")
    print(f"wrote {res.write(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
