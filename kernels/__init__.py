"""Triton kernels of ecoflap_fast, installed as ``ecoflap_fast.kernels``.

Importing this package never fails: when Triton is missing, :data:`AVAILABLE` is False and
:data:`REASON` says why. Kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.

The per-row selection has two algorithms (``kernels/select.py``): ``bisect`` (the default: the k-th
key bit by bit, 32 count reductions per row) and ``radix`` (four 256-bin histograms of 8-bit digits).
Both give identical results; pick one with :func:`set_select_variant` or the environment variable
``ECOFLAP_SELECT_VARIANT=bisect|radix``.
"""

from __future__ import annotations

import os

try:
    import triton  # noqa: F401

    AVAILABLE = True
    REASON = f"triton {triton.__version__}" + (" (interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "")
except Exception as e:  # pragma: no cover - depends on the environment
    AVAILABLE = False
    REASON = f"triton is not importable: {type(e).__name__}: {e}"

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Widest row the per-row selection kernel holds in registers; wider rows use the torch path.
MAX_ROW_WIDTH = 65536

SELECT_VARIANTS = ("bisect", "radix")
DEFAULT_SELECT_VARIANT = "bisect"  # until GPU measurements pick one
SELECT_VARIANT_ENV = "ECOFLAP_SELECT_VARIANT"
_select_variant: str | None = None


def check_select_variant(name: str, what: str = "variant") -> str:
    if name not in SELECT_VARIANTS:
        raise ValueError(f"{what} must be one of {list(SELECT_VARIANTS)}, got {name!r}")
    return name


def set_select_variant(name: str | None) -> None:
    """Per-row selection algorithm for every later call in this process: "bisect" or "radix";
    None goes back to ``$ECOFLAP_SELECT_VARIANT`` (default "bisect")."""
    global _select_variant
    _select_variant = None if name is None else check_select_variant(name)


def select_variant() -> str:
    """The per-row selection algorithm in effect: :func:`set_select_variant`, else
    ``$ECOFLAP_SELECT_VARIANT``, else :data:`DEFAULT_SELECT_VARIANT`."""
    if _select_variant is not None:
        return _select_variant
    env = os.environ.get(SELECT_VARIANT_ENV)
    if not env:
        return DEFAULT_SELECT_VARIANT
    return check_select_variant(env.strip().lower(), SELECT_VARIANT_ENV)
