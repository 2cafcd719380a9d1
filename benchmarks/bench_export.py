"""Checkpoint size on disk of the default model pruned at 0.5, 0.7 (unstructured) and 2:4, per format.

    python benchmarks/bench_export.py

Every export stores bf16 weights; the baseline is the dense bf16 checkpoint (hf-dense of the unpruned
model). Appends rows to benchmarks/results/export_cpu.csv.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import RESULTS_DIR  # noqa: E402
from ecoflap_fast import data, evaluate, export_, load_sparse, models  # noqa: E402
from ecoflap_fast.bench.harness import Results  # noqa: E402
from ecoflap_fast.prune import PruneConfig, prune_  # noqa: E402

CASES = [
    ("0.5 unstructured", dict(sparsity=0.5), ["hf-dense", "ct-bitmask"]),
    ("0.7 unstructured", dict(sparsity=0.7), ["hf-dense", "ct-bitmask"]),
    ("2:4", dict(pattern="2:4"), ["hf-dense", "ct-bitmask", "ct-24", "torch-24"]),
]


def main() -> int:
    base, tok = models.load_model("default")
    calib, held = data.split(data.wiki_articles())
    calibration = data.calibration_windows(data.tokenize(tok, calib), 32, 128, 0)
    windows = data.eval_windows(data.tokenize(tok, held), 512, 4)
    res = Results("export", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense = export_(base, tmp / "dense", "hf-dense", dtype=torch.bfloat16)
        res.add("checkpoint", "dense bf16", "unpruned", "bfloat16", "size", "MiB", dense["bytes"] / 2**20)
        print(f"dense bf16 checkpoint: {dense['bytes'] / 2**20:.1f} MiB", flush=True)
        for label, kw, fmts in CASES:
            model = copy.deepcopy(base)
            prune_(model, calibration, PruneConfig(allocator="uniform", progress=False, **kw))
            ref = load_sparse(export_(model, tmp / "ref", "hf-dense", dtype=torch.bfloat16, force=True)["path"])
            ppl_ref = evaluate.perplexity(ref, windows, progress=False)
            for fmt in fmts:
                info = export_(model, tmp / fmt, fmt, dtype=torch.bfloat16, force=True)
                back = load_sparse(tmp / fmt)
                ppl = evaluate.perplexity(back, windows, progress=False)
                same = ppl == ppl_ref
                res.add("checkpoint", fmt, label, "bfloat16", "size", "MiB", info["bytes"] / 2**20)
                res.add("checkpoint", fmt, label, "bfloat16", "size_vs_dense", "ratio", info["bytes"] / dense["bytes"])
                res.add("checkpoint", fmt, label, "bfloat16", "reload_ppl_equal", "bool", float(same))
                print(
                    f"{label:17s} {fmt:10s} {info['bytes'] / 2**20:7.1f} MiB "
                    f"({info['bytes'] / dense['bytes']:.2f}x dense); "
                    f"reloaded perplexity {ppl:.3f} {'==' if same else '!='} in-memory bf16 {ppl_ref:.3f}",
                    flush=True,
                )
            del model
    print(f"wrote {res.write(RESULTS_DIR / 'export_cpu.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
