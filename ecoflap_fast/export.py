"""Sparse checkpoint exports (SPEC §6) and their loader.

Formats:
  hf-dense    safetensors with zeros + compressed-tensors metadata (format "dense") in config.json
  ct-bitmask  compressed-tensors "sparse-bitmask": P.compressed (1-D), P.bitmask, P.shape, P.row_offsets
  ct-24       compressed-tensors "sparse-24-bitmask": P.compressed [out, in/2], P.bitmask, P.shape
  torch-24    P.values + P.meta in PyTorch's CUTLASS 2:4 layout (ops.pack_24_cutlass)

Safety: everything is validated before anything is written (a non-2:4 layer asked to go into a 2:4
format is named, never re-pruned; a value the export dtype cannot hold, inf or NaN after the cast,
is named); the checkpoint is written to a temporary folder beside the destination, read back the way
``load_sparse`` reads it (the model class from the written config.json, every tensor's name and
shape, every layer decoded and its layout checked) and compared bit-exactly with the pruned weights
in the export dtype, and only then renamed into place; an existing destination is refused unless
``force``; the model and its source are only read.

``load_sparse`` trusts nothing in the folder: the safetensors headers are checked against the files,
every encoded layer against the shape the config gives it (bitmask size and popcount against the
stored values and row offsets, 2:4 groups, CUTLASS metadata against its values), and the memory the
dense model needs against what is available, before a tensor is decoded.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from . import _untrusted, ops, walk
from ._fs import check_destination, staged_folder
from ._torch_ops import check_nm_sparse

FORMATS = ("hf-dense", "ct-bitmask", "ct-24", "torch-24")
WEIGHTS = "model.safetensors"
_CT_FORMAT = {"hf-dense": "dense", "ct-bitmask": "sparse-bitmask", "ct-24": "sparse-24-bitmask"}


def _check_24(name: str, w: torch.Tensor) -> None:
    if w.shape[1] % 4:
        raise ValueError(f"layer {name} has {w.shape[1]} input features: a 2:4 format needs a multiple of 4")
    try:
        check_nm_sparse(w != 0, 2, 4, name=f"layer {name}")
    except ValueError as e:
        raise ValueError(f"{e}; prune it with pattern 2:4 first") from None


def _state_dict(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The model's tensors, tied duplicates dropped (transformers re-ties them on load), cast to dtype."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in seen:  # a tied weight (lm_head = embed_tokens): stored once
            continue
        seen.add(key)
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.cpu().contiguous()
    return out


def _sparsity_config(fmt: str, pattern: str, global_sparsity: float, ignore: list[str]) -> dict:
    return {
        "quant_method": "compressed-tensors",
        "format": _CT_FORMAT[fmt],
        "sparsity_config": {
            "format": _CT_FORMAT[fmt],
            "sparsity_structure": pattern,
            "global_sparsity": global_sparsity,
            "targets": ["Linear"],
            "ignore": ignore,
            "registry_requires_subclass": False,
        },
    }


def _encode(fmt: str, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    prefix = name[: -len(".weight")]
    if fmt == "ct-bitmask":
        p = ops.pack_bitmask(w)
        return {
            f"{prefix}.compressed": p.values,
            f"{prefix}.bitmask": p.bitmask,
            f"{prefix}.shape": torch.tensor(list(w.shape)).reshape(-1, 1),
            f"{prefix}.row_offsets": p.row_offsets,
        }
    if fmt == "ct-24":
        p = ops.pack_bitmask(w, nm=(2, 4))
        return {
            f"{prefix}.compressed": p.values,
            f"{prefix}.bitmask": p.bitmask,
            f"{prefix}.shape": torch.tensor(list(w.shape)).reshape(-1, 1),
        }
    values, meta = ops.pack_24_cutlass(w)
    return {f"{prefix}.values": values, f"{prefix}.meta": meta}


def _check_castable(name: str, original: torch.Tensor, cast: torch.Tensor) -> None:
    """A value the export dtype cannot hold (inf or NaN after the cast) is an error naming the tensor."""
    if not cast.is_floating_point():
        return
    bad = ~torch.isfinite(cast)
    if bool(bad.any()):
        n = int(bad.sum())
        dt = str(cast.dtype).replace("torch.", "")
        if bool(torch.isfinite(original[bad]).all()):
            big = float(original.detach().abs().max())
            raise ValueError(
                f"{name} has {n} value(s) that {dt} cannot hold (largest |w| = {big:.4g}; {dt} holds up to "
                f"{torch.finfo(cast.dtype).max:.5g}): they would be stored as inf; export in bfloat16 or float32"
            )
        raise ValueError(f"{name} holds {n} inf/NaN value(s); an export with them is refused")


COMPANIONS = {
    "ct-bitmask": ("compressed", "bitmask", "shape", "row_offsets"),
    "ct-24": ("compressed", "bitmask", "shape"),
    "torch-24": ("values", "meta"),
}


class ExportFormatError(_untrusted.UntrustedFileError):
    """An export folder whose tensors do not describe the model its config.json declares."""


def _bits(bitmask: torch.Tensor, cols: int, where: str) -> torch.Tensor:
    """bool [rows, cols] of a bitmask (column c at byte c//8, bit c%8, LSB first); padding bits must be 0."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1).bool()
    if bool(bits[:, cols:].any()):
        raise ExportFormatError(f"{where}: the bitmask sets bits beyond column {cols}")
    return bits[:, :cols]


def _decode(fmt: str, prefix: str, tensors, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """The dense weight of an encoded layer ``prefix``; ``tensors`` maps names to tensors (a dict or
    a safetensors handle's ``get_tensor``). With ``shape`` (the shape the model gives the weight),
    the stored layout is checked against it and against itself before anything is unpacked."""
    get = tensors.get_tensor if hasattr(tensors, "get_tensor") else tensors.__getitem__
    where = f"layer {prefix}"
    if fmt == "torch-24":
        values, meta = get(f"{prefix}.values"), get(f"{prefix}.meta")
        dense = ops.unpack_24_cutlass(values, meta)
        if shape is not None:
            if tuple(dense.shape) != tuple(shape):
                raise ExportFormatError(f"{where}: values/meta decode to {tuple(dense.shape)}, the model has {shape}")
            v2, m2 = ops.pack_24_cutlass(dense)
            if not (torch.equal(v2, values) and torch.equal(m2, meta)):
                raise ExportFormatError(
                    f"{where}: the CUTLASS metadata does not match its values (damaged, tampered with, or not "
                    "written by this engine)"
                )
        return dense
    stored_shape = get(f"{prefix}.shape").flatten().tolist()
    if shape is None:
        return ops.unpack_bitmask(get(f"{prefix}.compressed"), get(f"{prefix}.bitmask"), stored_shape)
    rows, cols = shape
    if stored_shape != [rows, cols]:
        raise ExportFormatError(f"{where}: {prefix}.shape says {stored_shape}, the model has {[rows, cols]}")
    bitmask, values = get(f"{prefix}.bitmask"), get(f"{prefix}.compressed")
    keep = _bits(bitmask, cols, where)
    per_row = keep.sum(1)
    if fmt == "ct-24":
        if cols % 4 or bool((keep.reshape(rows, cols // 4, 4).sum(-1) != 2).any()):
            raise ExportFormatError(f"{where}: the bitmask does not keep exactly 2 of every 4 columns")
        if tuple(values.shape) != (rows, cols // 2):
            raise ExportFormatError(f"{where}: compressed values {tuple(values.shape)}, {(rows, cols // 2)} expected")
    else:
        if values.dim() != 1 or values.numel() != int(per_row.sum()):
            raise ExportFormatError(
                f"{where}: the bitmask keeps {int(per_row.sum())} values, {values.numel()} are stored"
            )
        offsets = get(f"{prefix}.row_offsets")
        if not torch.equal(offsets.flatten().long(), torch.cumsum(per_row, 0) - per_row):
            raise ExportFormatError(f"{where}: row_offsets do not match the bitmask")
    return ops.unpack_bitmask(values, bitmask, (rows, cols))


def export_(
    model: nn.Module,
    out,
    fmt: str,
    *,
    tokenizer=None,
    force: bool = False,
    dtype: torch.dtype | None = None,
    plain_config: bool = False,
) -> dict:
    """Write ``model`` to folder ``out`` in format ``fmt``; returns {"path", "bytes", "format", ...}.

    ``plain_config`` (hf-dense only): keep config.json free of the compressed-tensors
    ``quantization_config`` (which makes ``transformers.from_pretrained`` require that package) and
    write the same metadata to ``sparsity_config.json`` beside it instead."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if plain_config and fmt != "hf-dense":
        raise ValueError(f"plain_config applies to hf-dense only; {fmt} needs its metadata in config.json")
    out = Path(out).expanduser().resolve()
    if out.exists() and not force:
        raise FileExistsError(f"export destination {str(out)!r} exists; pass force=True (--force) to replace it")
    check_destination(out, force)
    if fmt == "torch-24" and dtype is None and next(model.parameters()).dtype == torch.float32:
        dtype = torch.bfloat16  # the CUTLASS layout stores 16-bit values
    # compressed formats store Linear weights (compressed-tensors targets Linear); Conv1D and fused
    # expert weights are written as they are, zeros included
    layers = [n for n, m in walk.structure(model).matrices().items() if m.kind == "linear"]
    state = _state_dict(model, dtype)
    layer_keys = {f"{n}.weight" for n in layers}
    originals = model.state_dict()
    for name, t in state.items():  # what the export dtype cannot hold is named before anything is written
        _check_castable(name, originals[name], t)
    # validate every layer before writing anything
    for name in layers:
        w = state[f"{name}.weight"]
        if fmt in ("ct-24", "torch-24"):
            _check_24(name, w)
        if fmt == "torch-24":
            if w.dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(f"torch-24 stores float16/bfloat16 values; layer {name} is {w.dtype} (pass dtype=)")
            if w.shape[0] % 32 or w.shape[1] % 64:
                raise ValueError(
                    f"layer {name} has shape {tuple(w.shape)}; torch-24 needs rows % 32 == 0 and columns % 64 == 0"
                )
    zeros = sum(int((state[k] == 0).sum()) for k in layer_keys)
    total = sum(state[k].numel() for k in layer_keys)
    pattern = "2:4" if fmt in ("ct-24", "torch-24") else "unstructured"
    tensors = {}
    for name, t in state.items():
        if name in layer_keys and fmt != "hf-dense":
            tensors.update(_encode(fmt, name, t))
        else:
            tensors[name] = t
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]  # load_sparse builds the class it was saved from
    if dtype is not None:
        config["torch_dtype"] = config["dtype"] = str(dtype).replace("torch.", "")
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    if fmt == "torch-24":
        config["ecoflap_sparse"] = {"format": "torch-24", "layers": sorted(layers), "global_sparsity": zeros / total}
    elif not plain_config:
        config["quantization_config"] = _sparsity_config(fmt, pattern, zeros / total, ignore)

    with staged_folder(out, force) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if plain_config:
            meta = _sparsity_config(fmt, pattern, zeros / total, ignore)
            (tmp / "sparsity_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # read back as load_sparse reads it (class from the written config, every name and shape,
        # every layer's layout checked) and compare exactly with the pruned weights in the export dtype
        # (values: a -0.0 that the bitmask layouts do not store reads back as +0.0)
        seen = set()
        for name, got in _read_export(tmp):
            seen.add(name)
            t = state.get(name)
            if t is None or got.dtype != t.dtype or not torch.equal(got, t):
                raise RuntimeError(f"export verification failed for {name}: the written tensor differs")
        if seen != set(state):
            raise RuntimeError(f"export verification failed: {sorted(set(state) - seen)[:3]} were not read back")
        nbytes = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        weights_bytes = (tmp / WEIGHTS).stat().st_size
    return {
        "path": str(out),
        "format": fmt,
        "bytes": nbytes,
        "weights_bytes": weights_bytes,
        "global_sparsity": zeros / total,
        "dtype": str(next(iter(state.values())).dtype).replace("torch.", ""),
    }


class _Export:
    """An export folder, checked from config.json and the safetensors headers alone: the format, the
    model built on the meta device from the config, and which stored tensors make each weight."""

    def __init__(self, path):
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        from . import hf

        path = Path(path)
        if not (path / "config.json").is_file() or not (path / WEIGHTS).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not an ecoflap_fast export (config.json and {WEIGHTS} expected)")
        raw = _untrusted.read_json(path / "config.json", "config.json")
        self.fmt = _untrusted.ecoflap_export_format(raw) or "hf-dense"
        self.sparse = raw.pop("ecoflap_sparse", None)
        raw.pop("quantization_config", None)
        self.path, self.infos = path, _untrusted.safetensors_header(path / WEIGHTS)
        try:
            self.config = AutoConfig.for_model(**raw)
            with init_empty_weights():
                self.model = hf.model_class(self.config)._from_config(self.config)
            self.model.tie_weights()
        except Exception as e:
            raise ExportFormatError(f"{path}/config.json does not describe a model transformers can build: {e}") from e
        expected = self.model.state_dict(keep_vars=True)
        suffixes = tuple(f".{c}" for c in COMPANIONS.get(self.fmt, ()))
        self.encoded = sorted(
            {k.rsplit(".", 1)[0] for k in self.infos if self.fmt in COMPANIONS and k.endswith(suffixes[:1])}
        )
        parts = {f"{p}.{c}" for p in self.encoded for c in COMPANIONS.get(self.fmt, ())}
        for prefix in self.encoded:
            name = f"{prefix}.weight"
            if name not in expected or expected[name].dim() != 2:
                raise ExportFormatError(f"{path}: {prefix} is stored encoded, but the model has no matrix {name}")
            self._check_layout(prefix, tuple(expected[name].shape))
        self.plain = [k for k in self.infos if k not in parts]
        for k in self.plain:
            if k not in expected:
                raise ExportFormatError(f"{path}: tensor {k!r} is not part of a {type(self.model).__name__}")
            if tuple(self.infos[k].shape) != tuple(expected[k].shape):
                raise ExportFormatError(
                    f"{path}: tensor {k!r} has shape {list(self.infos[k].shape)}, "
                    f"the model has {list(expected[k].shape)}"
                )
        stored = set(self.plain) | {f"{p}.weight" for p in self.encoded}
        groups: dict[int, list[str]] = {}
        for k, t in expected.items():
            groups.setdefault(id(t), []).append(k)
        buffers = {n for n, _ in self.model.named_buffers()}
        for names in groups.values():  # tied parameters share one tensor: one stored name is enough
            if not any(n in stored for n in names) and not all(n in buffers for n in names):
                raise ExportFormatError(f"{path}: no tensor for {names[0]} (the model needs it)")
        self.shapes = {k: tuple(t.shape) for k, t in expected.items()}

    def _check_layout(self, prefix: str, shape: tuple[int, int]) -> None:
        rows, cols = shape
        want = {
            "ct-bitmask": {
                "bitmask": ("U8", (rows, (cols + 7) // 8)),
                "shape": ("I64", (2, 1)),
                "row_offsets": ("I64", (rows,)),
            },
            "ct-24": {
                "bitmask": ("U8", (rows, (cols + 7) // 8)),
                "shape": ("I64", (2, 1)),
                "compressed": (None, (rows, cols // 2)),
            },
            "torch-24": {"values": (None, (rows, cols // 2))},
        }[self.fmt]
        for comp in COMPANIONS[self.fmt]:
            info = self.infos.get(f"{prefix}.{comp}")
            if info is None:
                raise ExportFormatError(f"{self.path}: layer {prefix} has no {prefix}.{comp}")
            dt, sh = want.get(comp, (None, None))
            if (dt is not None and info.dtype != dt) or (sh is not None and tuple(info.shape) != sh):
                raise ExportFormatError(
                    f"{self.path}: {prefix}.{comp} is {info.dtype} {list(info.shape)}; a {rows}x{cols} layer needs "
                    f"{dt or 'any dtype'} {list(sh)}"
                )
        if self.fmt == "torch-24":
            v = self.infos[f"{prefix}.values"]
            per = 32 if v.dtype == "I8" else 16
            m = self.infos[f"{prefix}.meta"]
            if m.dtype != ("I32" if v.dtype == "I8" else "I16") or tuple(m.shape) != (rows, cols // per):
                raise ExportFormatError(f"{self.path}: {prefix}.meta is {m.dtype} {list(m.shape)}, which does not fit")
        elif self.fmt == "ct-bitmask" and len(self.infos[f"{prefix}.compressed"].shape) != 1:
            raise ExportFormatError(f"{self.path}: {prefix}.compressed must be 1-D")

    def dense_bytes(self, dtype: torch.dtype | None) -> int:
        """Bytes of the decoded weights (floating-point ones in ``dtype`` when given)."""
        floats = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}

        def size(info) -> float:
            if dtype is not None and info.dtype in floats:
                return dtype.itemsize
            return _untrusted.ST_DTYPE_BITS[info.dtype] / 8

        total = sum(self.infos[k].numel * size(self.infos[k]) for k in self.plain)
        lead = COMPANIONS.get(self.fmt, ("",))[0]
        for prefix in self.encoded:
            total += math.prod(self.shapes[f"{prefix}.weight"]) * size(self.infos[f"{prefix}.{lead}"])
        return int(total)

    def tensors(self):
        """(name, tensor) of every stored weight as the model will hold it, decoded and checked one at a time."""
        from safetensors import safe_open

        with safe_open(str(self.path / WEIGHTS), framework="pt") as f:
            for k in self.plain:
                yield k, f.get_tensor(k)
            for prefix in self.encoded:
                yield f"{prefix}.weight", _decode(self.fmt, prefix, f, self.shapes[f"{prefix}.weight"])


def _read_export(path):
    """Every stored weight of an export folder as ``load_sparse`` reads it."""
    yield from _Export(path).tensors()


def load_sparse(path, *, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load any export of this module into a normal transformers model (eval mode).

    The folder is checked before anything is decoded (see the module docstring); a damaged or
    inconsistent folder raises ``ValueError`` naming the tensor. torch-24 Linears run on PyTorch's
    semi-structured sparse kernels on CUDA; on CPU they are loaded dense, with a warning.
    """
    ex = _Export(path)
    need = ex.dense_bytes(dtype)
    available = _available_memory()
    if need > available:
        raise MemoryError(
            f"{path} decodes to {need / 2**30:.2f} GiB of weights and {available / 2**30:.2f} GiB of memory is "
            "available; nothing was loaded"
        )
    model, sparse, fmt = ex.model, ex.sparse, ex.fmt
    state = {}
    for k, t in ex.tensors():
        state[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise ValueError(f"{path} does not match its config: missing {still_meta[:3]}, unexpected {unexpected[:3]}")
    model.to(device).eval()
    if fmt == "torch-24":
        if torch.device(device).type == "cuda":
            from torch.sparse import to_sparse_semi_structured

            for name in sparse["layers"]:
                lin = model.get_submodule(name)
                lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.data), requires_grad=False)
        else:
            warnings.warn(
                "torch-24 checkpoint loaded dense: semi-structured sparse kernels need a CUDA device", stacklevel=2
            )
    return model


def _available_memory() -> int:
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:  # psutil is a dependency; /proc/meminfo where it is missing
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 1 << 62
