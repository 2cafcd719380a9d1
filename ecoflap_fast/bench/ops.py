"""Op throughput against the usual torch implementations, on real LLaMA layer shapes.

    python benchmarks/bench_ops.py --device cpu --shapes llama7b --dtype bfloat16
    python benchmarks/bench_ops.py --device cuda --shapes all --variants bisect,radix
    ecoflap-fast bench --ops-shapes llama7b          # the same, plus the end-to-end pipelines

Appends rows to <out>/ops_<device>.csv (long format, see harness.py) and prints a table.
Every ours/baseline pair is timed in the same run on the same inputs; ratios are baseline/ours.

``--variants`` (CUDA): the per-row prune is timed once per selection algorithm of the Triton
kernel, as op ``wanda_prune_row[<variant>]`` (the baselines are timed once and reported with each);
without it, ``wanda_prune_row`` runs the dispatcher's setting. A variant the dispatcher does not
launch at a shape (radix on rows wider than ``kernels.select.RADIX_MAX_BLOCK``) is skipped there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import ops
from . import baselines
from .harness import Results, copy_bandwidth_gbs, measure
from .shapes import ACT_CHUNK_TOKENS, SHAPE_SETS

OPS = ["prune_row", "prune_24", "pack_24_cutlass", "pack_bitmask", "col_sq_norms"]


def _weight(shape, dtype, device, nm=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(*shape, generator=g).to(dtype).to(device)
    s = torch.rand(shape[1], generator=g).to(device)
    if nm is not None:
        ops.wanda_prune_(w, s, nm=nm)
    return w, s


def _launched_variant(shape, dtype, variant: str) -> str:
    """The per-row algorithm the dispatcher actually launches for ``variant`` at ``shape``."""
    from ..kernels import select

    w = torch.empty(*shape, dtype=dtype, device="meta")
    sq = torch.empty(shape[1], device="meta")
    return select.row_select_launch(w, sq, w, w, 1, use_abs=True, scaled=True, prune=True, variant=variant).variant


def _with_variant(fn, variant: str):
    """``fn`` run with the dispatcher's per-row algorithm set to ``variant``."""
    from .. import kernels

    def call(*args):
        kernels.set_select_variant(variant)
        try:
            return fn(*args)
        finally:
            kernels.set_select_variant(None)

    return call


