"""The architecture table: every supported transformers class, pruned by the engine and by the naive
whole-model oracle of the tests, on tiny random configs of the real classes.

    python benchmarks/bench_arch.py          # appends to benchmarks/results/arch_cpu.csv
    python benchmarks/report.py              # regenerates the README's "Supported architectures"

Per class: the stacks the walk found, the prunable matrices and the share of the block matrices they
cover, the minimum (over matrices, expert slices each) mask agreement with the oracle at uniform 0.5,
the zeros over every block matrix for uniform Wanda and for ECoFLaP-zo, and the wall time of each.
The oracle (``tests/naive_reference.py``) runs a whole-model forward per block with the earlier
blocks pruned and knows nothing of the walk.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from arch_zoo import ALL_NAMES, B, block_lists, build  # noqa: E402
from naive_reference import block_zero_fraction, mask_agreement, naive_wanda_  # noqa: E402
from vlm_zoo import VLM_NAMES, build_vlm  # noqa: E402
from vlm_zoo import block_lists as vlm_block_lists  # noqa: E402

from benchmarks import RESULTS_DIR  # noqa: E402
from ecoflap_fast import PruneConfig, prune_  # noqa: E402
from ecoflap_fast.bench.harness import Results  # noqa: E402

NAMES = ALL_NAMES + VLM_NAMES  # language models, then vision(-language) models (embedded image-caption pairs)


def _build(name):
    if name in VLM_NAMES:
        model, _, batches = build_vlm(name)
        return model, batches
    return build(name)


def _blocks(name):
    return vlm_block_lists(name) if name in VLM_NAMES else block_lists(name)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--names", nargs="+", default=NAMES, choices=NAMES)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "arch_cpu.csv")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = Results("arch", "cpu")
    s = a.sparsity
    for name in a.names:
        engine, batches = _build(name)
        naive, _ = _build(name)
        zo, _ = _build(name)
        cfg = dict(sparsity=s, batch_size=B, progress=False)
        rep, t_engine = _timed(lambda: prune_(engine, batches, PruneConfig(allocator="uniform", **cfg)))
        oracle, t_naive = _timed(lambda: naive_wanda_(naive, batches, s, _blocks(name)))
        rep_zo, t_zo = _timed(
            lambda: prune_(zo, batches, PruneConfig(allocator="ecoflap-zo", **cfg), stage1_calibration=batches[:2])
        )
        agree = mask_agreement(engine, naive, sorted(oracle["pruned"]))
        plan = rep["plan"]
        stacks = " + ".join(f"{st['path']} ({st['blocks']})" for st in plan["stacks"])
        shape = f"{type(engine).__name__}: {stacks}"
        row = {
            "stacks": stacks,
            "matrices": plan["prunable_matrices"],
            "coverage": plan["coverage_of_block_matrices"],
            "agreement_min": min(agree.values()),
            "agreement_mean": sum(agree.values()) / len(agree),
            "zeros_uniform": block_zero_fraction(engine, _blocks(name)),
            "zeros_ecoflap_zo": block_zero_fraction(zo, _blocks(name)),
            "time_uniform_s": t_engine,
            "time_naive_s": t_naive,
            "time_ecoflap_zo_s": t_zo,
            "experts_starved": len(rep["no_calibration_input"]["matrices"]),
        }
        for metric, value in row.items():
            if metric != "stacks":
                res.add(name, "ecoflap_fast", shape, "float32", metric, "", float(value))
        print(
            f"{name:20s} {shape:70s} matrices {row['matrices']:3d} coverage {row['coverage']:.3f} "
            f"agreement min {row['agreement_min']:.4f} zeros {row['zeros_uniform']:.4f}/{row['zeros_ecoflap_zo']:.4f} "
            f"time {t_engine:.2f}s (naive {t_naive:.2f}s, ecoflap-zo {t_zo:.2f}s)",
            flush=True,
        )
    print(f"wrote {len(res.rows)} rows to {res.write(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
