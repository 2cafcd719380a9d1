"""2:4 inference timings: semi-structured sparse Linear vs dense, on the table's layer shapes (CUDA).

    python benchmarks/bench_sparse24.py --shapes all --tokens 16,128,2048

The benchmark lives in ``ecoflap_fast.bench.sparse24``; this script appends to
benchmarks/results/linear24_<device>.csv.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import RESULTS_DIR  # noqa: E402
from ecoflap_fast.bench.sparse24 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(results_dir=RESULTS_DIR))
