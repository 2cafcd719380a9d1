"""Writes a run's output folder atomically: report.json, the allocation plot, optionally the model."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from ._fs import staged_folder


def block_sparsity(
    layer_sparsity: dict[str, float], numels: dict[str, int] | None = None, blocks: dict[str, str] | None = None
) -> dict[str, float]:
    """Mean sparsity of each block ('<stack path>.<index>'), weighted by matrix size when known."""
    acc = defaultdict(lambda: [0.0, 0])
    for name, s in layer_sparsity.items():
        key = (blocks or {}).get(name) or re.match(r"(.*?\.\d+)(\.|\[|$)", name).group(1)
        w = (numels or {}).get(name, 1)
        acc[key][0] += s * w
        acc[key][1] += w
    return {k: v[0] / v[1] for k, v in acc.items()}


def plot_allocation(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_block = block_sparsity(report["layer_sparsity"], report.get("layer_numel"), report.get("layer_block"))
    names = list(per_block)
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(names) + 2), 3.6))
    towers = report.get("towers") or {}
    if len(towers) > 1:  # one colour per tower, its achieved sparsity in the legend
        palette = ["#4C72B0", "#55A868", "#8172B2", "#CCB974", "#64B5CD", "#8C8C8C"]
        tower_of = {n: t for n in names for t, v in towers.items() if n.startswith(v["path"] + ".")}
        for k, (t, v) in enumerate(towers.items()):
            idx = [i for i, n in enumerate(names) if tower_of.get(n) == t]
            label = f"{t} {v['achieved_sparsity']:.3f}" + ("" if v.get("pruned", True) else " (not selected)")
            ax.bar(idx, [per_block[names[i]] for i in idx], color=palette[k % len(palette)], label=label)
    else:
        ax.bar(range(len(names)), [per_block[n] for n in names], color="#4C72B0")
    ax.axhline(
        report["target_sparsity"], color="#C44E52", ls="--", lw=1, label=f"target {report['target_sparsity']:.2f}"
    )
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.rsplit(".", 1)[-1] for n in names], fontsize=7)
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, min(1.0, max(per_block.values()) * 1.15 + 0.05))
    title = (
        f"{report.get('model', '')}: {report['allocator']} + {report['pruner']} ({report['pattern']}), "
        f"achieved {report['achieved_sparsity']:.3f}"
    )
    if report.get("ppl_pruned") is not None:
        title += f"\nperplexity {report['ppl_dense']:.2f} dense -> {report['ppl_pruned']:.2f} pruned"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_output(out: Path, report: dict, *, force: bool, model=None, tokenizer=None, extra=None) -> Path:
    """Stage everything in a temporary folder beside ``out``, then rename it into place."""
    with staged_folder(out, force) as tmp:
        if extra is not None:  # e.g. exports, written into the staged folder (they may add to the report)
            extra(tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False))
        plot_allocation(report, tmp / "sparsity.png")
        if model is not None:
            model.save_pretrained(tmp / "model", safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "model")
    return out
