"""fp32 against bf16 compute on this CPU: time and held-out perplexity of the default model's runs.

    python benchmarks/bench_dtype.py

For each compute dtype: the model loaded in it; uniform Wanda and ECoFLaP-zo at 0.6 with the same
calibration (32 windows x 128 tokens for stage 2, 8 x 128 for stage 1; activation statistics are
accumulated in fp32 either way); the wall time of each stage and of the evaluation (16 held-out
windows of 512 tokens), and the perplexities. Each run is repeated ``--repeat`` times, interleaved
across dtypes, and the median time kept. Appends rows to benchmarks/results/dtype_cpu.csv.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import RESULTS_DIR  # noqa: E402
from ecoflap_fast import data, evaluate, models  # noqa: E402
from ecoflap_fast.bench.harness import Results  # noqa: E402
from ecoflap_fast.prune import PruneConfig, prune_  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "dtype_cpu.csv")
    a = p.parse_args(argv)
    calib, held = data.split(data.wiki_articles())
    bases = {d: models.load_model(a.model, dtype=getattr(torch, d))[0] for d in ("float32", "bfloat16")}
    _, tok = models.load_model(a.model)
    tokens = data.tokenize(tok, calib, max_tokens=2_000_000)
    calibration = data.calibration_windows(tokens, 32, 128, 0)
    stage1 = data.calibration_windows(tokens, 8, 128, 1)
    windows = data.eval_windows(data.tokenize(tok, held[:1500]), 512, 16)
    times: dict = {}
    ppl: dict = {}
    for r in range(a.repeat):
        for dtype, base in bases.items():
            t = time.perf_counter()
            ppl[(dtype, "dense")] = evaluate.perplexity(base, windows, progress=False)
            times.setdefault((dtype, "eval"), []).append(time.perf_counter() - t)
            for alloc in ("uniform", "ecoflap-zo"):
                model = copy.deepcopy(base)
                cfg = PruneConfig(sparsity=a.sparsity, allocator=alloc, nsamples=32, seqlen=128, progress=False)
                t = time.perf_counter()
                rep = prune_(model, calibration, cfg, stage1_calibration=stage1)
                times.setdefault((dtype, alloc), []).append(time.perf_counter() - t)
                times.setdefault((dtype, f"{alloc} stage1"), []).append(rep["timings"]["stage1_s"])
                times.setdefault((dtype, f"{alloc} stage2"), []).append(rep["timings"]["stage2_s"])
                if r == 0:
                    ppl[(dtype, alloc)] = evaluate.perplexity(model, windows, progress=False)
                del model
            print(f"round {r + 1}: {dtype} done", flush=True)
    res = Results("dtype", "cpu")
    shape = f"{a.model}, sparsity {a.sparsity}, 32x128 calibration tokens"
    for (dtype, what), ts in times.items():
        res.add("time", what, shape, dtype, "time", "s", statistics.median(ts), min(ts), max(ts))
    for (dtype, what), v in ppl.items():
        res.add("perplexity", what, shape, dtype, "ppl", "ppl", v)
    for dtype in bases:
        line = ", ".join(f"{w} {statistics.median(ts):.1f}s" for (d, w), ts in times.items() if d == dtype)
        line += "; ppl " + ", ".join(f"{w} {v:.2f}" for (d, w), v in ppl.items() if d == dtype)
        print(f"{dtype}: {line}")
    print(f"wrote {len(res.rows)} rows to {res.write(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
