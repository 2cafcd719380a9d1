"""The checks of a command-line run that need no weights, made before its first expensive step
(loading the model counts as one).

In order: the numbers (positive, below caps that catch typos such as ``--nsamples 100000``), the
output (``_fs.check_destination`` with every input of the run protected, and a probe that the
folder can be written), the sparsity map (a JSON object whose ``sparsity_map`` maps names to
numbers in [0, 1)), the model folder (``config.json`` and every safetensors header, read without
running or unpickling anything; see ``_untrusted``), the sequence lengths against the context the
config declares, the map's names against the model's prunable matrices (from a model built on the
meta device), the memory the run needs against what is available and the disk space the outputs
need against what is free. Every failure is one ``ValueError``/``OSError``/``MemoryError`` whose
message says what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from . import _fs, _untrusted

# upper bounds of the count options: far beyond any sensible run, low enough to catch a typo
CAPS = {
    "nsamples": 1 << 16,
    "stage1_nsamples": 1 << 16,
    "depth_nsamples": 1 << 16,
    "batch_size": 1 << 16,
    "seqlen": 1 << 20,
    "stage1_seqlen": 1 << 20,
    "eval_seqlen": 1 << 20,
    "eval_windows": 1 << 20,
}
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx", "seq_length", "max_seq_len")
MAX_MAP_BYTES = 64 * 2**20
PROCESS_BASE = 1 << 28  # tokenizer buffers and window tensors besides the estimate's terms


@dataclass
class ModelFacts:
    """What the files of a model argument say, read without loading weights."""

    path: Path | None  # None: not on disk yet (a packaged model converted on first use)
    config: dict = field(default_factory=dict)
    export_format: str | None = None
    weight_bytes: int | None = None  # as stored
    tensors: dict = field(default_factory=dict)

    @property
    def is_folder(self) -> bool:
        return self.path is not None and self.path.is_dir()

    def context(self) -> tuple[int, str] | None:
        if "text_config" in self.config or "vision_config" in self.config:
            return None  # image-text models calibrate on their own captions, not on --seqlen windows
        if "relative_attention_num_buckets" in self.config:
            return None  # T5-style relative positions: n_positions there is no limit
        for key in CONTEXT_KEYS:
            v = self.config.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v, key
        return None

    def dim(self, *keys, default=None):
        cfg = self.config.get("text_config", self.config)
        for k in keys:
            v = cfg.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return default


def check_numbers(a) -> None:
    for name, cap in CAPS.items():
        v = getattr(a, name, None)
        if v is None:
            continue
        flag = "--" + name.replace("_", "-")
        if v < 1:
            raise ValueError(f"{flag} must be at least 1, got {v}")
        if v > cap:
            raise ValueError(f"{flag} {v} is beyond the {cap} this engine accepts")


def model_path(model: str) -> Path | None:
    """The path a model argument reads, without converting anything (None: not on disk yet)."""
    from . import models

    if model == "default":
        folder = models.cache_dir() / "models" / models.DEFAULT_NAME
        return folder if (folder / "config.json").is_file() else None
    if model in getattr(models, "SPLIT_GGUF", {}):
        folder = models.cache_dir() / "models" / models.SPLIT_GGUF[model][3]
        return folder if (folder / "config.json").is_file() else None
    return models.resolve(model)


def model_facts(model: str, trust_remote_code: bool) -> ModelFacts:
    path = model_path(model)
    if path is None or not path.is_dir():
        return ModelFacts(path)
    try:
        config = _untrusted.read_json(path / "config.json", "config.json")
    except ValueError as e:
        raise ValueError(f"{path}/config.json could not be read: {e}") from None
    _untrusted.check_remote_code(path, config, trust_remote_code)
    fmt = _untrusted.ecoflap_export_format(config)
    if fmt is not None:
        from .export import _Export

        ex = _Export(path)
        return ModelFacts(path, config, fmt, ex.dense_bytes(None), ex.infos)
    tensors = _untrusted.safetensors_folder(path)
    stored = sum(math.ceil(t.numel * _untrusted.ST_DTYPE_BITS[t.dtype] / 8) for t in tensors.values())
    return ModelFacts(path, config, None, stored, tensors)


def inputs_of(a) -> list[Path]:
    """Every path a run reads: the model (folder or file), text files, the sparsity map."""
    paths = []
    try:
        paths.append(model_path(a.model))
    except (FileNotFoundError, ValueError):
        pass
    for name in ("calib_text", "eval_text"):
        paths += [Path(p) for p in (getattr(a, name, None) or [])]
    for name in ("calib_images", "calib_jsonl"):
        if getattr(a, name, None) is not None:
            paths.append(Path(getattr(a, name)))
    if getattr(a, "sparsity_map", None) is not None:
        paths.append(Path(a.sparsity_map))
    return [p.expanduser() for p in paths if p is not None]


def check_text_files(a) -> None:
    for name in ("calib_text", "eval_text"):
        for p in getattr(a, name, None) or []:
            if not Path(p).is_file():
                raise FileNotFoundError(f"text file {str(p)!r} does not exist")
    images, jsonl = getattr(a, "calib_images", None), getattr(a, "calib_jsonl", None)
    if images is not None and not Path(images).expanduser().is_dir():
        raise FileNotFoundError(f"calibration image folder {str(images)!r} does not exist")
    if jsonl is not None and not Path(jsonl).expanduser().is_file():
        raise FileNotFoundError(f"calibration file {str(jsonl)!r} does not exist")


def read_sparsity_map(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sparsity map {str(path)!r} does not exist")
    rep = _untrusted.read_json(path, "sparsity map", MAX_MAP_BYTES)
    smap = rep.get("sparsity_map")
    if smap is None:
        raise ValueError(f"{path} has no 'sparsity_map' entry (use a report.json of an earlier run)")
    if not isinstance(smap, dict) or not smap:
        raise ValueError(f"{path}: 'sparsity_map' must map matrix names to sparsities, got {type(smap).__name__}")
    for k, v in smap.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"{path}: sparsity map entry {k!r} = {v!r} is not a number in [0, 1)")
    return smap


def check_seqlens(facts: ModelFacts, lengths: dict[str, int]) -> None:
    ctx = facts.context()
    if ctx is None:
        return
    limit, key = ctx
    for flag, n in lengths.items():
        if n > limit:
            raise ValueError(
                f"{flag} {n} is beyond the model's context of {limit} positions ({key} in config.json); "
                f"use at most {limit}"
            )


def matrix_names(facts: ModelFacts) -> list[str] | None:
    """The prunable matrices of the model, from a copy built on the meta device (None: unknown)."""
    if not facts.is_folder:
        return None
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        from . import models, walk

        raw = {k: v for k, v in facts.config.items() if k not in ("quantization_config", "ecoflap_sparse")}
        config = AutoConfig.for_model(**raw)
        with init_empty_weights():
            model = models.model_class(config)._from_config(config)
        return list(walk.structure(model).matrices())
    except Exception:  # the plan after loading gives the exact refusal
        return None


def check_map_names(facts: ModelFacts, smap: dict, source: Path) -> None:
    names = matrix_names(facts)
    if names is None:
        return
    unknown = [k for k in smap if k not in set(names)]
    if unknown:
        raise ValueError(
            f"sparsity map {str(source)!r} names {len(unknown)} matrices this model does not have, first "
            f"{unknown[0]!r} (a map of another model?)"
        )
    missing = [n for n in names if n not in smap]
    if missing:
        raise ValueError(f"sparsity map has no entry for {len(missing)} matrices, first {missing[0]!r}")


def _gib(n: float) -> str:
    return _fs._size(n)


def check_memory(facts: ModelFacts, parts: dict[str, float], device: str, what: str) -> None:
    """Refuse when the estimate's parts add up to more than the memory available for ``device``."""
    from .stream import available_memory

    need = sum(parts.values())
    available = available_memory(device)
    if need > available:
        shown = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items() if v >= 1 << 20)
        raise MemoryError(
            f"{what} needs about {_gib(need)} of memory ({shown}) and {_gib(available)} is available; "
            "lower --nsamples / --seqlen / --batch-size, or pass --no-memory-check to try anyway"
        )


