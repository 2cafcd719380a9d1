"""Discovery of the repeated transformer blocks and their prunable Linear layers.

The prunable set is every 2-D ``nn.Linear`` weight inside the repeated blocks; embeddings,
``lm_head``, norms, biases, patch embeddings and projection heads stay dense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

# (attribute path of the block list, family), in forward order for multi-tower models.
KNOWN_LAYOUTS = [
    ("model.layers", "llama"),  # LLaMA, Mistral, Qwen2, Gemma, Phi-3 and other GQA decoders
    ("model.decoder.layers", "opt"),
    ("vision_model.encoder.layers", "clip-vision"),
    ("text_model.encoder.layers", "clip-text"),
]


@dataclass
class Tower:
    path: str
    family: str
    blocks: nn.ModuleList


def _get(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_towers(model: nn.Module) -> list[Tower]:
    """The model's block lists in forward order; ValueError naming what was looked for if none."""
    towers = []
    for path, family in KNOWN_LAYOUTS:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) and linears(blocks[0]):
            towers.append(Tower(path, family, blocks))
    if not towers:
        looked = ", ".join(p for p, _ in KNOWN_LAYOUTS)
        raise ValueError(
            f"no repeated transformer blocks found in {type(model).__name__}: looked for {looked} "
            "(supported: LLaMA-family decoders, OPT, CLIP)"
        )
    return towers


def linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The prunable Linear layers of one block, by name relative to the block."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and m.weight.dim() == 2}


def prunable(model: nn.Module) -> dict[str, nn.Linear]:
    """Every prunable Linear of the model, by full module name."""
    out = {}
    for tower in find_towers(model):
        for i, block in enumerate(tower.blocks):
            for name, lin in linears(block).items():
                out[f"{tower.path}.{i}.{name}"] = lin
    return out


def block_of(name: str) -> str:
    """'<tower path>.<block index>' of a prunable layer's full name (the block group key)."""
    m = re.match(r"(.*?\.\d+)\.", name)
    return m.group(1) if m else name
