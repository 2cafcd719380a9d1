"""Triton kernels of ecoflap_fast, installed as ``ecoflap_fast.kernels``.

Importing this package never fails: when Triton is missing, :data:`AVAILABLE` is False and
:data:`REASON` says why. Kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
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
