"""Reading and writing Hugging Face safetensors checkpoints tensor by tensor.

``Checkpoint`` indexes a folder (one ``model.safetensors`` or shards with
``model.safetensors.index.json``) from the file headers alone and reads single tensors on demand;
``ShardWriter`` writes tensors into shards of a usual size with the index transformers expects,
each tensor straight to its place in its shard (the layout is known up front);
``save_model`` writes an in-memory model the same way, in the source checkpoint's dtype, so a
streamed run and an in-memory run produce the same files.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from pathlib import Path

import torch

from ._fs import _fsync_dir, _umask

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
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"),
                     ("F8_E5M2", "float8_e5m2")):  # fmt: skip
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_HEADER = 100 * 1024**2  # safetensors' own bound on the JSON header


class Checkpoint:
    """The tensors of a safetensors checkpoint folder: names, dtypes and shapes from the headers;
    ``get(name)`` reads one tensor.

    The headers are checked by ``safetensors.safe_open``; tensor bytes are then read with ``pread``
    into a fresh tensor rather than through a memory map, so the pages of blocks already read do not
    stay in the process's resident memory (a streamed run reads a checkpoint bigger than the memory
    once, block by block)."""

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
        self._fds: dict[str, int] = {}
        self.files: dict[str, str] = {}
        self.meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.unreadable: dict[str, str] = {}  # name: a safetensors dtype torch has no type for
        self._offsets: dict[str, int] = {}
        self.alias: dict[str, str] = {}  # a model's name -> the name this checkpoint stores it under
        try:
            for f in files:
                self._index(f, safe_open)
        except BaseException:
            self.close()
            raise

    def _index(self, f: str, safe_open) -> None:
        """Read one file's header; the checks hold for the very file the bytes are read from (the
        descriptor is opened first, and safetensors checks the file behind it)."""
        path = self.folder / f
        fd = os.open(path, os.O_RDONLY)
        self._fds[f] = fd
        via = f"/proc/self/fd/{fd}" if os.path.exists(f"/proc/self/fd/{fd}") else str(path)
        with safe_open(via, framework="pt") as h:  # validates the header and the offsets
            checked = {n: (h.get_slice(n).get_dtype(), tuple(h.get_slice(n).get_shape())) for n in h.keys()}
        header, start = _read_header(fd, path)
        size = os.fstat(fd).st_size
        for name, (dtype_name, shape) in checked.items():
            entry = header.get(name)
            same = isinstance(entry, dict) and entry.get("dtype") == dtype_name
            if not same or tuple(entry.get("shape", ())) != shape:
                raise ValueError(f"{path}: the header of tensor {name} changed while it was read")
            self.files[name] = f
            dtype = _DTYPES.get(dtype_name)
            if dtype is None:
                self.unreadable[name] = dtype_name
                continue
            begin, stop = (int(x) for x in entry["data_offsets"])
            if not 0 <= begin <= stop or stop - begin != math.prod(shape) * dtype.itemsize or start + stop > size:
                raise ValueError(f"{path}: tensor {name} has data offsets {entry['data_offsets']} outside its file")
            self.meta[name] = (dtype, shape)
            self._offsets[name] = start + begin

    def __contains__(self, name: str) -> bool:
        return self.alias.get(name, name) in self.files

    def get(self, name: str) -> torch.Tensor:
        name = self.alias.get(name, name)
        if name in self.unreadable:
            raise ValueError(
                f"{self.folder / self.files[name]}: tensor {name} has dtype {self.unreadable[name]}, "
                "which this torch cannot hold"
            )
        f = self.files[name]
        if f not in self._fds:
            raise ValueError(f"the checkpoint {self.folder} was closed; open it again to read {name}")
        dtype, shape = self.meta[name]
        out = torch.empty(shape, dtype=dtype)
        nbytes = out.numel() * out.element_size()
        if nbytes:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            fd, offset, done = self._fds[f], self._offsets[name], 0
            while done < nbytes:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise ValueError(f"{self.folder / f} ends inside tensor {name} (truncated file)")
                done += n
        return out

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def nbytes(self, names=None, dtype: torch.dtype | None = None) -> int:
        """Bytes of ``names`` (all tensors by default), floating-point ones counted in ``dtype`` if given."""
        names = self.meta if names is None else names
        total = 0
        for n in names:
            stored, shape = self.meta[n]
            item = dtype.itemsize if dtype is not None and stored.is_floating_point else stored.itemsize
            total += math.prod(shape) * item
        return total

    def dtype(self) -> torch.dtype:
        """The dtype most of the floating-point weights are stored in."""
        counts = Counter()
        for dtype, shape in self.meta.values():
            if dtype.is_floating_point:
                counts[dtype] += math.prod(shape)
        return counts.most_common(1)[0][0] if counts else torch.float32


def _read_header(fd: int, path) -> tuple[dict, int]:
    """(the JSON header of a safetensors file, the offset its data starts at)."""
    raw = os.pread(fd, 8, 0)
    (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (-1,)
    if not 0 < n <= MAX_HEADER or 8 + n > os.fstat(fd).st_size:
        raise ValueError(f"{path}: the safetensors header length is not valid")
    header = json.loads(os.pread(fd, n, 8))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    return header, 8 + n


def _pwrite_all(fd: int, data, offset: int) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(f"short write at offset {offset + done}")
        done += n


def layout(model, dtype: torch.dtype | None = None, skip=()) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every state-dict tensor of ``model`` except ``skip``, floating-point
    ones in ``dtype`` when given; works on meta tensors (a streamed skeleton)."""
    out = []
    for name, t in model.state_dict().items():
        if name not in skip:
            out.append((name, dtype if dtype is not None and t.is_floating_point() else t.dtype, tuple(t.shape)))
    return out


