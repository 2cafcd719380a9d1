"""Sparse checkpoint exports (SPEC §6) and their loader.

Formats:
  hf-dense    safetensors with zeros + compressed-tensors metadata (format "dense") in config.json
  ct-bitmask  compressed-tensors "sparse-bitmask": P.compressed (1-D), P.bitmask, P.shape, P.row_offsets
  ct-24       compressed-tensors "sparse-24-bitmask": P.compressed [out, in/2], P.bitmask, P.shape
  torch-24    P.values + P.meta in PyTorch's CUTLASS 2:4 layout (ops.pack_24_cutlass)

Safety: everything is validated before anything is written (a non-2:4 layer asked to go into a 2:4
format is named, never re-pruned); the checkpoint is written to a temporary folder beside the
destination, re-read and compared bit-exactly with the in-memory weights, and only then renamed into
place; an existing destination is refused unless ``force``; the model and its source are only read.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from . import ops, walk
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


def _decode(fmt: str, prefix: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if fmt == "torch-24":
        return ops.unpack_24_cutlass(tensors[f"{prefix}.values"], tensors[f"{prefix}.meta"])
    shape = tensors[f"{prefix}.shape"].flatten().tolist()
    return ops.unpack_bitmask(tensors[f"{prefix}.compressed"], tensors[f"{prefix}.bitmask"], shape)


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
    from safetensors.torch import load_file, save_file

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
        # re-read and compare exactly before the destination appears (values: a -0.0 that the
        # bitmask layouts do not store reads back as +0.0)
        back = load_file(str(tmp / WEIGHTS))
        for name, t in state.items():
            encoded = name in layer_keys and fmt != "hf-dense"
            got = _decode(fmt, name[: -len(".weight")], back) if encoded else back[name]
            if got.dtype != t.dtype or not torch.equal(got, t):
                raise RuntimeError(f"export verification failed for {name}: the written tensor differs")
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


def load_sparse(path, *, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load any export of this module into a normal transformers model (eval mode).

    torch-24 Linears run on PyTorch's semi-structured sparse kernels on CUDA; on CPU they are
    loaded dense, with a warning.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{str(path)!r} is not an ecoflap_fast export (config.json and {WEIGHTS} expected)")
    raw = json.loads((path / "config.json").read_text())
    qc = raw.pop("quantization_config", None)
    sparse = raw.pop("ecoflap_sparse", None)
    fmt = "torch-24" if sparse else {v: k for k, v in _CT_FORMAT.items()}.get((qc or {}).get("format"), "hf-dense")
    config = AutoConfig.for_model(**raw)
    with init_empty_weights():
        if config.model_type == "clip":
            from transformers import CLIPModel

            model = CLIPModel(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    tensors = load_file(str(path / WEIGHTS))
    state = {}
    prefixes = {k.rsplit(".", 1)[0] for k in tensors if k.endswith((".compressed", ".values"))}
    for k, t in tensors.items():
        prefix = k.rsplit(".", 1)[0]
        if prefix in prefixes:
            if f"{prefix}.weight" not in state:
                state[f"{prefix}.weight"] = _decode(fmt, prefix, tensors)
        else:
            state[k] = t
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
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
