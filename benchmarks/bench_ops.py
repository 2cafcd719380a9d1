"""Op throughput against the usual torch implementations, on real LLaMA layer shapes.

    python benchmarks/bench_ops.py --device cpu --shapes llama7b --dtype bfloat16
    python benchmarks/bench_ops.py --device cuda --shapes all --variants bisect,radix   # both select kernels

The benchmark lives in ``ecoflap_fast.bench.ops`` (``ecoflap-fast bench`` runs it too); this script
appends to benchmarks/results/ops_<device>.csv.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import RESULTS_DIR  # noqa: E402
from ecoflap_fast.bench.ops import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(results_dir=RESULTS_DIR))
