"""Data-parallel calibration on ``torch.distributed`` (SPEC §8).

Under ``torchrun --nproc-per-node N -m ecoflap_fast prune ...`` every rank holds the model (or a
streamed skeleton) and takes every N-th calibration batch; the quantities the pruning decisions are
made from are summed over ranks before they are used, so every rank makes the same decisions:
activation statistics and token counts per matrix (fp64 sums), stage-1 scores, and evaluation losses.
Rank 0 writes the outputs. gloo on CPU, NCCL on GPU. Without ``torchrun`` nothing here does anything.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1); True when running data-parallel."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return active()
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def shard(items: list) -> tuple[list, list[int]]:
    """(this rank's items, their indices in the whole list): every world()-th item from rank()."""
    ids = list(range(rank(), len(items), world()))
    return [items[i] for i in ids], ids


def _sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks in fp64 (on the tensor's device; gloo reduces on the CPU)."""
    if not active():
        return t
    x = t.detach().to(torch.float64)
    if dist.get_backend() == "gloo" and x.device.type != "cpu":
        x = x.cpu()
    dist.all_reduce(x)
    return x.to(t.device)


def all_reduce_stats(stats: dict, tokens: dict, matrices: list, make_stat, device) -> None:
    """Sum every rank's input statistics and token counts of ``matrices`` in place. A matrix some rank
    saw no token for joins with an empty statistic; one no rank saw stays absent. ActNormAccumulator:
    Σx² and the sample count; HessianAccumulator: n·H and n. Every rank makes the same calls."""
    if not active():
        return
    names = [m.name for m in matrices]
    present = _sum(torch.tensor([1.0 if n in stats else 0.0 for n in names]))
    counts = _sum(torch.tensor([float(tokens.get(n, 0)) for n in names]))
    for i, m in enumerate(matrices):
        if present[i] == 0:
            continue
        s = stats.get(m.name) or make_stat(m.in_features, device)
        stats[m.name] = s
        n = _sum(torch.tensor(float(s.nsamples)))
        if hasattr(s, "H"):
            s.H = (_sum(s.H * s.nsamples) / n).to(s.H.dtype)
        else:
            s._sum = _sum(s._sum).to(torch.float32)
        s.nsamples = int(n)
        tokens[m.name] = int(counts[i])


def all_reduce_scores(scores: dict[str, float]) -> dict[str, float]:
    """Stage-1 scores summed over ranks (every rank scored its own batches)."""
    if not active():
        return scores
    names = sorted(scores)
    total = _sum(torch.tensor([scores[n] for n in names], dtype=torch.float64))
    return {n: float(v) for n, v in zip(names, total)}


def all_reduce_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not active():
        return tensors
    return {n: _sum(t).to(t.dtype) for n, t in sorted(tensors.items())}


def all_reduce_floats(*values: float) -> list[float]:
    if not active():
        return list(values)
    return [float(v) for v in _sum(torch.tensor(values, dtype=torch.float64))]


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (a path, a small Python value)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def finish() -> None:
    """Leave the process group at the end of a run (every rank has written what it writes)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()
