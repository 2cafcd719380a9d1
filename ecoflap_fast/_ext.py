"""Loads the optional compiled extension ``ecoflap_fast._C``.

The extension registers the ``torch.ops.ecoflap_fast.*`` operators (CPU, and CUDA when built with
it). If it is missing or fails to load, a warning is logged once and the ops fall back to torch;
the error is raised only when a caller demands that backend.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("ecoflap_fast")

_state: dict = {}


def _load() -> None:
    if _state:
        return
    if os.environ.get("ECOFLAP_DISABLE_EXT", "0") == "1":
        _state.update(ok=False, reason="disabled by ECOFLAP_DISABLE_EXT=1")
        return
    try:
        from . import _C  # noqa: F401  (importing runs the operator registrations)
    except Exception as e:  # ImportError, or an undefined symbol from a torch version mismatch
        _state.update(ok=False, reason=f"ecoflap_fast._C could not be loaded: {type(e).__name__}: {e}")
        log.warning("%s; falling back to pure-torch ops", _state["reason"])
        return
    from ._library import register_cpp_fakes

    register_cpp_fakes()
    _state.update(ok=True, reason="loaded")


def is_available() -> bool:
    _load()
    return _state["ok"]


def reason() -> str:
    _load()
    return _state["reason"]


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA sources."""
    return is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("ecoflap_fast::pack_24_cutlass", "CUDA")


def require(what: str) -> None:
    if not is_available():
        raise RuntimeError(f"{what} needs the compiled extension ecoflap_fast._C, which is unavailable: {reason()}")


def ops():
    """The ``torch.ops.ecoflap_fast`` namespace (call :func:`require` first)."""
    return torch.ops.ecoflap_fast
