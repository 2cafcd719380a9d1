"""Held-out perplexity of the default model pruned with each allocator at several sparsities.

    python benchmarks/bench_quality.py --sparsities 0.5 0.6 0.7

Same calibration data for every method: 32 windows x 256 tokens for stage 2 (and OWL), 2 batches of
4 x 128 tokens for ECoFLaP's stage 1; perplexity on the first 16 non-overlapping 512-token windows of
the held-out articles. Appends rows to benchmarks/results/quality_cpu.csv and writes a plot.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import RESULTS_DIR  # noqa: E402
from benchmarks.report import quality_plot  # noqa: E402
from ecoflap_fast import data, evaluate, models  # noqa: E402
from ecoflap_fast.bench.harness import Results, read_results  # noqa: E402
from ecoflap_fast.prune import PruneConfig, prune_  # noqa: E402

METHODS = ["uniform", "owl", "ecoflap-zo", "ecoflap-fo"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--zo-estimator", default="grad", choices=["grad", "fd"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "quality_cpu.csv")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    base, tok = models.load_model("default")
    calib, held = data.split(data.wiki_articles())
    tokens = data.tokenize(tok, calib)
    calibration = data.calibration_windows(tokens, a.nsamples, a.seqlen, a.seed)
    stage1 = data.calibration_windows(tokens, 8, 128, a.seed + 1)
    windows = data.eval_windows(data.tokenize(tok, held), 512, 16)
    res = Results("quality", "cpu")
    t = time.perf_counter()
    dense = evaluate.perplexity(base, windows, progress=False)
    res.add("perplexity", "dense", "0", "float32", "ppl", "ppl", dense)
    print(f"dense perplexity {dense:.2f} ({time.perf_counter() - t:.0f}s)", flush=True)
    for s in a.sparsities:
        for method in a.methods:
            model = copy.deepcopy(base)
            cfg = PruneConfig(
                sparsity=s,
                allocator=method,
                nsamples=a.nsamples,
                seqlen=a.seqlen,
                seed=a.seed,
                zo_estimator=a.zo_estimator,
                progress=False,
            )
            t = time.perf_counter()
            rep = prune_(model, calibration, cfg, stage1_calibration=stage1)
            ppl = evaluate.perplexity(model, windows, progress=False)
            res.add("perplexity", method, f"{s}", "float32", "ppl", "ppl", ppl)
            res.add("achieved_sparsity", method, f"{s}", "float32", "sparsity", "ratio", rep["achieved_sparsity"])
            res.add("stage1_time", method, f"{s}", "float32", "time", "s", rep["timings"]["stage1_s"])
            res.add("stage2_time", method, f"{s}", "float32", "time", "s", rep["timings"]["stage2_s"])
            print(
                f"sparsity {s:.2f} {method:11s} ppl {ppl:9.2f} achieved {rep['achieved_sparsity']:.4f} "
                f"stage1 {rep['timings']['stage1_s']:.1f}s stage2 {rep['timings']['stage2_s']:.1f}s "
                f"({time.perf_counter() - t:.0f}s)",
                flush=True,
            )
            del model
    res.write(a.out)
    quality_plot(read_results(a.out), a.out.with_suffix(".png"))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