def _itemsize(dtype_name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype_name, 4)


def prune_estimate(facts: ModelFacts, a, compute_dtype, dtype_name: str) -> dict[str, float] | None:
    """Bytes of an in-memory prune run by part. None where this check does not apply: the model is
    not on disk yet, or the run will stream (``--stream``, or weights over 40% of the available
    memory), where the streaming decision checks the streamed peak itself."""
    if not facts.is_folder:
        return None
    from .stream import available_memory, estimate

    size = _itemsize(dtype_name)
    vocab = facts.dim("vocab_size", default=32000)
    if facts.export_format is None:
        est = estimate(facts.path, compute_dtype, a.nsamples, a.seqlen, a.batch_size)
    else:  # an export: the dense model it decodes to
        hidden = facts.dim("hidden_size", "n_embd", "d_model", default=4096)
        inter = facts.dim("intermediate_size", "n_inner", "d_ff", default=4 * hidden)
        est = {
            "weights": facts.weight_bytes * size / 2,
            "activations": 2 * a.nsamples * a.seqlen * hidden * 4 + 4 * a.batch_size * a.seqlen * inter * 4,
        }
        est["peak_in_memory"] = est["weights"] + est["activations"]
        est["peak_streamed"] = est["peak_in_memory"]
    choice = getattr(a, "stream", None)  # True: --stream, False: --no-stream (in memory, so checked), None: auto
    streamed = choice or (choice is None and est["weights"] > 0.4 * available_memory(a.device or "cpu"))
    if streamed and facts.export_format is None:
        return None
    parts = {"weights": est["weights"], f"{a.nsamples}x{a.seqlen} calibration activations": est["activations"]}
    heads = [4 * a.stage1_seqlen * vocab * 4 * 3 if a.allocator.startswith("ecoflap") else 0]
    if getattr(a, "eval", False):
        heads.append(4 * a.eval_seqlen * vocab * 4 * 2)
    parts["logits"] = max(heads)
    parts["tokenizer and data"] = PROCESS_BASE
    return parts


def output_bytes(facts: ModelFacts, a, export_formats, save: bool, export_dtype: str | None) -> int:
    """Bytes the outputs take on disk, at most (the dense weights per saved copy)."""
    if facts.weight_bytes is None:
        return 0
    n = (1 if save else 0) + len(export_formats or [])
    per = facts.weight_bytes * (_itemsize(export_dtype) / 2 if export_dtype else 1)
    return int(n * per) + (1 << 20)
