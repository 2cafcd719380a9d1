"""Ahead-of-time compile report: registers, spills, shared memory and occupancy of every kernel of
the package for a GPU architecture, on a machine without a GPU (SPEC §10).

    python benchmarks/aot_report.py --arch sm_90 --out benchmarks/results/aot_sm90.csv

Triton kernels: for every shape of the benchmark table (``shapes.SHAPE_SETS["all"]``), dtype and
pattern, the launch is built by the same ``*_launch`` function the launcher calls (kernels/*.py),
from meta tensors of that shape, and compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`` with the signature, specialisation (16-divisibility, 1-valued
ints) and options the JIT would derive from those arguments. Registers and spills come from
``ptxas -v``: the log of the ptxas run Triton itself makes for the cubin (the wheel's ptxas for
that arch, the installed Triton's flags; kernels are always compiled afresh, never taken from
Triton's cache), or, where a Triton release cannot print it, ptxas run again on the produced PTX;
shared memory is Triton's dynamic allocation (kernel metadata) plus
any static shared memory ptxas reports. CUDA kernels (csrc/cuda/*.cu) are compiled with
``nvcc -Xptxas -v`` at their fixed launch configuration (``kThreads`` of the source).

Columns (one row per compiled kernel and configuration):
  arch, kernel, variant (selection algorithm), mode (prune in place / mask / scores / norms),
  dtype, rows, cols, pattern, config (compile-time block sizes), programs (grid size), num_warps,
  num_stages, regs (per thread), spill_bytes (spill stores + spill loads), stack_bytes, smem_bytes
  (per CTA), ctas_per_sm, occupancy (resident warps / max warps per SM), limiter (what bounds the
  CTAs per SM), inflight_kb_per_sm (CTAs per SM x the bytes one program loads at once: what each
  SM can have in flight), bytes_per_weight, passes_per_row, triton, ptxas.

bytes_per_weight and passes_per_row come from the kernel code, not from measurement: the Triton
launch builders state them next to the configuration they choose (kernels/_launch.py, each
``*_launch`` docstring: weight-shaped loads and stores counted once at their element width, masked
stores at full width, L2-resident per-column vectors not counted; passes = sequential block-wide
reductions / scans / histograms over a program's row after its single load). For the CUDA kernels
they are the per-kernel counts in :data:`CUDA_KERNELS`, read off csrc/cuda/pack_kernels.cu.

Occupancy follows the CUDA occupancy rules: registers are allocated per warp in units of 256 from 4
sub-partitions of 16,384 each (65,536 per SM, at most 255 per thread); shared memory per CTA is
rounded up to 128 bytes plus 1 KB the runtime reserves per CTA; at most 64 warps and 32 CTAs per
SM. Shared memory per SM: 228 KB on sm_90 / sm_100, 164 KB on sm_80.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
FIELDS = [
    "arch",
    "kernel",
    "variant",
    "mode",
    "dtype",
    "rows",
    "cols",
    "pattern",
    "config",
    "programs",
    "num_warps",
    "num_stages",
    "regs",
    "spill_bytes",
    "stack_bytes",
    "smem_bytes",
    "ctas_per_sm",
    "occupancy",
    "limiter",
    "inflight_kb_per_sm",
    "bytes_per_weight",
    "passes_per_row",
    "triton",
    "ptxas",
]


@dataclass(frozen=True)
class Arch:
    """Per-SM limits of one architecture (CUDA occupancy calculator values)."""

    capability: int
    smem_per_sm: int
    regs_per_sm: int = 65536
    reg_sub_partitions: int = 4
    reg_alloc_unit: int = 256  # registers per warp are allocated in these units
    max_regs_per_thread: int = 255
    smem_alloc_unit: int = 128
    smem_reserved_per_cta: int = 1024
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32


ARCHS = {
    "sm_80": Arch(80, smem_per_sm=164 * 1024),
    "sm_90": Arch(90, smem_per_sm=228 * 1024),
    "sm_100": Arch(100, smem_per_sm=228 * 1024),
}


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(arch: Arch, regs: int, smem: int, warps: int) -> tuple[int, float, str]:
    """(CTAs per SM, resident warps / max warps, the limiting resource) for a kernel of ``warps``
    warps using ``regs`` registers per thread and ``smem`` bytes of shared memory per CTA."""
    regs_per_warp = _round_up(max(regs, 1) * 32, arch.reg_alloc_unit)
    warps_by_regs = (arch.regs_per_sm // arch.reg_sub_partitions // regs_per_warp) * arch.reg_sub_partitions
    limits = {
        "regs": warps_by_regs // warps if regs <= arch.max_regs_per_thread else 0,
        "smem": arch.smem_per_sm // (_round_up(smem, arch.smem_alloc_unit) + arch.smem_reserved_per_cta),
        "warps": arch.max_warps_per_sm // warps,
        "ctas": arch.max_ctas_per_sm,
    }
    limiter = min(limits, key=lambda k: (limits[k], ["ctas", "warps", "regs", "smem"].index(k)))
    ctas = limits[limiter]
    return ctas, ctas * warps / arch.max_warps_per_sm, limiter


# ---- ptxas ------------------------------------------------------------------------------------


def triton_ptxas(capability: int, *, ask_triton: bool = False) -> Path | None:
    """The ptxas of the Triton wheel for ``capability``, or None when the wheel has none. With
    ``ask_triton``, the one Triton's own compiler picks (``get_ptxas``: which of ``ptxas`` and
    ``ptxas-blackwell`` serves an arch changed between releases); otherwise found without importing
    triton (for a skip check), preferring the newer ``ptxas-blackwell`` from sm_90 on."""
    if ask_triton:
        try:
            from triton.backends.nvidia.compiler import get_ptxas

            path = Path(get_ptxas(capability).path)
            if path.is_file():
                return path
        except Exception:
            pass
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin"
    for name in ["ptxas"] if capability < 90 else ["ptxas-blackwell", "ptxas"]:
        if (bindir / name).is_file() and os.access(bindir / name, os.X_OK):
            return bindir / name
    return None


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """Per entry function of a ``ptxas -v`` log: regs, stack, spill_st, spill_ld, smem (bytes)."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), {k: 0 for k in _PTXAS_RE})
            continue
        if current is None:
            continue
        for key, rx in _PTXAS_RE.items():
            hit = rx.search(line)
            if hit:
                current[key] = int(hit.group(1))
    return out


