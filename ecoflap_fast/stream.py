"""Out-of-core runs (SPEC §8): a meta-device skeleton whose blocks are read from the checkpoint when
the walk reaches them and freed after.

``open_streamed(folder)`` builds the model with every parameter outside the block lists read (the
embeddings, the head, the final norm) and every block parameter on the meta device; a
``BlockLoader`` swaps one block's tensors in from the checkpoint (``checkpoint.Checkpoint``, one
tensor at a time, cast to the compute dtype) and out again. ``loader.on_demand()`` makes any forward
of the model work by loading each block on its call and freeing it when it returns; the walk's
block-major passes (stage 2, evaluation, the blockwise gradient of stage 1) load each block once.
Peak memory: embeddings + head + about two blocks + the calibration activations.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import Checkpoint


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``model`` by ``value`` (a new Parameter for parameters)."""
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        owner._buffers[attr] = value


class BlockLoader:
    """Reads the tensors of one module subtree (a block) from ``checkpoint`` into ``model`` and frees
    them again; tensors the checkpoint does not hold (non-persistent buffers) are left as they are."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype, device="cpu", spill_dir=None):
        self.model, self.checkpoint, self.dtype, self.device = model, checkpoint, dtype, torch.device(device)
        self.loaded: set[str] = set()
        self.held: set[str] = set()  # loaded by hold(): on-demand calls leave them in memory
        self.reads = 0
        self.spill_dir = spill_dir  # where spill() keeps blocks (a temporary folder made inside it)
        self.spilled: dict[str, Path] = {}  # block path -> the file it is read from instead of the checkpoint
        self._spill_root: Path | None = None

    def _names(self, path: str) -> list[str]:
        module = self.model.get_submodule(path)
        names = [f"{path}.{n}" for n, _ in module.named_parameters()]
        names += [f"{path}.{n}" for n, _ in module.named_buffers() if f"{path}.{n}" in self.checkpoint]
        return names

    def load(self, path: str) -> None:
        if path in self.loaded:
            return
        if path in self.spilled:
            from safetensors import safe_open

            with safe_open(str(self.spilled[path]), framework="pt") as f:
                for name in f.keys():
                    _set(self.model, name, f.get_tensor(name).to(self.device))
                    self.reads += 1
            self.loaded.add(path)
            return
        for name in self._names(path):
            if name not in self.checkpoint:
                raise ValueError(f"the checkpoint {self.checkpoint.folder} has no tensor {name}")
            t = self.checkpoint.get(name)
            _set(self.model, name, t.to(self.device, self.dtype if t.is_floating_point() else t.dtype))
            self.reads += 1
        self.loaded.add(path)

    def spill(self, path: str) -> None:
        """Keep block ``path`` as it is now (pruned, in the compute dtype): its tensors go to a file in a
        temporary folder, and every later load of the block reads them from there instead of the
        checkpoint. Stage 2 spills the blocks of a tower whose output feeds a later tower, so that
        the later tower is calibrated on the pruned upstream tower, as in memory."""
        import tempfile

        from safetensors.torch import save_file

        if path not in self.loaded:
            raise ValueError(f"block {path} is not in memory, so it cannot be spilled")
        if self._spill_root is None:
            self._spill_root = Path(tempfile.mkdtemp(prefix=".ecoflap-spill-", dir=self.spill_dir))
        module, start = self.model.get_submodule(path), len(path) + 1
        own = dict(module.named_parameters()) | dict(module.named_buffers())  # this block's tensors only
        tensors = {n: own[n[start:]].detach().cpu().contiguous() for n in self._names(path)}
        file = self._spill_root / f"{len(self.spilled):05d}.safetensors"
        save_file(tensors, str(file))
        self.spilled[path] = file

    def discard_spill(self) -> None:
        """Forget the spilled blocks (later loads read the checkpoint again) and remove their files."""
        import shutil

        root, self._spill_root, self.spilled = self._spill_root, None, {}
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def __del__(self):
        try:
            self.discard_spill()
        except Exception:  # interpreter shutdown
            pass

    def release(self, path: str) -> None:
        if path not in self.loaded:
            return
        module = self.model.get_submodule(path)
        for n, p in list(module.named_parameters()):
            _set(self.model, f"{path}.{n}", torch.empty(p.shape, dtype=p.dtype, device="meta"))
        self.loaded.discard(path)
        if self.device.type == "cpu":
            release_memory()

    def release_all(self) -> None:
        for path in list(self.loaded - self.held):
            self.release(path)

    @contextlib.contextmanager
    def hold(self, path: str):
        """Within: block ``path`` is in memory, whatever on-demand forwards do meanwhile."""
        self.load(path)
        self.held.add(path)
        try:
            yield
        finally:
            self.held.discard(path)
            self.release(path)

    def _done(self, path: str) -> None:
        if path not in self.held:
            self.release(path)

    @contextlib.contextmanager
    def on_demand(self, block_paths: list[str]):
        """Within: every block in ``block_paths`` is read when it is called and freed when it returns
        (also when a forward stops part way)."""
        handles = []
        for path in block_paths:
            module = self.model.get_submodule(path)
            handles.append(module.register_forward_pre_hook(lambda m, a, p=path: self.load(p)))
            handles.append(module.register_forward_hook(lambda m, a, o, p=path: self._done(p)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.release_all()


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def release_memory() -> None:
    """Hand freed CPU memory back to the operating system. glibc keeps freed blocks of a few MiB to
    a few tens of MiB (most weight matrices) in its heap, where later allocations of other sizes do
    not reuse them: a process that frees and allocates models or blocks in turn grows by about a
    model per round without this (measured: 1.3 GiB per copy of a 0.5B model)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def open_streamed(folder, *, dtype: torch.dtype = torch.float32, device="cpu"):
    """(model, loader, checkpoint): the model of checkpoint ``folder`` with everything outside its block
    lists read and every block parameter on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from . import hf, walk

    checkpoint = Checkpoint(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)  # never a folder's own code
    with init_empty_weights(include_buffers=False):
        model = hf.model_class(config)._from_config(config, **hf.dtype_kw(dtype))
    model.eval()
    checkpoint.alias = hf.renamed_checkpoint_names(model, list(checkpoint.files))  # names it loads under
    stacks = [s.path for s in walk.structure(model).stacks]
    inside = lambda name: any(name.startswith(p + ".") for p in stacks)  # noqa: E731
    state = model.state_dict(keep_vars=True)
    missing = []
    for name, t in state.items():
        if inside(name):
            continue
        if name in checkpoint:
            v = checkpoint.get(name)
            _set(model, name, v.to(device, dtype if v.is_floating_point() else v.dtype))
        elif t.device.type == "meta" and isinstance(t, nn.Parameter):
            missing.append(name)
    model.tie_weights()
    still = [n for n in missing if model.get_parameter(n).device.type == "meta"]
    if still:
        raise ValueError(f"the checkpoint {folder} has no tensor {still[0]} (and {len(still) - 1} more)")
    absent = [n for n in state if inside(n) and isinstance(state[n], nn.Parameter) and n not in checkpoint]
    if absent:
        raise ValueError(
            f"the checkpoint {folder} has no tensor {absent[0]} (nor one transformers renames to it): --stream needs "
            "a checkpoint whose tensors load one to one (load it once in memory and save it with --save-model)"
        )
    for name, buf in model.named_buffers():
        if not inside(name) and buf.device != torch.device(device):
            _set(model, name, buf.to(device))
    return model, BlockLoader(model, checkpoint, dtype, device), checkpoint


def available_memory(device="cpu") -> int:
    """Bytes the run may still use: free device memory on CUDA, available RAM on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def process_memory(device="cpu") -> int:
    """Bytes this process holds now on ``device``: resident memory on the CPU, allocated on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


def estimate(folder, dtype: torch.dtype, nsamples: int, seqlen: int, batch_size: int) -> dict:
    """Bytes a run over checkpoint ``folder`` needs, from the tensor headers and config.json alone:
    the weights in ``dtype``, the part outside the blocks, the largest block, the calibration
    activations (every window's hidden states at the current block, twice, plus one batch's MLP
    intermediates), and the streamed peak (outside + two blocks + activations)."""
    import json
    import math
    import re
    from collections import defaultdict
    from pathlib import Path

    ck = Checkpoint(folder)
    size = torch.empty((), dtype=dtype).element_size()
    per_tensor = {
        n: math.prod(shape) * (size if dt.is_floating_point else dt.itemsize) for n, (dt, shape) in ck.meta.items()
    }
    blocks: dict[str, int] = defaultdict(int)
    outside = 0
    for n, b in per_tensor.items():
        m = re.match(r"(.*?\.\d+)\.", n)
        if m and re.search(r"\.(layers|layer|h|block|blocks)\.\d+$", m.group(1)):
            blocks[m.group(1)] += b
        else:
            outside += b
    cfg = json.loads((Path(folder) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 4096
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or cfg.get("d_ff") or 4 * hidden
    activations = 2 * nsamples * seqlen * hidden * 4 + 4 * batch_size * seqlen * inter * 4
    block = max(blocks.values(), default=0)
    weights = sum(per_tensor.values())
    return {
        "weights": weights,
        "outside": outside,
        "block": block,
        "activations": activations,
        "peak_streamed": outside + 2 * block + activations,
        "peak_in_memory": weights + activations,
    }
