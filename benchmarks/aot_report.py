"""Ahead-of-time compile report of every kernel for a GPU architecture, without a GPU (SPEC §10).

    python benchmarks/aot_report.py --arch sm_90 --out benchmarks/results/aot_sm90.csv
    python benchmarks/aot_report.py --arch sm_80 --out benchmarks/results/aot_sm80.csv --fail-on-spill

Registers, spills, shared memory, occupancy, bytes per weight and passes per row of the Triton
kernels at the launch configurations the dispatcher picks for every benchmark shape, dtype and
pattern, and of the CUDA kernels of csrc/cuda/ (nvcc -Xptxas -v). The report lives in
``ecoflap_fast.bench.aot`` (its docstring defines every column); this script only runs it, with
TRITON_INTERPRET cleared (the interpreter replaces the kernels this report compiles).
"""

import os
import sys
from pathlib import Path

if os.environ.pop("TRITON_INTERPRET", None) == "1":
    print("aot_report: ignoring TRITON_INTERPRET=1 (it compiles real kernels)", file=sys.stderr)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated to silence its warning
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ecoflap_fast.bench.aot import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
