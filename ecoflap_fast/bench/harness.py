"""One harness for every benchmark: timing, environment facts, and the long results format.

Each result row: bench, op, provider, shape, dtype, metric, unit, median, p20, p80, device, torch,
triton, cuda, commit, date. Rows are appended to a CSV (the repository keeps its runs under
benchmarks/results/); tables and plots are generated from those files (benchmarks/report.py),
never typed by hand.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

FIELDS = [
    "bench",
    "op",
    "provider",
    "shape",
    "dtype",
    "metric",
    "unit",
    "median",
    "p20",
    "p80",
    "device",
    "torch",
    "triton",
    "cuda",
    "commit",
    "date",
]


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), q[1], q[7]


def measure(
    fn, *, setup=None, device: str = "cpu", warmup: int = 1, repeat: int = 5, rep_ms: int = 200
) -> tuple[float, float, float]:
    """Milliseconds (median, p20, p80) of ``fn(*setup())``; ``setup`` runs untimed before every call
    (fresh inputs for in-place ops). On CUDA: with a ``setup``, every call gets fresh inputs and a
    flushed L2 and is timed by its own pair of CUDA events (:func:`_cuda_fresh`); without one,
    ``triton.testing.do_bench`` (events, L2 flush)."""
    if device.startswith("cuda"):
        if setup is not None:
            return _cuda_fresh(fn, setup, rep_ms=rep_ms)
        import triton.testing

        out = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return tuple(out)
    for _ in range(warmup):
        fn(*(setup() if setup else ()))
    samples = []
    for _ in range(repeat):
        args = setup() if setup else ()
        t0 = time.perf_counter()
        fn(*args)
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


_L2_FLUSH: dict = {}


def _cuda_fresh(fn, setup, *, rep_ms: int = 200, warmup_ms: int = 25, min_reps: int = 5) -> tuple[float, float, float]:
    """CUDA timing of ``fn(*setup())`` with fresh inputs for every call: an in-place op (pruning)
    must not be timed on its own output, whose zeros would change what the selection sees. Per
    call: ``setup()`` and an L2 flush (a 256 MB write, as do_bench does), then the call between two
    events; enough calls to fill ``rep_ms`` (between ``min_reps`` and 200) after ``warmup_ms`` (at most
    50 calls)."""
    if "buf" not in _L2_FLUSH:
        _L2_FLUSH["buf"] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    flush = _L2_FLUSH["buf"]

    def once():
        args = setup()
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        return start, end

    torch.cuda.synchronize()
    s, e = once()
    torch.cuda.synchronize()
    estimate = max(s.elapsed_time(e), 1e-3)
    for _ in range(min(50, max(1, int(warmup_ms / estimate)))):
        once()
    events = [once() for _ in range(max(min_reps, min(200, int(rep_ms / estimate))))]
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) for s, e in events])


def copy_bandwidth_gbs(device: str = "cpu", nbytes: int = 1 << 30) -> float:
    """Measured copy bandwidth of the device in GB/s (bytes read + bytes written per second)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    med, _, _ = measure(lambda: dst.copy_(src), device=device, repeat=7)
    return 2 * nbytes / (med * 1e-3) / 1e9


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent.parent
        return subprocess.check_output(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except Exception:
        return "unknown"


def environment(device: str) -> dict:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "-"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        cpu = platform.processor() or platform.machine()
        name = f"{cpu} x{os.cpu_count()} cores (torch threads {torch.get_num_threads()})"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_v,
        "cuda": torch.version.cuda or "-",
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


@dataclass
class Results:
    bench: str
    device: str
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.env = environment(self.device)

    def add(self, op, provider, shape, dtype, metric, unit, med, p20=None, p80=None) -> None:
        self.rows.append(
            {
                "bench": self.bench,
                "op": op,
                "provider": provider,
                "shape": shape,
                "dtype": str(dtype).replace("torch.", ""),
                "metric": metric,
                "unit": unit,
                "median": f"{med:.6g}",
                "p20": f"{p20 if p20 is not None else med:.6g}",
                "p80": f"{p80 if p80 is not None else med:.6g}",
                **self.env,
            }
        )

    def write(self, path: Path) -> Path:
        """Append every row to the CSV at ``path`` (header first if the file is new)."""
        return self._append(path, self.rows)

    def flush(self, path: Path) -> Path:
        """Append the rows added since the last flush: a run cut short keeps what it measured."""
        done = getattr(self, "_flushed", 0)
        self._flushed = len(self.rows)
        return self._append(path, self.rows[done:])

    @staticmethod
    def _append(path: Path, rows: list[dict]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerows(rows)
        return path


def read_results(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return list(csv.DictReader(f))