class ShardWriter:
    """Writes tensors into ``model-0000k-of-0000n.safetensors`` shards (about ``shard_bytes`` each) and
    the index; a checkpoint that fits one shard is written as ``model.safetensors``.

    The layout (every tensor's name, dtype and shape) is given up front, so every shard's header and
    every tensor's place are known before the first tensor arrives: ``add`` writes a tensor's bytes to
    its place at once, in any order, and nothing is held in memory. ``close`` checks that every tensor
    of the layout was written."""

    def __init__(self, folder, tensors, shard_bytes: int = SHARD_BYTES):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self.where: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}  # name: shard, offset, ...
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size, seen = 0, set()
        for name, dtype, shape in tensors:
            if dtype not in _NAMES:
                raise ValueError(f"tensor {name}: dtype {dtype} cannot be written to safetensors by the engine")
            if name in seen:
                raise ValueError(f"tensor {name} appears twice in the layout")
            if name == "__metadata__":
                raise ValueError("a tensor cannot be named __metadata__ in safetensors")
            seen.add(name)
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(shape), nbytes))
            size += nbytes
        self.shards: list[tuple[str, list[str], int]] = []
        self._fds: list[int] = []
        self.closed = False
        try:
            self._create(shards)
        except BaseException:
            self.abort()
            raise
        self.written: set[str] = set()

    def _create(self, shards) -> None:
        for k, entries in enumerate(shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, dtype, shape, nbytes in entries:
                header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
            start = 8 + len(raw)
            tmp_name = f"shard-{k + 1:05d}.safetensors"
            self.shards.append((tmp_name, [e[0] for e in entries], offset))
            fd = os.open(self.folder / tmp_name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            self._fds.append(fd)
            _pwrite_all(fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(fd, start + offset)
            for name, dtype, shape, nbytes in entries:
                self.where[name] = (k, start + header[name]["data_offsets"][0], dtype, shape)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None:
            self.abort()
        elif not self.closed:
            self.close()
        return False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.closed:
            raise ValueError(f"the writer of {self.folder} is closed; tensor {name} not written")
        if name not in self.where:
            raise ValueError(f"tensor {name} is not in the checkpoint's layout")
        if name in self.written:
            raise ValueError(f"tensor {name} written twice")
        k, offset, dtype, shape = self.where[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name} is {tensor.dtype} {tuple(tensor.shape)}; the layout says {dtype} {shape}")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            _pwrite_all(self._fds[k], t.reshape(-1).view(torch.uint8).numpy(), offset)
        self.written.add(name)

    def _close_files(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def abort(self) -> None:
        """Close and remove the shards written so far (nothing a loader could take for a model)."""
        self.closed = True
        self._close_files()
        for tmp, _, _ in self.shards:
            (self.folder / tmp).unlink(missing_ok=True)

    def __del__(self):
        try:
            if not self.closed:
                self.abort()
        except Exception:  # interpreter shutdown
            pass

    def close(self) -> list[Path]:
        """Check that every tensor was written, sync, name the shards, write the index; returns the
        files written."""
        if self.closed:
            raise ValueError(f"the writer of {self.folder} is already closed")
        missing = [n for n in self.where if n not in self.written]
        if missing:
            self.abort()
            raise ValueError(f"tensor {missing[0]} (and {len(missing) - 1} more) was never written")
        try:
            for fd in self._fds:
                os.fsync(fd)
        except BaseException:
            self.abort()
            raise
        self._close_files()
        self.closed = True
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
        _fsync_dir(self.folder)
        return written


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
    skip = tied_names(model)
    with ShardWriter(folder, layout(model, dtype, skip), shard_bytes) as writer:  # removed again on an error
        for name, t in model.state_dict().items():
            if name not in skip:
                writer.add(name, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
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
