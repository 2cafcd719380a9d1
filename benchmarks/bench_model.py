"""Whole-model pruning time: every Linear of a LLaMA-shaped model, ours vs the reference path.

    python benchmarks/bench_model.py --device cuda --layers 32 --pattern unstructured

Random weights of the real shapes (no checkpoints can be downloaded) and random activation
statistics stand in for a calibrated model: this isolates the score + select + prune step that the
engine accelerates. One decoder layer is materialised at a time. Appends total seconds per path
to benchmarks/results/model_<device>.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import RESULTS_DIR  # noqa: E402
from ecoflap_fast import ops  # noqa: E402
from ecoflap_fast import reference as ref  # noqa: E402
from ecoflap_fast.bench.harness import Results  # noqa: E402

# q, k, v, o, gate, up, down of one LLaMA-2-7B decoder layer
LLAMA7B_LAYER = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_path(fn, layers: int, dtype, device: str, kw: dict, seed: int = 0) -> float:
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = 0.0
    for _ in range(layers):
        for shape in LLAMA7B_LAYER:
            w = torch.randn(*shape, generator=g).to(dtype).to(device)
            s = torch.rand(shape[1], generator=g).to(device)
            _sync(device)
            t0 = time.perf_counter()
            fn(w, s, **kw)
            _sync(device)
            total += time.perf_counter() - t0
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (LLaMA-7B has 32)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--pattern", default="unstructured", choices=["unstructured", "2:4"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    kw = {"nm": (2, 4)} if a.pattern == "2:4" else {"sparsity": a.sparsity}
    run_path(ops.wanda_prune_, 1, dtype, a.device, kw)  # warm-up: compile kernels, load the extension
    ours = run_path(ops.wanda_prune_, a.layers, dtype, a.device, kw)
    base = run_path(ref.wanda_prune_, a.layers, dtype, a.device, kw)
    weights = a.layers * sum(o * i for o, i in LLAMA7B_LAYER)
    res = Results("model", a.device)
    shape = f"LLaMA-7B x{a.layers} layers ({weights / 1e9:.2f}G weights), {a.pattern}"
    res.add("prune_all_linears", "ecoflap_fast", shape, dtype, "time", "s", ours)
    res.add("prune_all_linears", "torch_sort", shape, dtype, "time", "s", base)
    res.add("prune_all_linears", "speedup_vs_torch_sort", shape, dtype, "speedup", "x", base / ours)
    print(f"{shape}: ecoflap_fast {ours:.2f} s, reference sort path {base:.2f} s ({base / ours:.1f}x)")
    out = a.out or RESULTS_DIR / f"model_{a.device.split(':')[0]}.csv"
    print(f"wrote {res.write(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
