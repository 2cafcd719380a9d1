"""Op throughput against the usual torch implementations, on real LLaMA layer shapes.

    python benchmarks/bench_ops.py --device cpu --shapes llama7b --dtype bfloat16
    ecoflap-fast bench --ops-shapes llama7b          # the same, plus the end-to-end pipelines

Appends rows to <out>/ops_<device>.csv (long format, see harness.py) and prints a table.
Every ours/baseline pair is timed in the same run on the same inputs; ratios are baseline/ours.
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


def run(device: str, shapes: dict, dtype, op_names, repeat: int, sparsity: float) -> Results:
    res = Results("ops", device)
    bw = copy_bandwidth_gbs(device)
    res.add("copy", "torch", "1 GiB", "float32", "bandwidth", "GB/s", bw)
    print(f"device: {res.env['device']}  measured copy bandwidth {bw:.1f} GB/s")
    bytes_per = torch.empty((), dtype=dtype).element_size()

    def record(op, shape_name, numel, traffic_bytes, providers):
        times = {}
        for provider, (fn, setup) in providers.items():
            med, p20, p80 = measure(fn, setup=setup, device=device, repeat=repeat)
            times[provider] = med
            res.add(op, provider, shape_name, dtype, "time", "ms", med, p20, p80)
            gbs = traffic_bytes / (med * 1e-3) / 1e9
            res.add(op, provider, shape_name, dtype, "bandwidth", "GB/s", gbs)
            res.add(op, provider, shape_name, dtype, "fraction_of_copy_bw", "ratio", gbs / bw)
        ours = times["ecoflap_fast"]
        line = [f"{op:16s} {shape_name:22s} ours {ours:9.2f} ms ({traffic_bytes / (ours * 1e-3) / 1e9:6.1f} GB/s)"]
        for provider, t in times.items():
            if provider != "ecoflap_fast":
                res.add(op, f"speedup_vs_{provider}", shape_name, dtype, "speedup", "x", t / ours)
                line.append(f"{provider} {t:9.2f} ms ({t / ours:6.1f}x)")
        print("  ".join(line), flush=True)

    for shape_name, shape in shapes.items():
        numel = shape[0] * shape[1]
        if "prune_row" in op_names:
            w, s = _weight(shape, dtype, device)
            setup = lambda: (w.clone(), s)  # noqa: E731
            record(
                "wanda_prune_row",
                shape_name,
                numel,
                numel * 2 * bytes_per,
                {
                    "ecoflap_fast": (lambda x, y: ops.wanda_prune_(x, y, sparsity), setup),
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
    return res


def main(argv=None, results_dir: Path = Path("benchmarks/results")) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="llama7b", choices=sorted(SHAPE_SETS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {OPS}")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="results CSV (default results/ops_<device>.csv)")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    res = run(a.device, SHAPE_SETS[a.shapes], dtype, a.ops.split(","), a.repeat, a.sparsity)
    out = a.out or results_dir / f"ops_{a.device.split(':')[0]}.csv"
    print(f"wrote {len(res.rows)} rows to {res.write(out)}")
    return 0
