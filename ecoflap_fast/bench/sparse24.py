"""2:4 inference: a Linear with a semi-structured sparse weight against the same Linear dense (CUDA).

    python benchmarks/bench_sparse24.py --shapes all --tokens 16,128,2048

For every layer shape of the table and token count, ``F.linear(x, W)`` with W dense, and with W
converted by ``torch.sparse.to_sparse_semi_structured`` once per backend PyTorch offers (CUTLASS;
cuSPARSELt where it is built in), on the same 2:4 weight pruned by ``ops.wanda_prune_``. Rows
(long format, harness.py): time (ms), throughput (TFLOP/s counting the dense 2·tokens·in·out) and
``speedup_vs_dense`` per sparse backend; appended to results/linear24_<device>.csv. SPEC §6: reported
2:4 speed-ups are ~1.1-1.4x on A100 and ~1.2x with cuSPARSELt on H100 at large sizes; measure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from .harness import Results, measure
from .shapes import SHAPE_SETS

BACKENDS = ("cutlass", "cusparselt")


def _sparse_weight(w: torch.Tensor, backend: str):
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    saved = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        return to_sparse_semi_structured(w)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = saved


def run(device: str, shapes: dict, dtype, tokens, rep_ms: int = 100, out: Path | None = None) -> Results:
    """With ``out``, rows are appended there after every shape (a run cut short keeps them)."""
    res = Results("linear24", device)
    print(f"device: {res.env['device']}")
    g = torch.Generator(device="cpu").manual_seed(0)
    for shape_name, (out_f, in_f) in shapes.items():
        w = torch.randn(out_f, in_f, generator=g).to(dtype).to(device)
        ops.wanda_prune_(w, torch.rand(in_f, generator=g).to(device), nm=(2, 4))
        sparse = {}
        for backend in BACKENDS:
            try:
                sw = _sparse_weight(w, backend)
            except Exception as e:  # backend not built into this torch, or shape unsupported
                print(f"{shape_name}: semi-structured {backend} unavailable: {type(e).__name__}: {e}")
                continue
            kind = type(sw).__name__  # the subclass says which backend torch really chose
            sparse[backend if backend.upper() in kind.upper() else kind] = sw
        for t in tokens:
            x = torch.randn(t, in_f, generator=g).to(dtype).to(device)
            flops = 2 * t * in_f * out_f
            shape = f"{shape_name} x {t} tok"
            times = {}
            for provider, weight in [("dense", w), *sparse.items()]:
                try:
                    med, p20, p80 = measure(lambda: F.linear(x, weight), device=device, rep_ms=rep_ms)
                except Exception as e:
                    print(f"{shape}: {provider} failed: {type(e).__name__}: {e}")
                    continue
                times[provider] = med
                res.add("linear_24", provider, shape, dtype, "time", "ms", med, p20, p80)
                res.add("linear_24", provider, shape, dtype, "throughput", "TFLOP/s", flops / (med * 1e-3) / 1e12)
            line = [f"linear_24 {shape:28s} dense {times.get('dense', float('nan')):8.3f} ms"]
            for provider, t_ms in times.items():
                if provider != "dense" and "dense" in times:
                    ratio = times["dense"] / t_ms
                    res.add("linear_24", f"{provider}_speedup_vs_dense", shape, dtype, "speedup", "x", ratio)
                    line.append(f"{provider} {t_ms:8.3f} ms ({ratio:4.2f}x)")
            print("  ".join(line), flush=True)
        if out is not None:
            res.flush(out)
    return res


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of token counts, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"token counts must be positive, got {text!r}")
    return values


def main(argv=None, results_dir: Path = Path("benchmarks/results")) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="all", choices=sorted(SHAPE_SETS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--tokens", type=_positive_ints, default="16,128,2048", help="comma list of rows of x")
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--out", type=Path, default=None, help="results CSV (default results/linear24_<device>.csv)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and exit")
    a = p.parse_args(argv)
    tokens = a.tokens
    if not a.device.startswith("cuda"):
        p.error("--device: semi-structured sparse matmuls run on CUDA only")
    if a.dry_run:
        print(f"bench_sparse24: arguments ok ({a.device}, shapes {a.shapes}, tokens {tokens})")
        return 0
    if not torch.cuda.is_available():
        print("bench_sparse24: no CUDA device")
        return 2
    out = a.out or results_dir / f"linear24_{a.device.split(':')[0]}.csv"
    res = run(a.device, SHAPE_SETS[a.shapes], getattr(torch, a.dtype), tokens, a.rep_ms, out=out)
    print(f"wrote {len(res.rows)} rows to {res.flush(out)}")
    return 0