def _ptxas_version(path: Path) -> str:
    text = subprocess.run([str(path), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", text)
    return m.group(1) if m else "?"


# ---- Triton kernels ---------------------------------------------------------------------------


def _import_kernels():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the AOT report compiles real kernels: run it without TRITON_INTERPRET=1")
    from ecoflap_fast.kernels import act_norm, select

    return select, act_norm


def triton_launches(shapes: dict, dtypes, patterns, variants, act_tokens: int):
    """Yield (row facts, Launch) for every Triton kernel at every configuration the dispatcher
    launches on these shapes. Tensors are on the meta device: only shapes, strides and dtypes
    (and so the JIT's specialisation) are real."""
    import torch

    from ecoflap_fast.kernels import act_norm, select

    meta = dict(device="meta")
    for name, (rows, cols) in shapes.items():
        for dtype in dtypes:
            w = torch.empty(rows, cols, dtype=dtype, **meta)
            sq = torch.empty(cols, dtype=torch.float32, **meta)
            mask = torch.empty(rows, cols, dtype=torch.int8, **meta)
            dt = str(dtype).replace("torch.", "")
            base = dict(dtype=dt, rows=rows, cols=cols, shape=name)
            for pattern in patterns:
                for mode, prune in (("prune", True), ("mask", False)):
                    flags = dict(use_abs=True, scaled=True, prune=prune)
                    dst, mask_arg = (w, w) if prune else (w, mask)
                    if pattern == "unstructured":
                        k = cols // 2  # sparsity 0.5: int(cols * 0.5)
                        for variant in variants:
                            yield (
                                dict(base, kernel="row_select", pattern=pattern, mode=mode, requested=variant),
                                select.row_select_launch(w, sq, dst, mask_arg, k, variant=variant, **flags),
                            )
                    else:
                        n, m = (int(v) for v in pattern.split(":"))
                        yield (
                            dict(base, kernel="nm_select", pattern=pattern, mode=mode),
                            select.nm_select_launch(w, sq, dst, mask_arg, n, m, **flags),
                        )
            out = torch.empty(rows, cols, dtype=torch.float32, **meta)
            yield (
                dict(base, kernel="scores", pattern="-", mode="scores"),
                select.scores_launch(w, sq, out, use_abs=True, scaled=True),
            )
            x = torch.empty(act_tokens, cols, dtype=dtype, **meta)
            launch, _ = act_norm.col_sq_norms_launch(x)
            yield dict(base, kernel="col_sq_norms", pattern="-", mode="norms", rows=act_tokens), launch


def _variant_label(requested: str | None, actual: str) -> str:
    """The algorithm that runs; "radix->bisect" where the dispatcher falls back from the one asked for."""
    if not actual:
        return "-"
    return actual if requested in (None, actual) else f"{requested}->{actual}"


def _specialise(launch, backend):
    """(signature, constexprs, attrs, options) exactly as the JIT derives them from the arguments."""
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


class TritonCompiler:
    """Compiles Launch objects for one architecture; identical specialisations compile once."""

    def __init__(self, arch: Arch, workdir: Path):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.triton = triton
        self.target = GPUTarget("cuda", arch.capability, 32)
        self.backend = make_backend(self.target)
        self.ptxas = triton_ptxas(arch.capability, ask_triton=True)
        if self.ptxas is None:
            raise FileNotFoundError("the Triton wheel has no ptxas for this arch (triton/backends/nvidia/bin)")
        try:
            from triton.backends.nvidia.compiler import sm_arch_from_capability

            self.gpu_name = sm_arch_from_capability(arch.capability)
        except Exception:  # older wheels: the same rule (a-suffix for sm_90 and up)
            self.gpu_name = f"sm_{arch.capability}" + ("a" if arch.capability >= 90 else "")
        self.ptxas_version = _ptxas_version(self.ptxas)
        self.workdir = workdir
        self.cache: dict = {}

    def _compile_with_log(self, src, options):
        """Compile (never from Triton's cache) and keep the log of the ptxas run that made the
        cubin (Triton prints it with ``knobs.nvidia.dump_ptxas_log``): its flags are the ones the
        installed Triton uses, which change between releases."""
        knobs = getattr(self.triton, "knobs", None)
        saved = []
        for group, name in (("nvidia", "dump_ptxas_log"), ("compilation", "always_compile")):
            obj = getattr(knobs, group, None)
            if obj is not None and hasattr(obj, name):
                saved.append((obj, name, getattr(obj, name)))
                setattr(obj, name, True)
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                kernel = self.triton.compile(src, target=self.target, options=options.__dict__)
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)
        return kernel, buf.getvalue()

    def _rerun_ptxas(self, kernel, name: str) -> str:
        ptx = self.workdir / f"k{len(self.cache)}.ptx"
        ptx.write_text(kernel.asm["ptx"])
        fmad = [] if kernel.metadata.enable_fp_fusion else ["--fmad=false"]
        cmd = [str(self.ptxas), "-lineinfo", *fmad, "-v", f"--gpu-name={self.gpu_name}", str(ptx)]
        res = subprocess.run([*cmd, "-o", str(ptx.with_suffix(".cubin"))], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"ptxas failed on {name}: {res.stderr.strip()}")
        return res.stdout + res.stderr

    def compile(self, launch) -> dict:
        from triton.compiler import ASTSource

        signature, constexprs, attrs, options = _specialise(launch, self.backend)
        key = (
            launch.name,
            repr(sorted(signature.items())),
            repr(sorted(constexprs.items())),
            repr(attrs),
            launch.num_warps,
            launch.num_stages,
        )
        if key in self.cache:
            return self.cache[key]
        kernel, log = self._compile_with_log(ASTSource(launch.kernel, signature, constexprs, attrs), options)
        if "Used " not in log:  # no log from Triton's own ptxas run: run ptxas on the PTX ourselves
            log = self._rerun_ptxas(kernel, launch.name)
        info = parse_ptxas(log)
        entry = info.get(kernel.metadata.name) or next(iter(info.values()))
        result = dict(
            regs=entry["regs"],
            spill_bytes=entry["spill_st"] + entry["spill_ld"],
            stack_bytes=entry["stack"],
            smem_bytes=int(kernel.metadata.shared) + entry["smem"],
            num_warps=int(kernel.metadata.num_warps),
            num_stages=int(kernel.metadata.num_stages),
        )
        self.cache[key] = result
        return result


def triton_rows(arch_name: str, shapes: dict, dtypes, patterns, variants, act_tokens: int, progress=None) -> list:
    import triton

    arch = ARCHS[arch_name]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ecoflap-aot-") as tmp:
        comp = TritonCompiler(arch, Path(tmp))
        for facts, launch in triton_launches(shapes, dtypes, patterns, variants, act_tokens):
            r = comp.compile(launch)
            ctas, occ, limiter = occupancy(arch, r["regs"], r["smem_bytes"], r["num_warps"])
            programs = 1
            for g in launch.grid:
                programs *= int(g)
            rows.append(
                dict(
                    arch=arch_name,
                    kernel=facts["kernel"],
                    variant=_variant_label(facts.get("requested"), launch.variant),
                    mode=facts["mode"],
                    dtype=facts["dtype"],
                    rows=facts["rows"],
                    cols=facts["cols"],
                    pattern=facts["pattern"],
                    config=" ".join(
                        f"{k}={v}" for k, v in launch.constexprs.items() if k.startswith(("BLOCK", "RADIX"))
                    ),
                    programs=programs,
                    **{
                        k: r[k] for k in ("num_warps", "num_stages", "regs", "spill_bytes", "stack_bytes", "smem_bytes")
                    },
                    ctas_per_sm=ctas,
                    occupancy=f"{occ:.3f}",
                    limiter=limiter,
                    inflight_kb_per_sm=f"{ctas * launch.tile_bytes / 1024:.1f}",
                    bytes_per_weight=f"{launch.bytes_per_element:.4g}",
                    passes_per_row=launch.passes,
                    triton=triton.__version__,
                    ptxas=comp.ptxas_version,
                )
            )
            if progress:
                progress(rows[-1])
    return rows


# ---- CUDA kernels (csrc/cuda/*.cu) ------------------------------------------------------------

# Per kernel template, from csrc/cuda/pack_kernels.cu: (pattern, bytes per weight, passes per row,
# bytes one thread loads at once), the byte counts as functions of the element width e. Bytes per
# weight: dense reads/writes at e, kept values at e/2 (2:4, or unstructured at 50% density), keep
# flags 1 B, bitmask 1/8 B, CUTLASS meta 16 bits per 16 (e=2) or 32 bits per 32 (e=1) weights =
# 1/8 B. Passes: only the row-wise bitmask kernels walk a row, one warp per row in chunks of 32 mask
# bytes (256 columns) with a warp prefix sum per chunk. Loads per thread: pack reads 4*QUAD values
# (32 B), unpack 2*QUAD values + one meta word, keep one element (unstructured), pack_bits 8 flags,
# the row-wise kernels one mask byte and up to 8 values per chunk, row_counts one mask byte.
CUDA_KERNELS = {
    "pack_24_kernel": ("2:4", lambda e: e + e / 2 + 1 / 8, lambda cols: 0, lambda e: 32),
    "unpack_24_kernel": ("2:4", lambda e: e / 2 + 1 / 8 + e, lambda cols: 0, lambda e: 16 + (2 if e == 2 else 4)),
    "keep_kernel": ("any", lambda e: e + 1, lambda cols: 0, lambda e: e),
    "pack_bits_kernel": ("any", lambda e: 1 + 1 / 8, lambda cols: 0, lambda e: 8),
    "rowwise_kernel<GATHER>": ("any", lambda e: e + 1 / 8 + e / 2, lambda cols: -(-cols // 256), lambda e: 1 + 8 * e),
    "rowwise_kernel<SCATTER>": ("any", lambda e: 1 / 8 + e / 2 + e, lambda cols: -(-cols // 256), lambda e: 1 + 4 * e),
    "row_counts_kernel": ("any", lambda e: 1 / 8, lambda cols: -(-cols // 256), lambda e: 1),
}
_WIDTH = {"unsigned short": 2, "unsigned char": 1, "unsigned int": 4}


def _cuda_kernel_id(demangled: str) -> tuple[str, int]:
    """('rowwise_kernel<GATHER>', element bytes) from a demangled kernel name."""
    base = re.search(r"(\w+_kernel)", demangled).group(1)
    args = re.search(r"_kernel<([^>]*)>", demangled)
    targs = [a.strip() for a in args.group(1).split(",")] if args else []
    width = _WIDTH.get(targs[0], 0) if targs else 0
    if base == "rowwise_kernel":
        base += "<GATHER>" if targs[1] == "true" else "<SCATTER>"
    return base, width


def cuda_rows(arch_name: str, shapes: dict) -> list:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("CUDA kernels skipped: nvcc not found", file=sys.stderr)
        return []
    arch = ARCHS[arch_name]
    cc = arch.capability
    rows = []
    version = re.search(
        r"release (\d+\.\d+)", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    )
    for src in sorted((REPO / "csrc" / "cuda").glob("*.cu")):
        threads = int(re.search(r"constexpr int kThreads = (\d+);", src.read_text()).group(1))
        with tempfile.TemporaryDirectory(prefix="ecoflap-nvcc-") as tmp:
            cmd = [
                nvcc,
                "-c",
                "-std=c++17",
                "-O3",
                "--expt-relaxed-constexpr",
                "-gencode",
                f"arch=compute_{cc},code=sm_{cc}",
                "-Xptxas",
                "-v",
                str(src),
                "-o",
                str(Path(tmp) / "k.o"),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"CUDA kernels of {src.name} skipped for {arch_name}: {res.stderr.strip()[-300:]}", file=sys.stderr)
            continue
        info = parse_ptxas(res.stdout + res.stderr)
        names = list(info)
        demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split(
            "\n"
        )
        for mangled, pretty in zip(names, demangled):
            kid, width = _cuda_kernel_id(pretty)
            pattern, bpw, passes, per_thread = CUDA_KERNELS[kid]
            e = info[mangled]
            warps = threads // 32
            ctas, occ, limiter = occupancy(arch, e["regs"], e["smem"], warps)
            for _, (r, c) in shapes.items() if kid.startswith("row") else [("any", (0, 0))]:
                rows.append(
                    dict(
                        arch=arch_name,
                        kernel=f"cuda:{kid}",
                        variant="-",
                        mode="pack",
                        dtype=f"b{8 * width}" if width else "-",
                        rows=r or "-",
                        cols=c or "-",
                        pattern=pattern,
                        config=f"threads={threads}",
                        programs="-",
                        num_warps=warps,
                        num_stages="-",
                        regs=e["regs"],
                        spill_bytes=e["spill_st"] + e["spill_ld"],
                        stack_bytes=e["stack"],
                        smem_bytes=e["smem"],
                        ctas_per_sm=ctas,
                        occupancy=f"{occ:.3f}",
                        limiter=limiter,
                        inflight_kb_per_sm=f"{ctas * threads * per_thread(width or 1) / 1024:.1f}",
                        bytes_per_weight=f"{bpw(width or 1):.4g}",
                        passes_per_row=passes(c) if c else 0,
                        triton="-",
                        ptxas=f"nvcc {version.group(1) if version else '?'}",
                    )
                )
    return rows


# ---- report -----------------------------------------------------------------------------------


def summary(rows: list) -> str:
    """The rows at the widest and the tallest shapes (one line per kernel, variant and mode)."""
    tri = [r for r in rows if not r["kernel"].startswith("cuda:")]
    if not tri:
        return ""
    widest = max(int(r["cols"]) for r in tri if r["kernel"] != "col_sq_norms")
    tallest = max(int(r["rows"]) for r in tri if r["kernel"] != "col_sq_norms")
    picks = [
        r
        for r in tri
        if r["dtype"] == "bfloat16"
        and r["kernel"] != "col_sq_norms"
        and (int(r["cols"]) == widest or int(r["rows"]) == tallest)
    ]
    picks += [r for r in tri if r["dtype"] == "bfloat16" and r["kernel"] == "col_sq_norms" and int(r["cols"]) == widest]
    head = (
        "kernel",
        "variant",
        "mode",
        "rows",
        "cols",
        "pattern",
        "config",
        "num_warps",
        "regs",
        "spill_bytes",
        "smem_bytes",
        "ctas_per_sm",
        "occupancy",
        "limiter",
        "inflight_kb_per_sm",
        "bytes_per_weight",
        "passes_per_row",
    )
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    seen = set()
    for r in picks:
        key = tuple(str(r[h]) for h in head)
        if key not in seen:
            seen.add(key)
            lines.append(" | ".join(key))
    return "\n".join(lines)


def write_csv(rows: list, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


def _parse_shapes(text: str | None) -> dict:
    from .shapes import SHAPE_SETS

    if text is None:
        return SHAPE_SETS["all"]
    if text in SHAPE_SETS:
        return SHAPE_SETS[text]
    out = {}
    for item in text.split(","):
        m = re.fullmatch(r"(\d+)x(\d+)", item.strip())
        if not m:
            raise ValueError(f"--shapes: {item!r} is neither a shape set {sorted(SHAPE_SETS)} nor ROWSxCOLS")
        out[item.strip()] = (int(m.group(1)), int(m.group(2)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sm_90", choices=sorted(ARCHS))
    p.add_argument("--out", type=Path, required=True, help="CSV to write (replaced)")
    p.add_argument("--shapes", default=None, help="shape set name or ROWSxCOLS,... (default: every shape of 'all')")
    p.add_argument("--dtypes", default="float16,bfloat16,float32")
    p.add_argument("--patterns", default="unstructured,2:4,4:8")
    p.add_argument("--variants", default="bisect,radix", help="per-row selection algorithms")
    p.add_argument("--kernels", default="triton,cuda", help="triton, cuda or both")
    p.add_argument(
        "--act-tokens",
        type=int,
        default=None,
        help="activation rows for col_sq_norms (default: the benchmark's CUDA chunk, shapes.ACT_CHUNK_TOKENS)",
    )
    p.add_argument("--fail-on-spill", action="store_true", help="exit 1 when any kernel spills registers")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)

    import torch

    from .shapes import ACT_CHUNK_TOKENS

    shapes = _parse_shapes(a.shapes)
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
    kinds = set(a.kernels.split(","))
    t0 = time.perf_counter()
    rows = []
    if "triton" in kinds:
        _import_kernels()
        tick = (
            None
            if a.quiet
            else (
                lambda r: print(
                    f"  {r['kernel']:12s} {r['variant']:6s} {r['mode']:6s} {r['dtype']:8s} "
                    f"{r['rows']:>6}x{r['cols']:<6} "
                    f"{r['pattern']:12s} warps {r['num_warps']:>2}  regs {r['regs']:>3}  spill {r['spill_bytes']:>4}  "
                    f"smem {r['smem_bytes']:>6}  occ {r['occupancy']}",
                    flush=True,
                )
            )
        )
        rows += triton_rows(
            a.arch, shapes, dtypes, a.patterns.split(","), a.variants.split(","), a.act_tokens or ACT_CHUNK_TOKENS, tick
        )
    if "cuda" in kinds:
        rows += cuda_rows(a.arch, shapes)
    elapsed = time.perf_counter() - t0
    write_csv(rows, a.out)
    spills = [r for r in rows if int(r["spill_bytes"]) > 0]
    print(summary(rows))
    print(f"{a.arch}: {len(rows)} rows in {elapsed:.1f} s -> {a.out}; {len(spills)} with spills")
    for r in spills[:20]:
        print(
            f"  SPILL {r['kernel']} {r['variant']} {r['mode']} {r['dtype']} {r['rows']}x{r['cols']} "
            f"{r['pattern']}: {r['spill_bytes']} bytes at {r['regs']} registers, {r['num_warps']} warps"
        )
    return 1 if (a.fail_on_spill and spills) else 0


if __name__ == "__main__":
    sys.exit(main())
