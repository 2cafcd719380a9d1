"""Checks on files that come from elsewhere (a downloaded model folder, an export, a sparsity map),
made before anything in them is loaded, allocated or run.

- JSON files are read with a size cap and must hold an object;
- a folder whose ``config.json`` names its own Python code (``auto_map``) for a model type
  transformers does not know is refused unless the caller passes ``trust_remote_code=True``
  (transformers itself is always called with an explicit ``trust_remote_code``, so it never asks);
- weights must be safetensors: pickled weights (``pytorch_model.bin`` ...) are never unpickled;
- every safetensors header is validated against its file before a tensor is read: the 8-byte
  header length, the JSON header, known dtypes, non-negative integer shapes, and data offsets that
  match shape × dtype size and tile the data section exactly up to the end of the file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit
MAX_JSON_BYTES = 64 * 2**20
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt", "tf_model.h5")

# bits per element of every dtype the safetensors format defines
ST_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


class UntrustedFileError(ValueError):
    """A file from elsewhere that is malformed, inconsistent or asks for something not allowed."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_json(path: Path, what: str = "file", max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from ``path``, refused (one clear line) when too large, malformed or not an object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    size = path.stat().st_size
    if size > max_bytes:
        raise UntrustedFileError(f"{what} {str(path)!r} is {size} bytes; more than the {max_bytes} accepted")
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UntrustedFileError(f"{what} {str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UntrustedFileError(f"{what} {str(path)!r} holds a JSON {type(value).__name__}, not an object")
    return value


def safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, after checking the header against the file."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UntrustedFileError(f"{path}: {size} bytes, not a safetensors file (no 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise UntrustedFileError(
                f"{path}: the header claims {n} bytes; the file has {size} (and headers are at most "
                f"{MAX_HEADER_BYTES}): damaged or not a safetensors file"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UntrustedFileError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise UntrustedFileError(f"{path}: the header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise UntrustedFileError(f"{path}: __metadata__ must map strings to strings")
    data_bytes = size - 8 - n
    spans, out = [], {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise UntrustedFileError(f"{path}: tensor {name!r} has a malformed header entry")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in ST_DTYPE_BITS:
            raise UntrustedFileError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise UntrustedFileError(f"{path}: tensor {name!r} has shape {shape!r}, not a list of integers >= 0")
        if (
            not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets))
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise UntrustedFileError(f"{path}: tensor {name!r} has data offsets {offsets!r}")
        want = math.ceil(math.prod(shape) * ST_DTYPE_BITS[dtype] / 8)
        if offsets[1] - offsets[0] != want:
            raise UntrustedFileError(
                f"{path}: tensor {name!r} ({dtype} {shape}) needs {want} bytes; "
                f"its offsets give {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))
        out[name] = TensorInfo(dtype, tuple(shape), path.name)
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise UntrustedFileError(
                f"{path}: tensor {name!r} starts at byte {begin} of the data; {end} expected (overlap or gap)"
            )
        end = stop
    if end != data_bytes:
        raise UntrustedFileError(
            f"{path}: the tensors cover {end} bytes of data; the file holds {data_bytes} (truncated or padded)"
        )
    return out


def safetensors_folder(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a folder's safetensors checkpoint (one file or shards with an index), each
    header validated; pickled weights are refused, never read."""
    folder = Path(folder)
    if (folder / SAFETENSORS_INDEX).is_file():
        index = read_json(folder / SAFETENSORS_INDEX, "checkpoint index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UntrustedFileError(f"{folder / SAFETENSORS_INDEX}: 'weight_map' must map tensor names to files")
        files = sorted(set(weight_map.values()))
        for f in files:
            if Path(f).name != f or not f.endswith(".safetensors"):
                raise UntrustedFileError(f"{folder / SAFETENSORS_INDEX}: shard {f!r} is not a .safetensors file here")
    elif (folder / SAFETENSORS_SINGLE).is_file():
        files, weight_map = [SAFETENSORS_SINGLE], None
    else:
        pickled = [p for p in PICKLED_WEIGHTS if (folder / p).exists()] + sorted(
            p.name for p in folder.glob("pytorch_model-*.bin")
        )
        if pickled:
            raise UntrustedFileError(
                f"{folder} holds its weights as {pickled[0]}, a pickle: ecoflap-fast never unpickles files "
                "(a pickle can run code); convert the folder to safetensors where you trust it"
            )
        raise FileNotFoundError(f"{folder} holds no safetensors weights ({SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX})")
    out: dict[str, TensorInfo] = {}
    for f in files:
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder}: shard {f} named by the index is missing")
        for name, info in safetensors_header(folder / f).items():
            if name in out:
                raise UntrustedFileError(f"{folder}: tensor {name!r} is stored twice ({out[name].file} and {f})")
            out[name] = info
    if weight_map is not None:
        for name, f in weight_map.items():
            if name not in out or out[name].file != f:
                raise UntrustedFileError(f"{folder / SAFETENSORS_INDEX}: {name!r} is not in {f} as the index says")
    return out


def check_remote_code(folder: Path, config: dict, trust_remote_code: bool) -> None:
    """Refuse a folder that needs its own Python code (``auto_map`` for a model type transformers
    does not ship), unless ``trust_remote_code``. A known model type with an ``auto_map`` loads with
    transformers' own classes: the folder's code is never imported."""
    if trust_remote_code:
        return
    auto_map = config.get("auto_map")
    if not auto_map:
        return
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    names = ", ".join(sorted(map(str, auto_map.values() if isinstance(auto_map, dict) else auto_map)))[:200]
    raise UntrustedFileError(
        f"{folder}/config.json asks to run the folder's own Python code ({names}) for model type "
        f"{model_type!r}; ecoflap-fast runs no code from a model folder unless you pass --trust-remote-code "
        "(trust_remote_code=True) after reading that code"
    )


def ecoflap_export_format(config: dict) -> str | None:
    """The export format of a config.json written by ``export_`` ("hf-dense", "ct-bitmask", "ct-24",
    "torch-24"), None for a plain checkpoint; a compressed-tensors checkpoint of another kind (e.g.
    quantized) is refused with what to do."""
    if "ecoflap_sparse" in config:
        fmt = (config["ecoflap_sparse"] or {}).get("format")
        if fmt != "torch-24":
            raise UntrustedFileError(f"config.json: ecoflap_sparse format {fmt!r} is unknown (torch-24 expected)")
        return fmt
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return None
    ours = {"dense": "hf-dense", "sparse-bitmask": "ct-bitmask", "sparse-24-bitmask": "ct-24"}
    sc = qc.get("sparsity_config") or {}
    fmt = qc.get("format") or sc.get("format")
    if qc.get("config_groups") or fmt not in ours:
        raise UntrustedFileError(
            f"config.json describes a compressed-tensors checkpoint (format {fmt!r}"
            + (", quantized" if qc.get("config_groups") else "")
            + ") that ecoflap-fast cannot read; decompress it with compressed-tensors / llm-compressor first"
        )
    return ours[fmt]


def file_size_ok(path: Path, max_bytes: int, what: str) -> None:
    size = os.stat(path).st_size
    if size > max_bytes:
        raise UntrustedFileError(f"{what} {str(path)!r} is {size} bytes; more than the {max_bytes} accepted")
