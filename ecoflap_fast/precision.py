"""The compute dtype of a run: ``--dtype auto`` picks bf16 where the device multiplies bf16 natively
and fp32 elsewhere.

On CPUs without bf16 matrix instructions (AVX2-only x86, for example) torch emulates bf16 GEMMs
and they run one to two orders of magnitude slower than fp32 (benchmarks/results/dtype_cpu.csv),
so bf16 is chosen only where the hardware has it: CUDA devices that support bf16, and CPUs whose
flags include ``avx512_bf16`` or ``amx_bf16`` and where oneDNN reports bf16 support. Activation
statistics are accumulated in fp32 in every case (``stage2``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device: str | torch.device) -> tuple[bool, str]:
    """(whether ``device`` multiplies bf16 natively, the evidence in words)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(dev)}: bf16 {'supported' if ok else 'not supported'}"
    if dev.type != "cpu":
        return False, f"{dev.type}: bf16 support unknown"
    flags = sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    if flags and onednn:
        return True, f"CPU with {', '.join(flags)}"
    cap = torch.backends.cpu.get_cpu_capability()
    return False, f"CPU ({cap}) without bf16 matrix instructions (avx512_bf16/amx_bf16)"


def resolve(name: str, device: str | torch.device) -> tuple[str, str]:
    """(dtype name, why) for a ``--dtype`` value; ``auto``: bfloat16 with native bf16, else float32."""
    if name != "auto":
        return name, "asked for"
    ok, evidence = native_bf16(device)
    return ("bfloat16", f"auto: {evidence}") if ok else ("float32", f"auto: {evidence}, so fp32")
