"""ecoflap_fast: kernel-accelerated ECoFLaP pruning for language and vision-language models."""

from __future__ import annotations

__version__ = "0.1.0"

# The public names are imported on first use (PEP 562), so that `ecoflap-fast` starts its command,
# with its own Ctrl-C and error handling, before torch and transformers are imported.
_LAZY = {
    "ops": (".ops", None),
    "export_": (".export", "export_"),
    "load_sparse": (".export", "load_sparse"),
    "PruneConfig": (".prune", "PruneConfig"),
    "prune_": (".prune", "prune_"),
}
__all__ = ["PruneConfig", "backends", "export_", "load_sparse", "ops", "prune_"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = importlib.import_module(module, __name__)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


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
