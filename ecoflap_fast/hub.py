"""Model ids (``org/name``) resolved from the local Hugging Face cache, never from the network.

The cache is where huggingface_hub keeps it (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else
~/.cache/huggingface/hub); the snapshot of the ``main`` revision (or ``org/name@revision``) must
hold a config.json. Nothing is downloaded, whatever HF_HUB_OFFLINE says.
"""

from __future__ import annotations

import re
from pathlib import Path

_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def looks_like_id(text: str) -> bool:
    """An ``org/name`` (optionally ``@revision``) that is not a path on disk."""
    return bool(_ID.match(text)) and not Path(text).expanduser().exists() and not text.startswith((".", "/", "~"))


def cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_id(model_id: str) -> Path:
    """The cached snapshot folder of ``model_id``; FileNotFoundError naming the id and where it looked."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, _, revision = model_id.partition("@")
    root = cache_root()
    try:
        path = Path(snapshot_download(repo, revision=revision or None, local_files_only=True, cache_dir=root))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        path = None
    if path is None or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model id {model_id!r} is not in the local Hugging Face cache (looked in {root}; set HF_HUB_CACHE or "
            "HF_HOME to another cache, or give a local folder)"
        )
    return path