def run(
    device: str,
    shapes: dict,
    dtype,
    op_names,
    repeat: int,
    sparsity: float,
    *,
    variants=None,
    rep_ms: int = 200,
    out: Path | None = None,
) -> Results:
    """Time every op of ``op_names`` on every shape. With ``out``, rows are appended to that CSV after
    each shape (a run stopped by a timeout keeps its rows), and a provider that raises is reported
    and skipped instead of ending the run."""
    res = Results("ops", device)
    bw = copy_bandwidth_gbs(device)
    res.add("copy", "torch", "1 GiB", "float32", "bandwidth", "GB/s", bw)
    print(f"device: {res.env['device']}  measured copy bandwidth {bw:.1f} GB/s")
    bytes_per = torch.empty((), dtype=dtype).element_size()
    if variants and not device.startswith("cuda"):
        print(f"--variants {','.join(variants)} ignored: the selection algorithms are the Triton kernel's (CUDA)")
        variants = None
    measured = {}  # (provider, shape) -> quantiles: baselines timed once for every variant

    def record(op, shape_name, numel, traffic_bytes, providers):
        times = {}
        for provider, (fn, setup) in providers.items():
            key = (provider, op.split("[")[0], shape_name)
            if provider == "ecoflap_fast" or key not in measured:
                try:
                    measured[key] = measure(fn, setup=setup, device=device, repeat=repeat, rep_ms=rep_ms)
                except Exception as e:
                    if out is None:
                        raise
                    print(f"{op} {shape_name} {provider}: failed, skipped: {type(e).__name__}: {e}", flush=True)
                    measured[key] = None
            if measured[key] is None:
                continue
            med, p20, p80 = measured[key]
            times[provider] = med
            res.add(op, provider, shape_name, dtype, "time", "ms", med, p20, p80)
            gbs = traffic_bytes / (med * 1e-3) / 1e9
            res.add(op, provider, shape_name, dtype, "bandwidth", "GB/s", gbs)
            res.add(op, provider, shape_name, dtype, "fraction_of_copy_bw", "ratio", gbs / bw)
        if "ecoflap_fast" not in times:
            return
        ours = times["ecoflap_fast"]
        line = [f"{op:16s} {shape_name:22s} ours {ours:9.2f} ms ({traffic_bytes / (ours * 1e-3) / 1e9:6.1f} GB/s)"]
        for provider, t in times.items():
            if provider != "ecoflap_fast":
                res.add(op, f"speedup_vs_{provider}", shape_name, dtype, "speedup", "x", t / ours)
                line.append(f"{provider} {t:9.2f} ms ({t / ours:6.1f}x)")
        print("  ".join(line), flush=True)

    for shape_name, shape in shapes.items():
        try:
            numel = shape[0] * shape[1]
            if "prune_row" in op_names:
                w, s = _weight(shape, dtype, device)
                setup = lambda: (w.clone(), s)  # noqa: E731
                ours = lambda x, y: ops.wanda_prune_(x, y, sparsity)  # noqa: E731
                runs = [("wanda_prune_row", ours)]
                if variants:
                    runs = []
                    for v in variants:
                        launched = _launched_variant(shape, dtype, v)
                        if launched != v:
                            print(f"wanda_prune_row[{v}] {shape_name}: not launched there (runs {launched})")
                            continue
                        runs.append((f"wanda_prune_row[{v}]", _with_variant(ours, v)))
                for op, fn in runs:
                    record(
                        op,
                        shape_name,
                        numel,
                        numel * 2 * bytes_per,
                        {
                            "ecoflap_fast": (fn, setup),
                            "torch_sort": (lambda x, y: baselines.sort_prune_(x, y, sparsity), setup),
                            "torch_kthvalue": (lambda x, y: baselines.kthvalue_prune_(x, y, sparsity), setup),
                        },
                    )
            if "prune_24" in op_names:
                w, s = _weight(shape, dtype, device)
                setup = lambda: (w.clone(), s)  # noqa: E731
                record(
                    "wanda_prune_2:4",
                    shape_name,
                    numel,
                    numel * 2 * bytes_per,
                    {
                        "ecoflap_fast": (lambda x, y: ops.wanda_prune_(x, y, nm=(2, 4)), setup),
                        "torch_slice_loop": (lambda x, y: baselines.slice_loop_nm_prune_(x, y, 2, 4), setup),
                        "torch_sort": (lambda x, y: baselines.sort_prune_(x, y, nm=(2, 4)), setup),
                    },
                )
            if "pack_24_cutlass" in op_names and dtype in (torch.float16, torch.bfloat16):
                w, _ = _weight(shape, dtype, device, nm=(2, 4))
                setup = lambda: (w,)  # noqa: E731
                # read the dense matrix, write half of it plus 1/8 byte of meta per weight
                providers_24 = {
                    "ecoflap_fast": (ops.pack_24_cutlass, setup),
                    "torch_converter": (baselines.torch_cutlass_pack, setup),
                }
                if device.startswith("cuda"):
                    providers_24["torch_cslt_compress"] = (torch._cslt_compress, setup)
                record(
                    "pack_24_cutlass",
                    shape_name,
                    numel,
                    numel * bytes_per * 1.5 + numel // 8,
                    providers_24,
                )
            if "pack_bitmask" in op_names:
                w, _ = _weight(shape, dtype, device, nm=(2, 4))
                setup = lambda: (w,)  # noqa: E731
                record(
                    "pack_bitmask",
                    shape_name,
                    numel,
                    numel * bytes_per * 1.5 + numel // 8,
                    {
                        "ecoflap_fast": (ops.pack_bitmask, setup),
                        "compressed_tensors_style": (baselines.bitmask_pack, setup),
                    },
                )
            if "col_sq_norms" in op_names:
                # calibration-sized chunks of activations feeding a Linear with in_features = shape[1]
                tokens = ACT_CHUNK_TOKENS if device.startswith("cuda") else 2048
                x = torch.randn(tokens, shape[1], dtype=dtype, device=device)
                record(
                    "col_sq_norms",
                    f"{tokens} tok x {shape[1]}",
                    x.numel(),
                    x.numel() * bytes_per,
                    {
                        "ecoflap_fast": (ops.col_sq_norms, lambda: (x,)),
                        "wanda_float_norm": (baselines.wanda_act_norm, lambda: (x,)),
                    },
                )
        except Exception as e:
            if out is None:
                raise
            print(f"{shape_name}: stopped at {type(e).__name__}: {e}; the next shape follows", flush=True)
        if out is not None:
            res.flush(out)

    return res


def main(argv=None, results_dir: Path = Path("benchmarks/results")) -> int:
    from ..kernels import SELECT_VARIANTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="llama7b", choices=sorted(SHAPE_SETS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {OPS}")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rep-ms", type=int, default=200, help="CUDA: milliseconds of calls per measurement")
    p.add_argument("--variants", default=None, help=f"CUDA: comma list of per-row algorithms {SELECT_VARIANTS}")
    p.add_argument("--out", type=Path, default=None, help="results CSV (default results/ops_<device>.csv)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and exit")
    a = p.parse_args(argv)
    unknown = [o for o in a.ops.split(",") if o not in OPS]
    if unknown:
        p.error(f"--ops: unknown {unknown}; choose from {OPS}")
    variants = a.variants.split(",") if a.variants else None
    for v in variants or ():
        if v not in SELECT_VARIANTS:
            p.error(f"--variants: {v!r} is not one of {list(SELECT_VARIANTS)}")
    if a.dry_run:
        print(f"bench_ops: arguments ok ({a.device}, shapes {a.shapes}, ops {a.ops}, variants {variants})")
        return 0
    dtype = getattr(torch, a.dtype)
    shapes, op_names = SHAPE_SETS[a.shapes], a.ops.split(",")
    out = a.out or results_dir / f"ops_{a.device.split(':')[0]}.csv"
    res = run(a.device, shapes, dtype, op_names, a.repeat, a.sparsity, variants=variants, rep_ms=a.rep_ms, out=out)
    print(f"wrote {len(res.rows)} rows to {res.flush(out)}")
    return 0
