"""End-to-end pruning pipelines on one model with one set of calibration windows.

(a) this engine, uniform Wanda; (b) llm-compressor's ``WandaPruningModifier`` through its own
``oneshot``, and (b') the same with this engine as its backend (``integrations.llmcompressor``);
(c) ECoFLaP-zo, this engine's fast path against its reference path. Each run starts from a fresh
load of the model (not timed; see ``_load``). Wall time is split into the activation statistic, the mask selection
and the rest (calibration forwards and the framework around them) by timing the functions that do
the first two.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import torch

from .. import ops
from .harness import Results

PATTERNS = ("unstructured", "2:4")
PARTS = ("statistics", "selection")


@contextlib.contextmanager
def timed(owner, name: str, totals: dict, key: str, sync: bool):
    """Replace ``owner.name`` by a wrapper adding its wall time to ``totals[key]`` (restored after)."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            if sync:
                torch.cuda.synchronize()
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - t

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, inner)


def _load(model_dir: Path, device: str):
    """A fresh model whose weights own their memory. Loaded from safetensors, CPU weights are pages of
    a private file mapping, and the first write to each page costs a copy-on-write fault (about 15 us
    per 4 KiB page here: ~12 ms for a 1536x576 fp32 weight, four times what pruning it takes). Every
    pipeline pays it wherever it first writes a weight; copying here, untimed, keeps it out of all of
    them so the split into parts is the work itself."""
    from ..models import load_model

    model, tok = load_model(str(model_dir), device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model, tok


def _prunable_state(model) -> dict[str, torch.Tensor]:
    from .. import walk

    return {name: m.weight().detach().to("cpu", copy=True) for name, m in walk.structure(model).matrices().items()}


def _elapsed(fn, sync: bool) -> float:
    if sync:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def ours_wanda(model_dir: Path, windows: torch.Tensor, pattern: str, sparsity: float, batch_size: int, device: str):
    from ..prune import PruneConfig, prune_

    model, _ = _load(model_dir, device)
    config = PruneConfig(
        sparsity=sparsity,
        pattern=pattern,
        allocator="uniform",
        pruner="wanda",
        nsamples=windows.shape[0],
        seqlen=windows.shape[1],
        batch_size=batch_size,
        progress=False,
    )
    parts: dict[str, float] = {}
    sync = device.startswith("cuda")
    with (
        timed(ops, "wanda_prune_", parts, "selection", sync),
        timed(ops.ActNormAccumulator, "add", parts, "statistics", sync),
    ):
        total = _elapsed(lambda: prune_(model, windows, config), sync)
    return _prunable_state(model), total, parts


def llmcompressor_available() -> str | None:
    """None when llm-compressor can be imported, else why not."""
    try:
        import llmcompressor  # noqa: F401
        from llmcompressor.modifiers.pruning import WandaPruningModifier  # noqa: F401
    except Exception as e:  # any import-time failure means: not usable here
        return f"{type(e).__name__}: {e}"
    return None


def llmcompressor_wanda(
    model_dir: Path,
    windows: torch.Tensor,
    pattern: str,
    sparsity: float,
    batch_size: int,
    device: str,
    with_backend: bool,
):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.wanda import base as wanda_base

    from ..integrations import llmcompressor as backend

    model, tok = _load(model_dir, device)
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    recipe = WandaPruningModifier(
        sparsity=sparsity,
        mask_structure="2:4" if pattern == "2:4" else "0:0",
        targets=["Linear"],
        ignore=["re:.*lm_head"],
    )
    parts: dict[str, float] = {}
    sync = device.startswith("cuda")
    with (
        backend.backend() if with_backend else contextlib.nullcontext(),
        timed(wanda_base, "sparsify_weight", parts, "selection", sync),
        timed(wanda_base, "accumulate_row_scalars", parts, "statistics", sync),
    ):
        total = _elapsed(
            lambda: oneshot(
                model=model,
                processor=tok,
                dataset=dataset,
                recipe=recipe,
                num_calibration_samples=windows.shape[0],
                max_seq_length=windows.shape[1],
                batch_size=batch_size,
                shuffle_calibration_samples=False,
                pipeline="sequential",
            ),
            sync,
        )
    return _prunable_state(model), total, parts


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[int, int, list[str]]:
    """(differing weights, all weights, layers that differ)."""
    if a.keys() != b.keys():
        raise ValueError(f"the pipelines pruned different layers: {sorted(set(a) ^ set(b))[:3]}")
    diff = {n: int((a[n] != b[n]).sum()) for n in a}
    return sum(diff.values()), sum(t.numel() for t in a.values()), [n for n, d in diff.items() if d]


def ecoflap(
    model_dir: Path,
    windows: torch.Tensor,
    stage1_windows: torch.Tensor,
    sparsity: float,
    batch_size: int,
    device: str,
    reference_blocks: list[int],
    seed: int = 0,
) -> dict:
    """ECoFLaP-zo end to end, fast path; and the reference path: its stage 1 (one full forward per
    perturbation) measured on ``reference_blocks`` and scaled to every tensor, its stage 2 (the
    pure-torch twins: sort per row, Wanda's statistic) measured in full with the fast run's map."""
    from .. import reference as ref
    from .. import stage1, walk
    from ..prune import PruneConfig, prune_
    from ..reference import stage1 as ref_stage1

    sync = device.startswith("cuda")
    config = PruneConfig(
        sparsity=sparsity,
        allocator="ecoflap-zo",
        nsamples=windows.shape[0],
        seqlen=windows.shape[1],
        batch_size=batch_size,
        seed=seed,
        progress=False,
    )
    model, _ = _load(model_dir, device)
    report = {}

    def fast():
        report.update(prune_(model, windows, config, stage1_calibration=stage1_windows))

    t_fast = _elapsed(fast, sync)
    fast_state = _prunable_state(model)

    model, _ = _load(model_dir, device)
    batches = list(stage1_windows.split(4))
    mats = walk.plan(model, {"input_ids": batches[0]}).matrices()
    layers = {n: m.weight() for n, m in mats.items()}
    only = {n for n, m in mats.items() if m.block.index in set(reference_blocks)}
    if not only:
        raise ValueError(f"reference blocks {reference_blocks} hold no prunable layer")
    ref_scores: dict = {}
    t_ref_part = _elapsed(
        lambda: ref_scores.update(ref_stage1.zo_tensor_scores(model, layers, batches, seed=seed, only=only)), sync
    )
    fd_scores: dict = {}
    t_fd_part = _elapsed(
        lambda: fd_scores.update(
            stage1.zo_fd_scores(model, batches, seed=seed, only=only, progress=False)
        ),
        sync,
    )
    rel_err = max(_relative_error(fd_scores[n], ref_scores[n]) for n in only)
    t_ref_stage1 = t_ref_part * len(layers) / len(only)

    ref_config = PruneConfig(**{**config.__dict__, "sparsity_map": report["sparsity_map"]})
    saved = ops.wanda_prune_, ops.ActNormAccumulator
    ops.wanda_prune_, ops.ActNormAccumulator = ref.wanda_prune_, ref.ActNormAccumulator
    try:
        t_ref_stage2 = _elapsed(lambda: prune_(model, windows, ref_config), sync)
    finally:
        ops.wanda_prune_, ops.ActNormAccumulator = saved
    return {
        "fast_s": t_fast,
        "fast_stage1_s": report["timings"]["stage1_s"],
        "fast_stage2_s": report["timings"]["stage2_s"],
        "reference_s": t_ref_stage1 + t_ref_stage2,
        "reference_stage1_s": t_ref_stage1,
        "reference_stage2_s": t_ref_stage2,
        "reference_stage1_measured_s": t_ref_part,
        "fast_fd_same_tensors_s": t_fd_part,
        "reference_tensors": len(only),
        "all_tensors": len(layers),
        "fd_max_rel_err": rel_err,
        "reference_stage2_mismatch": compare(fast_state, _prunable_state(model))[0],
    }


def _relative_error(value: float, reference: float) -> float:
    if value == reference:
        return 0.0
    return abs(value - reference) / abs(reference) if reference else float("inf")


def random_llama_1b(folder: Path, tokenizer) -> Path:
    """A LLaMA-architecture model of about 1.2B parameters (LLaMA-3.2-1B shapes), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=max(len(tokenizer), 32000),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(
    model: str = "default",
    device: str = "cpu",
    patterns=PATTERNS,
    sparsity: float = 0.5,
    nsamples: int = 32,
    seqlen: int = 256,
    batch_size: int = 8,
    reference_blocks=(29,),
    with_llmcompressor: bool = True,
    with_ecoflap: bool = True,
    seed: int = 0,
    repeat: int = 1,
    log=print,
) -> tuple[Results, list[dict]]:
    """Every pipeline; returns the results rows and one summary dict per pipeline (for the plot)."""
    from .. import data, models

    why = llmcompressor_available()
    if with_llmcompressor and why is not None:
        raise ImportError(
            f"llm-compressor cannot be imported here ({why}); run in its environment (make bench-pipeline) "
            "or pass --no-llmcompressor"
        )
    res = Results("pipeline", device)
    summary: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ecoflap-bench-") as tmp:
        if model == "random-llama-1b":
            _, default_tok = models.load_model("default")
            model_dir = random_llama_1b(Path(tmp) / "llama-1b", default_tok)
        else:
            model_dir = models.resolve(model)
        dense, tok = models.load_model(str(model_dir))
        if tok is None or isinstance(tok, tuple):
            raise ValueError(f"{model} has no tokenizer files (or is not a causal LM): no calibration windows")
        if with_ecoflap:
            from .. import walk

            present = {m.block.index for m in walk.structure(dense).matrices().values()}
            missing = sorted(set(reference_blocks) - present)
            if missing:
                raise ValueError(
                    f"reference blocks {missing} hold no prunable layer (the model has blocks 0..{max(present)})"
                )
        del dense
        calib, _ = data.split(data.wiki_articles())
        tokens = data.tokenize(tok, calib)
        windows = data.calibration_windows(tokens, nsamples, seqlen, seed)
        shape = f"{model}, {nsamples}x{seqlen} tokens, batch {batch_size}, sparsity {sparsity}"
        log(f"pipelines on {shape} ({device})")

        def record(op, provider, runs):
            """``runs``: [(total, parts)]; the run with the median total is reported, p20/p80 over all."""
            totals = sorted(t for t, _ in runs)
            total, parts = sorted(runs, key=lambda r: r[0])[(len(runs) - 1) // 2]
            lo, hi = totals[int(0.2 * (len(totals) - 1))], totals[int(round(0.8 * (len(totals) - 1)))]
            res.add(op, provider, shape, "float32", "time", "s", total, lo, hi)
            for part in PARTS:
                res.add(op, provider, shape, "float32", f"{part}_s", "s", parts.get(part, 0.0))
            rest = total - sum(parts.get(p, 0.0) for p in PARTS)
            res.add(op, provider, shape, "float32", "rest_s", "s", rest)
            summary.append({"op": op, "provider": provider, "total": total, **parts, "rest": rest})
            log(
                f"  {op:22s} {provider:27s} {total:8.2f} s  (statistics {parts.get('statistics', 0):6.2f} s, "
                f"selection {parts.get('selection', 0):6.2f} s, forwards and the rest {rest:7.2f} s; "
                f"{len(runs)} runs: {', '.join(f'{t:.1f}' for t, _ in runs)} s)"
            )
            return total

        for pattern in patterns:
            op = f"wanda {pattern}"
            runs: dict[str, list] = {}
            weights: dict[str, dict] = {}
            for _ in range(repeat):  # interleaved, so drift of the machine hits every pipeline alike
                state, t, parts = ours_wanda(model_dir, windows, pattern, sparsity, batch_size, device)
                runs.setdefault("ecoflap_fast", []).append((t, parts))
                weights["ecoflap_fast"] = state
                if not with_llmcompressor:
                    continue
                for provider, fast in (("llmcompressor", False), ("llmcompressor+ecoflap_fast", True)):
                    state, t, parts = llmcompressor_wanda(
                        model_dir, windows, pattern, sparsity, batch_size, device, with_backend=fast
                    )
                    runs.setdefault(provider, []).append((t, parts))
                    weights[provider] = state
            t_ours = record(op, "ecoflap_fast", runs["ecoflap_fast"])
            if not with_llmcompressor:
                continue
            t_theirs = record(op, "llmcompressor", runs["llmcompressor"])
            t_both = record(op, "llmcompressor+ecoflap_fast", runs["llmcompressor+ecoflap_fast"])
            ours, theirs, both = (weights[k] for k in ("ecoflap_fast", "llmcompressor", "llmcompressor+ecoflap_fast"))
            res.add(op, "speedup_vs_llmcompressor", shape, "float32", "speedup", "x", t_theirs / t_ours)
            res.add(op, "backend_speedup_in_llmcompressor", shape, "float32", "speedup", "x", t_theirs / t_both)
            n_ab, total, layers_ab = compare(ours, theirs)
            n_bb, _, layers_bb = compare(theirs, both)
            res.add(op, "ecoflap_fast_vs_llmcompressor", shape, "float32", "differing_weights", "count", n_ab)
            res.add(op, "backend_vs_llmcompressor", shape, "float32", "differing_weights", "count", n_bb)
            log(
                f"  {op}: ours / llm-compressor time ratio {t_ours / t_theirs:.3f} ({t_theirs / t_ours:.2f}x faster); "
                f"as llm-compressor's backend {t_theirs / t_both:.2f}x"
            )
            first = [n for n in ours if ".layers.0." in n]
            block0 = sum(int((ours[n] != theirs[n]).sum()) for n in first)
            res.add(op, "ecoflap_fast_vs_llmcompressor_block0", shape, "float32", "differing_weights", "count", block0)
            log(
                f"  {op}: weights differing, ours vs llm-compressor: {n_ab} of {total}"
                + (f" (in {len(layers_ab)} layers, first {layers_ab[0]})" if layers_ab else " (identical)")
                + f"; llm-compressor with vs without the backend: {n_bb}"
                + (f" (first {layers_bb[0]})" if layers_bb else " (identical)")
            )
            log(
                f"  {op}: block 0, ours vs llm-compressor: {block0} differing weights. The two frameworks' forward"
                " passes differ in the last bits (llm-compressor runs each decoder layer as a torch.fx-traced"
                " graph with a materialised float mask), which flips near-tied scores downstream; given"
                " llm-compressor's own forwards (as its backend) the engine selects identical weights."
            )
        if with_ecoflap:
            stage1_windows = data.calibration_windows(tokens, 8, 128, seed + 1)
            e = ecoflap(model_dir, windows, stage1_windows, sparsity, batch_size, device, list(reference_blocks), seed)
            op = "ecoflap-zo"
            res.add(op, "ecoflap_fast", shape, "float32", "time", "s", e["fast_s"])
            res.add(op, "ecoflap_fast", shape, "float32", "stage1_s", "s", e["fast_stage1_s"])
            res.add(op, "ecoflap_fast", shape, "float32", "stage2_s", "s", e["fast_stage2_s"])
            res.add(op, "reference", shape, "float32", "time", "s", e["reference_s"])
            res.add(op, "reference", shape, "float32", "stage1_s", "s", e["reference_stage1_s"])
            res.add(op, "reference", shape, "float32", "stage2_s", "s", e["reference_stage2_s"])
            res.add(op, "reference", shape, "float32", "stage1_measured_s", "s", e["reference_stage1_measured_s"])
            res.add(op, "speedup_vs_reference", shape, "float32", "speedup", "x", e["reference_s"] / e["fast_s"])
            res.add(op, "fd_vs_reference", shape, "float32", "rel_err_max", "ratio", e["fd_max_rel_err"])
            res.add(op, "reference_stage2_vs_fast", shape, "float32", "differing_weights", "count",
                    e["reference_stage2_mismatch"])  # fmt: skip
            summary.append({"op": op, "provider": "ecoflap_fast", "total": e["fast_s"],
                            "stage 1": e["fast_stage1_s"], "stage 2": e["fast_stage2_s"]})  # fmt: skip
            summary.append({"op": op, "provider": "reference", "total": e["reference_s"],
                            "stage 1": e["reference_stage1_s"], "stage 2": e["reference_stage2_s"]})  # fmt: skip
            log(
                f"  ecoflap-zo fast {e['fast_s']:.1f} s (stage 1 {e['fast_stage1_s']:.1f} s, stage 2 "
                f"{e['fast_stage2_s']:.1f} s); reference {e['reference_s']:.1f} s (stage 1 "
                f"{e['reference_stage1_s']:.1f} s = {e['reference_stage1_measured_s']:.1f} s measured on "
                f"{e['reference_tensors']} of {e['all_tensors']} tensors, scaled; stage 2 "
                f"{e['reference_stage2_s']:.1f} s measured): {e['reference_s'] / e['fast_s']:.1f}x"
            )
            log(
                f"  ecoflap-zo: fast fd on the same {e['reference_tensors']} tensors "
                f"{e['fast_fd_same_tensors_s']:.1f} s, max relative error {100 * e['fd_max_rel_err']:.2f}%; "
                f"reference stage 2 vs fast: {e['reference_stage2_mismatch']} differing weights"
            )
    return res, summary


def summary_from_rows(rows: list[dict]) -> list[dict]:
    """The plot's input, rebuilt from one run's results rows (benchmarks/report.py redraws with it)."""
    get = {(r["op"], r["provider"], r["metric"]): float(r["median"]) for r in rows}
    out = []
    for op in dict.fromkeys(r["op"] for r in rows):
        for provider in dict.fromkeys(r["provider"] for r in rows if r["op"] == op):
            total = get.get((op, provider, "time"))
            if total is None:
                continue
            entry = {"op": op, "provider": provider, "total": total}
            for metric, key in [("statistics_s", "statistics"), ("selection_s", "selection"), ("rest_s", "rest"),
                                ("stage1_s", "stage 1"), ("stage2_s", "stage 2")]:  # fmt: skip
                if (op, provider, metric) in get:
                    entry[key] = get[(op, provider, metric)]
            out.append(entry)
    return out


def plot(summary: list[dict], path: Path, title: str) -> Path:
    """Horizontal stacked bars of seconds per pipeline, split into parts: the Wanda pipelines in one
    panel, ECoFLaP fast vs reference in another (its reference is far longer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["statistics", "selection", "rest", "stage 1", "stage 2"]
    names = {
        "statistics": "activation statistic",
        "selection": "mask selection",
        "rest": "calibration forwards + framework",
        "stage 1": "stage 1 (block scores)",
        "stage 2": "stage 2 (sequential Wanda)",
    }
    colors = {
        "statistics": "#4c72b0",
        "selection": "#dd8452",
        "rest": "#b0b0b0",
        "stage 1": "#55a868",
        "stage 2": "#c44e52",
    }
    panels = [[s for s in summary if s["op"] != "ecoflap-zo"], [s for s in summary if s["op"] == "ecoflap-zo"]]
    panels = [rows for rows in panels if rows]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(10, 0.45 * len(summary) + 2.2),
        gridspec_kw={"height_ratios": [len(rows) + 1 for rows in panels]},
        squeeze=False,
    )
    drawn = {}
    for ax, rows in zip(axes[:, 0], panels):
        y = list(range(len(rows)))[::-1]
        for key in keys:
            left = [sum(r.get(k, 0.0) for k in keys[: keys.index(key)]) for r in rows]
            width = [r.get(key, 0.0) for r in rows]
            if any(width):
                drawn[key] = ax.barh(y, width, left=left, color=colors[key])
        longest = max(r["total"] for r in rows)
        for yi, r in zip(y, rows):
            ax.text(r["total"] + 0.01 * longest, yi, f"{r['total']:.1f} s", va="center", fontsize=8)
        ax.set_xlim(0, longest * 1.12)
        ax.set_yticks(y, [f"{r['op']}: {r['provider']}" for r in rows], fontsize=8)
        ax.set_xlabel("seconds (wall time)", fontsize=8)
    axes[0, 0].set_title(title, fontsize=9)
    fig.legend(
        [drawn[k] for k in keys if k in drawn],
        [names[k] for k in keys if k in drawn],
        loc="lower center",
        ncol=len(drawn),
        fontsize=7,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
