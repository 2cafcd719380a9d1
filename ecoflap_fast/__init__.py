"""ecoflap_fast: kernel-accelerated ECoFLaP pruning for language and vision-language models."""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401
from .export import export_, load_sparse  # noqa: E402,F401
from .prune import PruneConfig, prune_  # noqa: E402,F401


def backends() -> dict[str, str]:
    """Which op backends are active on this machine, and why the others are not."""
    import torch

    from . import _ext, kernels

    out = {"torch-reference": "active (pure torch, always available)"}
    out["cpu-cpp"] = "active (ecoflap_fast._C)" if _ext.is_available() else f"inactive: {_ext.reason()}"
    if not _ext.is_available():
        out["cuda-cpp"] = f"inactive: {_ext.reason()}"
    elif not _ext.has_cuda_kernels():
        out["cuda-cpp"] = "inactive: ecoflap_fast._C was built without CUDA sources"
    elif not torch.cuda.is_available():
        out["cuda-cpp"] = "inactive: built with CUDA, but no CUDA device is visible"
    else:
        out["cuda-cpp"] = f"active ({torch.cuda.get_device_name()})"
    if not kernels.AVAILABLE:
        out["triton"] = f"inactive: {kernels.REASON}"
    elif torch.cuda.is_available():
        out["triton"] = f"active ({kernels.REASON})"
    elif kernels.INTERPRET:
        out["triton"] = f"interpreter only ({kernels.REASON}); CPU ops still use cpu-cpp"
    else:
        out["triton"] = f"inactive: no CUDA device ({kernels.REASON})"
    return out
