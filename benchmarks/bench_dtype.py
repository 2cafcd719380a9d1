"""fp32 against bf16 compute on this CPU: time and held-out perplexity of the default model's runs,
and ECoFLaP's pruning time against uniform Wanda's on the same windows.

    python benchmarks/bench_dtype.py

For each compute dtype: the model loaded in it; uniform Wanda and ECoFLaP-zo at 0.6 with the same
calibration (32 windows x 128 tokens for stage 2, 4 x 128 for stage 1; activation statistics are
accumulated in fp32 either way); the wall time of each stage and of the evaluation (16 held-out
windows of 512 tokens), and the perplexities. Each run is repeated ``--repeat`` times, interleaved
across dtypes, and the median time kept. A dtype whose forward is more than 2x slower than the
fastest one (bf16 on a CPU without bf16 matrix instructions) gets its GEMM throughput, a forward and
the dense perplexity on a few windows only. Appends rows to benchmarks/results/dtype_cpu.csv.
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
from ecoflap_fast import data, evaluate, models, precision  # noqa: E402
from ecoflap_fast.bench.harness import Results  # noqa: E402
from ecoflap_fast.prune import STAGE1_WINDOWS, PruneConfig, prune_  # noqa: E402


def _gemm_gflops(dtype, reps: int = 10) -> float:
    """[512, 576] x [576, 1536] (the default model's MLP shape at 4 x 128 tokens), GFLOP/s."""
    a, b = torch.randn(512, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * 512 * 576 * 1536 * reps / (time.perf_counter() - t) / 1e9


def _forward_s(model, ids, reps: int = 3) -> float:
    """Median seconds of a forward (one call only when it takes more than 10 s)."""
    ts = []
    with torch.no_grad():
        for _ in range(reps):
            t = time.perf_counter()
            model(input_ids=ids)
            ts.append(time.perf_counter() - t)
            if ts[-1] > 10:
                break
    return statistics.median(ts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--slow-ppl-windows", type=int, default=1, help="eval windows for a dtype too slow for the rest")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "dtype_cpu.csv")
    a = p.parse_args(argv)
    calib, held = data.split(data.wiki_articles())
    bases = {d: models.load_model(a.model, dtype=getattr(torch, d))[0] for d in ("float32", "bfloat16")}
    _, tok = models.load_model(a.model)
    tokens = data.tokenize(tok, calib, max_tokens=2_000_000)
    calibration = data.calibration_windows(tokens, 32, 128, 0)
    stage1 = data.calibration_windows(tokens, STAGE1_WINDOWS, 128, 1)
    held_tokens = data.tokenize(tok, held[:1500])
    res = Results("dtype", "cpu")
    shape = f"{a.model}, sparsity {a.sparsity}, 32x128 calibration tokens"
    native, evidence = precision.native_bf16("cpu")
    print(f"bf16 on this CPU: {'native' if native else 'emulated'} ({evidence})", flush=True)
    fwd = {}
    for dtype, base in bases.items():
        g = _gemm_gflops(getattr(torch, dtype))
        fwd[dtype] = _forward_s(base, calibration[:1])
        res.add("gemm", "512x576x1536", shape, dtype, "throughput", "GFLOP/s", g)
        res.add("time", "forward 1x128", shape, dtype, "time", "s", fwd[dtype])
        print(f"{dtype}: GEMM {g:.1f} GFLOP/s, one 128-token forward {fwd[dtype]:.2f}s", flush=True)
    fastest = min(fwd.values())
    full = [d for d in bases if fwd[d] <= 2 * fastest]  # a dtype > 2x slower is only evaluated briefly
    for dtype in bases:
        if dtype not in full:
            n = a.slow_ppl_windows
            windows = data.eval_windows(held_tokens, 512, n)
            for d in bases:
                v = evaluate.perplexity(bases[d], windows, progress=False)
                res.add("perplexity", f"dense, {n} window{'s' if n > 1 else ''}", shape, d, "ppl", "ppl", v)
                print(f"{d}: dense perplexity on {n} held-out windows {v:.3f}", flush=True)
            print(f"{dtype}: forward {fwd[dtype] / fastest:.0f}x slower than the fastest dtype; pipeline not run")
    windows = data.eval_windows(held_tokens, 512, 16)
    times: dict = {}
    ppl: dict = {}
    for r in range(a.repeat):
        for dtype in full:
            base = bases[dtype]
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
    for (dtype, what), ts in times.items():
        res.add("time", what, shape, dtype, "time", "s", statistics.median(ts), min(ts), max(ts))
    for (dtype, what), v in ppl.items():
        res.add("perplexity", what, shape, dtype, "ppl", "ppl", v)
    for dtype in full:
        line = ", ".join(f"{w} {statistics.median(ts):.1f}s" for (d, w), ts in times.items() if d == dtype)
        line += "; ppl " + ", ".join(f"{w} {v:.2f}" for (d, w), v in ppl.items() if d == dtype)
        u, e = (statistics.median(times[(dtype, k)]) for k in ("uniform", "ecoflap-zo"))
        res.add("time_ratio", "ecoflap-zo / uniform", shape, dtype, "ratio", "x", e / u)
        print(f"{dtype}: {line}; ECoFLaP-zo / uniform time {e / u:.3f}x")
    print(f"wrote {len(res.rows)} rows to {res.write(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
