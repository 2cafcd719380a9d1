"""How many stage-1 tokens the allocation needs: block scores from a few windows against a large
reference, per estimator, over several draws of the windows.

    python benchmarks/bench_stage1_tokens.py --draws 1 2 3 4

Reference: the noise-free estimator (sqrt(2/pi)·Σ_b ‖g‖) on 32 windows x 128 tokens drawn with
seed 99. Candidates, each on windows drawn with seed d (d in --draws): one noise draw per tensor and
batch on 8 x 128 tokens (the zeroth-order gradient estimator), and the noise-free estimator on 8 x
128, 4 x 128 (2 batches of 2) and 8 x 64 tokens. Per candidate: the stage-1 time and the Spearman
correlation of its 30 block scores (sum over the block's matrices) with the reference's. Appends
rows to benchmarks/results/stage1_tokens_cpu.csv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import RESULTS_DIR  # noqa: E402
from ecoflap_fast import data, models, objectives, stage1, walk  # noqa: E402
from ecoflap_fast.bench.harness import Results  # noqa: E402
from ecoflap_fast.prune import spearman  # noqa: E402


def _block_scores(plan: walk.Plan, scores: dict[str, float]) -> list[float]:
    per: dict[str, float] = {}
    for name, m in plan.matrices().items():
        per[m.block.key] = per.get(m.block.key, 0.0) + scores[name]
    return list(per.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--draws", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "stage1_tokens_cpu.csv")
    a = p.parse_args(argv)
    model, tok = models.load_model(a.model)
    calib, _ = data.split(data.wiki_articles())
    tokens = data.tokenize(tok, calib, max_tokens=2_000_000)
    objective = objectives.for_model(model)

    def run(windows, estimator: str, batch: int = 4, seed: int = 0):
        batches = [{"input_ids": windows[i : i + batch]} for i in range(0, len(windows), batch)]
        plan = walk.plan(model, batches[0])
        t = time.perf_counter()
        r = stage1.tensor_scores(
            model, batches, plan=plan, objective=objective, estimator=estimator, seed=seed, progress=False
        )
        return time.perf_counter() - t, _block_scores(plan, r.tensor_scores)

    _, ref = run(data.calibration_windows(tokens, 32, 128, 99), "expected")
    rows: dict[str, list[tuple[float, float]]] = {}
    for d in a.draws:
        w = data.calibration_windows(tokens, 8, 128, d)
        candidates = {
            "one noise draw, 8x128": lambda: run(w, "grad", seed=d),
            "noise-free, 8x128": lambda: run(w, "expected"),
            "noise-free, 4x128 (2 batches of 2)": lambda: run(w[:4], "expected", batch=2),
            "noise-free, 8x64": lambda: run(w[:, :64].contiguous(), "expected"),
        }
        for name, f in candidates.items():
            t, b = f()
            rows.setdefault(name, []).append((t, spearman(b, ref)))
    res = Results("stage1_tokens", "cpu")
    for name, v in rows.items():
        shape = f"{a.model}, {len(v)} draws of windows, reference 32x128 noise-free"
        ts, rhos = [x[0] for x in v], [x[1] for x in v]
        res.add("time", name, shape, "float32", "time", "s", statistics.median(ts), min(ts), max(ts))
        mean = statistics.mean(rhos)
        res.add("spearman", name, shape, "float32", "spearman_vs_reference", "rho", mean, min(rhos), max(rhos))
        print(
            f"{name}: stage 1 {statistics.median(ts):.2f}s, Spearman with the reference "
            + " ".join(f"{r:.3f}" for r in rhos)
            + f" (mean {statistics.mean(rhos):.3f})",
            flush=True,
        )
    print(f"wrote {len(res.rows)} rows to {res.write(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
