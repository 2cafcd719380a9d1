"""Reading and writing Hugging Face safetensors checkpoints tensor by tensor.

``Checkpoint`` indexes a folder (one ``model.safetensors`` or shards with
``model.safetensors.index.json``) from the file headers alone and reads single tensors on demand;
``ShardWriter`` writes tensors into shards of a usual size with the index transformers expects;
``save_model`` writes an in-memory model the same way, in the source checkpoint's dtype, so a
streamed run and an in-memory run produce the same files.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD_BYTES = 2 * 1024**3  # shards of about 2 GiB (transformers writes 5 GB; hubs like 2-5 GB)

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Checkpoint:
    """The tensors of a safetensors checkpoint folder: names, dtypes and shapes from the headers;
    ``get(name)`` reads one tensor."""

    def __init__(self, folder):
        from safetensors import safe_open

        self.folder = Path(folder)
        if (self.folder / INDEX).is_file():
            weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise FileNotFoundError(f"{self.folder} holds no safetensors checkpoint ({SINGLE} or {INDEX})")
        self._handles = {}
        self.files: dict[str, str] = {}
        self.meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for f in files:
            h = safe_open(str(self.folder / f), framework="pt")
            self._handles[f] = h
            for name in h.keys():
                sl = h.get_slice(name)
                self.files[name] = f
                self.meta[name] = (_DTYPES.get(sl.get_dtype(), torch.float32), tuple(sl.get_shape()))

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.files[name]].get_tensor(name)

    def nbytes(self, names=None) -> int:
        names = self.meta if names is None else names
        return sum(math.prod(self.meta[n][1]) * self.meta[n][0].itemsize for n in names)

    def dtype(self) -> torch.dtype:
        """The dtype most of the floating-point weights are stored in."""
        counts = Counter()
        for dtype, shape in self.meta.values():
            if dtype.is_floating_point:
                counts[dtype] += math.prod(shape)
        return counts.most_common(1)[0][0] if counts else torch.float32


class ShardWriter:
    """Writes tensors into ``model-0000k-of-0000n.safetensors`` shards (about ``shard_bytes`` each) and
    the index; a checkpoint that fits one shard is written as ``model.safetensors``."""

    def __init__(self, folder, shard_bytes: int = SHARD_BYTES):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str], int]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        if name in self.pending or any(name in names for _, names, _ in self.shards):
            raise ValueError(f"tensor {name} written twice")
        self.pending[name] = t
        self.pending_bytes += t.numel() * t.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        tmp_name = f"shard-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / tmp_name), metadata={"format": "pt"})
        self.shards.append((tmp_name, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, name the shards, write the index; returns the files written."""
        self._flush()
        n = len(self.shards)
        written = []
        if n == 1:
            tmp, _, _ = self.shards[0]
            os.replace(self.folder / tmp, self.folder / SINGLE)
            written.append(self.folder / SINGLE)
        else:
            weight_map, total = {}, 0
            for k, (tmp, names, nbytes) in enumerate(self.shards):
                final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                os.replace(self.folder / tmp, self.folder / final)
                written.append(self.folder / final)
                total += nbytes
                weight_map.update({name: final for name in names})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2))
            written.append(self.folder / INDEX)
        for p in written:
            os.chmod(p, 0o666 & ~_umask())
        return written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tied_names(model) -> set[str]:
    """State-dict names that share storage with an earlier name (tied embeddings): written once,
    re-tied by transformers on load."""
    seen, tied = set(), set()
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            tied.add(name)
        seen.add(key)
    return tied


def save_model(model, folder, *, dtype: torch.dtype | None = None, tokenizer=None, shard_bytes: int = SHARD_BYTES):
    """Write ``model`` as a Hugging Face folder: config, generation config, tokenizer, and the weights
    in shards through ``ShardWriter`` (floating-point tensors cast to ``dtype``, tied copies once)."""
    folder = Path(folder)
    writer = ShardWriter(folder, shard_bytes)
    skip = tied_names(model)
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        writer.add(name, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
    writer.close()
    write_config(model, folder, dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def write_config(model, folder, dtype: torch.dtype | None) -> None:
    config = type(model.config).from_dict(model.config.to_dict())
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        try:
            model.generation_config.save_pretrained(folder)
        except ValueError:  # a generation config transformers itself would not save
            pass
