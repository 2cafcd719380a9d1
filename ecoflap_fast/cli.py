"""Command line: ``ecoflap-fast prune | export | eval | bench`` (also ``python -m ecoflap_fast``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ._fs import check_destination  # noqa: E402

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def _sparsity(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number, got {text!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {v}")
    return v


def _towers(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"--towers takes comma-separated tower names (vision,language), got {text!r}")
    return names


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="Hugging Face folder, .gguf file, or 'default' (SmolLM2-135M)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *sorted(DTYPES)],
        help="compute dtype (default auto: bf16 where the device multiplies bf16 natively, else fp32)",
    )
    p.add_argument("--eval-text", nargs="+", default=None, help="held-out text file(s) instead of the wiki split")
    p.add_argument("--eval-windows", type=int, default=16, help="number of evaluation windows")
    p.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _remove_blocks(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--remove-blocks must be a number, got {text!r}") from None
    if not v >= 0 or (v >= 1 and not v.is_integer()):
        raise argparse.ArgumentTypeError(f"--remove-blocks must be a count >= 0 or a fraction in (0, 1), got {text}")
    return int(v) if v >= 1 else v


def build_parser() -> argparse.ArgumentParser:
    from .depth import SCORERS
    from .prune import ALLOCATORS, PATTERNS, PRUNERS

    parser = argparse.ArgumentParser(prog="ecoflap-fast", description="Kernel-accelerated ECoFLaP pruning")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="prune a model and write report.json + sparsity.png to --output")
    _common(p)
    p.add_argument(
        "--sparsity",
        type=_sparsity,
        default=None,
        help="target sparsity over the prunable set, in [0, 1) (default 0.5; with --remove-blocks alone: none)",
    )
    p.add_argument("--pattern", default="unstructured", choices=list(PATTERNS))
    p.add_argument("--pruner", default="wanda", choices=list(PRUNERS))
    p.add_argument(
        "--allocator",
        default="ecoflap-zo",
        choices=list(ALLOCATORS),
        help="per-block sparsity: ECoFLaP zeroth/first order, OWL, or uniform (plain Wanda)",
    )
    p.add_argument("--max-sparsity", type=_sparsity, default=None, help="ECoFLaP bound m (default sparsity + 0.1)")
    p.add_argument(
        "--zo-estimator",
        default="expected",
        choices=["expected", "grad", "fd"],
        help="zeroth-order estimate: 'expected' E_z|<z, grad L>| = sqrt(2/pi)|grad L| (noise-free, one backward "
        "per batch), 'grad' <z, grad L> with --zo-draws noise draws, or 'fd' forward-only finite differences",
    )
    p.add_argument("--zo-draws", type=int, default=1, help="noise draws per tensor and batch of --zo-estimator grad")
    p.add_argument(
        "--stage1-nsamples", type=int, default=4, help="stage-1 calibration windows (default 4, in 2 batches)"
    )
    p.add_argument("--stage1-seqlen", type=int, default=128)
    p.add_argument("--eps", type=float, default=1e-3, help="zeroth-order perturbation size")
    p.add_argument("--group", default="block", choices=["block", "tensor"])
    p.add_argument("--group-reduce", default="sum", choices=["sum", "avg"])
    p.add_argument("--sparsity-map", type=Path, default=None, help="JSON per-layer sparsity map of an earlier run")
    p.add_argument("--nsamples", type=int, default=32, help="stage-2 calibration windows (CPU default 32)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window (CPU default 128)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--calib-text", nargs="+", default=None, help="calibration text file(s) instead of the wiki split")
    p.add_argument(
        "--calib-images",
        type=Path,
        default=None,
        metavar="DIR",
        help="vision models: a folder of images, each with a same-named .txt caption (default: the embedded pairs)",
    )
    p.add_argument(
        "--calib-jsonl",
        type=Path,
        default=None,
        metavar="FILE",
        help='vision models: JSON lines {"image": path (relative to the file), "caption": text}',
    )
    p.add_argument(
        "--towers",
        type=_towers,
        default=None,
        help="prune only these towers, comma-separated names from the plan (e.g. vision,qformer,language; "
        "'inspect' lists them); default: every tower under one global budget",
    )
    p.add_argument("--output", type=Path, required=True, help="output folder (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--eval", action="store_true", help="held-out perplexity before and after pruning")
    p.add_argument("--save-model", action="store_true", help="also save the pruned model (safetensors) to OUTPUT/model")
    p.add_argument(
        "--export",
        nargs="+",
        default=[],
        choices=["hf-dense", "ct-bitmask", "ct-24", "torch-24"],
        help="also export the pruned model to OUTPUT/<format> (verified before it appears)",
    )
    p.add_argument("--export-dtype", default=None, choices=sorted(DTYPES), help="dtype of exported weights")
    p.add_argument(
        "--remove-blocks",
        type=_remove_blocks,
        default=None,
        metavar="K",
        help="depth pruning: remove K whole blocks (or a fraction of them, e.g. 0.25) before any width pruning",
    )
    p.add_argument(
        "--block-scorer",
        default="iterative",
        choices=list(SCORERS),
        help="which blocks --remove-blocks removes: iterative (re-scored calibration loss), bi (block influence), "
        "ecoflap (stage-1 block scores)",
    )
    p.add_argument("--depth-nsamples", type=int, default=8, help="calibration windows for the block scorer")
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="out of core: read each block from the checkpoint when it is reached, write it pruned to OUTPUT/model "
        "and free it (default: switched on by itself when the weights would take over 40%% of the memory; "
        "--no-stream keeps the whole model in memory whatever its size)",
    )
    p.add_argument(
        "--save-dtype", default=None, choices=sorted(DTYPES), help="dtype of OUTPUT/model (default: the source's)"
    )
    x = sub.add_parser("export", help="write a (pruned) Hugging Face model folder as a sparse checkpoint")
    x.add_argument("--model", required=True, help="Hugging Face folder of the pruned model (e.g. OUTPUT/model)")
    x.add_argument("--format", required=True, choices=["hf-dense", "ct-bitmask", "ct-24", "torch-24"])
    x.add_argument("--output", type=Path, required=True)
    x.add_argument("--force", action="store_true", help="replace an existing output folder")
    x.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="dtype of the exported weights")
    x.add_argument(
        "--plain-config",
        action="store_true",
        help="hf-dense: metadata in sparsity_config.json, so plain transformers loads the folder "
        "without the compressed-tensors package",
    )
    e = sub.add_parser("eval", help="held-out perplexity of a model")
    _common(e)
    i = sub.add_parser("inspect", help="print the pruning plan of a model (stacks, blocks, matrices, what stays dense)")
    i.add_argument("--model", default="default", help="Hugging Face folder, .gguf file, or 'default' (SmolLM2-135M)")
    i.add_argument("--json", action="store_true", help="print the plan as JSON")
    b = sub.add_parser(
        "bench",
        help="op benchmarks and end-to-end pipelines (ours vs llm-compressor's Wanda; ECoFLaP fast vs reference)",
    )
    b.add_argument(
        "--model",
        default="default",
        help="Hugging Face folder, 'default' (SmolLM2-135M) or 'random-llama-1b' (LLaMA-3.2-1B shapes, random weights)",
    )
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the CSVs and the plot")
    b.add_argument("--sparsity", type=_sparsity, default=0.5)
    b.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"], choices=["unstructured", "2:4"])
    b.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    b.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--repeat", type=int, default=3, help="runs of each Wanda pipeline, interleaved; the median is kept")
    b.add_argument(
        "--reference-blocks",
        type=int,
        nargs="+",
        default=[29],
        help="blocks whose stage-1 scores the (slow) reference computes; its time is scaled to all tensors",
    )
    b.add_argument("--ops-shapes", default="llama7b", help="shape set of the op benchmarks (llama7b, all, small, ...)")
    b.add_argument("--ops-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    b.add_argument("--no-ops", action="store_true", help="skip the op benchmarks")
    b.add_argument("--no-pipelines", action="store_true", help="skip the end-to-end pipelines")
    b.add_argument("--no-llmcompressor", action="store_true", help="pipelines without llm-compressor")
    b.add_argument("--no-ecoflap", action="store_true", help="skip the ECoFLaP fast-vs-reference pipeline")
    b.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_reliability_options(sub)
    return parser


def _prune(a) -> dict:
    import torch

    from . import data, models, objectives, parallel, report
    from .prune import PruneConfig, prune_

    t_start = time.perf_counter()
    if parallel.init_from_env(a.device or ("cuda" if torch.cuda.is_available() else "cpu")) and a.remove_blocks:
        raise ValueError("--remove-blocks is not available under torchrun yet; run it in one process")
    out = a.output.expanduser().resolve()
    _reliability_checks(a, out)  # every check that needs no weights; then the output's lock, held to the end
    sparsity_map = None
    if a.sparsity_map is not None:
        if not a.sparsity_map.is_file():
            raise FileNotFoundError(f"sparsity map {str(a.sparsity_map)!r} does not exist")
        sparsity_map = json.loads(a.sparsity_map.read_text()).get("sparsity_map")
        if sparsity_map is None:
            raise ValueError(f"{a.sparsity_map} has no 'sparsity_map' entry (use a report.json of an earlier run)")
    width = a.sparsity is not None or not a.remove_blocks or a.pattern != "unstructured" or a.sparsity_map is not None
    config = PruneConfig(
        sparsity=0.5 if a.sparsity is None else a.sparsity,
        pattern=a.pattern,
        pruner=a.pruner,
        allocator=a.allocator,
        nsamples=a.nsamples,
        seqlen=a.seqlen,
        batch_size=a.batch_size,
        seed=a.seed,
        progress=not a.no_progress,
        sparsity_map=sparsity_map,
        max_sparsity=a.max_sparsity,
        zo_estimator=a.zo_estimator,
        zo_draws=a.zo_draws,
        eps=a.eps,
        group=a.group,
        group_reduce=a.group_reduce,
        towers=a.towers,
    )
    config.validate()
    if a.stage1_nsamples <= 0 or a.stage1_seqlen <= 0:
        raise ValueError("stage-1 nsamples and seqlen must be positive")
    user_pairs = _calibration_pairs(a)  # image-caption files read (and refused) before the model is loaded
    if a.remove_blocks:
        _check_depth_request(a)
    calib_texts, eval_texts = data.corpus(a.calib_text, a.eval_text)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = getattr(torch, DTYPES[a.dtype])
    streamed = _stream_decision(a, compute_dtype, device)
    loader = None
    if streamed:
        from . import stream

        path = models.resolve(a.model)
        model, loader, source = stream.open_streamed(path, dtype=compute_dtype, device=device)
        tok = models.inputs_maker(model, model.config.model_type, path, a.trust_remote_code)
        source_dtype = source.dtype()
    else:
        model, tok = models.load_model(
            a.model, dtype=compute_dtype, device=device, trust_remote_code=a.trust_remote_code
        )
        source_dtype = models.source_dtype(a.model)
    save_dtype = getattr(torch, DTYPES[a.save_dtype]) if a.save_dtype else source_dtype
    if streamed:
        _check_streamed_disk(a, model, source, save_dtype, compute_dtype)
    objective = objectives.for_model(model)
    _check_loaded_context(a, model)
    is_clip = objective.kind == "contrastive"
    vision = objective.images
    if user_pairs is not None and not vision:
        raise ValueError(
            f"--calib-images / --calib-jsonl are for vision models; {type(model).__name__} is a {objective.kind} model"
        )
    if vision and a.calib_text:
        raise ValueError(
            f"{type(model).__name__} is calibrated on image-caption pairs: use --calib-images or --calib-jsonl"
        )
    if tok is None:
        what = (
            "image processor and tokenizer files"
            if is_clip
            else "processor files (processor_config.json or preprocessor_config.json)"
            if vision
            else "tokenizer files"
        )
        raise ValueError(f"{a.model} has no {what}; calibration data cannot be prepared")
    calib_tokens = held_pairs = None
    if vision:  # image-caption pairs through the model's own processor
        calib_pairs, held_pairs = data.image_caption_pairs()
        pairs = user_pairs if user_pairs is not None else calib_pairs
        calibration = data.vlm_batches(data.augment_pairs(pairs, a.nsamples), tok, model, batch_size=a.batch_size)
        # stage 1 in batches as for token windows (2 at least, for the split-half agreement), except
        # for a contrastive loss, whose negatives are the other pairs of the batch
        half = min(a.batch_size, max(1, a.stage1_nsamples // 2), 4) if objective.separable else a.batch_size
        stage1_calibration = data.vlm_batches(data.augment_pairs(pairs, a.stage1_nsamples), tok, model, batch_size=half)
    else:
        calib_tokens = data.tokenize(tok, calib_texts, max_tokens=_calibration_tokens(a))
        calibration = data.calibration_windows(calib_tokens, a.nsamples, a.seqlen, a.seed)
        stage1_calibration = data.calibration_windows(calib_tokens, a.stage1_nsamples, a.stage1_seqlen, a.seed + 1)
    if a.towers is not None:  # an unknown tower name is refused before any work
        from . import walk

        if streamed:
            raise ValueError("--towers with --stream is not supported: a streamed model is pruned in every tower")
        first = walk.as_batches(calibration, a.batch_size, objective.from_ids)[0]
        walk.select_towers(walk.plan(model, walk.dry_batch(first)), a.towers)
    eval_plan = None
    if streamed and a.eval:
        from . import walk

        eval_plan = walk.plan(model, walk.as_batches(calibration, 1, objective.from_ids)[0], loader=loader)
    measure, metric = _quality(a, model, tok, objective, eval_texts, held_pairs, config.progress, eval_plan)
    eval_s = 0.0
    q_dense = q_pruned = None
    if a.eval:
        t = time.perf_counter()
        q_dense = measure("dense")
        eval_s += time.perf_counter() - t
    depth_rep = _remove_blocks_step(a, model, objective, calib_tokens, config.progress)
    written = None
    if streamed:
        written, rep = _prune_streamed(a, model, loader, tok, calibration, config, stage1_calibration, save_dtype)
    elif width:
        rep = prune_(model, calibration, config, stage1_calibration=stage1_calibration)
    else:
        rep = _depth_only_report(model, calibration, config)
    if depth_rep is not None:
        rep["depth"] = depth_rep
        rep["timings"]["depth_s"] = depth_rep["seconds"]
    if a.eval:
        t = time.perf_counter()
        q_pruned = measure("pruned")
        eval_s += time.perf_counter() - t
    rep = {
        "model": a.model,
        **rep,
        "eval_metric": metric if a.eval else None,
        "ppl_dense": q_dense if metric == "ppl" else None,
        "ppl_pruned": q_pruned if metric == "ppl" else None,
        "loss_dense": _pick(q_dense, "contrastive_loss") if metric == "contrastive_loss" else None,
        "loss_pruned": _pick(q_pruned, "contrastive_loss") if metric == "contrastive_loss" else None,
        "eval": {"dense": q_dense, "pruned": q_pruned} if isinstance(q_dense, dict) else None,
        "cosine_pruned": q_pruned if metric == "embedding_cosine" else None,
        "device": device,
        "dtype": DTYPES[a.dtype],
        "dtype_reason": getattr(a, "dtype_reason", "asked for"),
        "eval_windows": a.eval_windows if a.eval else None,
        "eval_seqlen": a.eval_seqlen if a.eval else None,
        "streamed": streamed,
        "ranks": parallel.world(),
        "saved_dtype": str(save_dtype).replace("torch.", "") if a.save_model or streamed else None,
    }
    rep["timings"].update(eval_s=eval_s, total_s=time.perf_counter() - t_start)
    export_dtype = getattr(torch, DTYPES[a.export_dtype]) if a.export_dtype else None

    def extra(folder):
        from . import checkpoint
        from .export import export_

        if written is not None:  # streamed: the pruned checkpoint is already on disk
            os.replace(written, folder / "model")
        elif a.save_model:
            checkpoint.save_model(
                model, folder / "model", dtype=save_dtype, tokenizer=None if isinstance(tok, tuple) else tok
            )
        rep["exports"] = [
            export_(model, folder / fmt, fmt, tokenizer=None if isinstance(tok, tuple) else tok, dtype=export_dtype)
            for fmt in a.export
        ]
        for e in rep["exports"]:
            e["path"] = str(out / e["format"])

    if not parallel.is_main():  # rank 0 writes; the other ranks only took part in the reductions
        return rep
    try:
        report.write_output(out, rep, force=a.force, extra=extra)
    finally:
        if written is not None and written.exists():
            import shutil

            shutil.rmtree(written, ignore_errors=True)
    return rep


def _pick(q, key):
    return q[key] if isinstance(q, dict) else q


def _calibration_pairs(a):
    """The user's image-caption pairs (--calib-images DIR or --calib-jsonl FILE), or None."""
    from . import data

    images, jsonl = getattr(a, "calib_images", None), getattr(a, "calib_jsonl", None)
    if images is not None and jsonl is not None:
        raise ValueError("give --calib-images or --calib-jsonl, not both")
    if images is not None:
        return data.read_image_folder(images.expanduser())
    if jsonl is not None:
        return data.read_image_jsonl(jsonl.expanduser())
    return None


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def _stream_decision(a, compute_dtype, device: str) -> bool:
    """--stream, or switched on (with a message) when the weights in the compute dtype would take more
    than 40% of the available memory; refused (before any work) where streaming cannot help or fit."""
    from . import models, stream

    if a.stream is False:
        return False
    path = models.resolve(a.model)
    if not path.is_dir():
        if a.stream:
            raise ValueError(f"--stream reads a safetensors model folder; {a.model} is a GGUF file (convert it first)")
        return False
    try:
        est = stream.estimate(path, compute_dtype, a.nsamples, a.seqlen, a.batch_size)
    except (OSError, ValueError) as e:  # no safetensors weights, unreadable config: the loader names it
        if a.stream:
            raise ValueError(f"--stream cannot read {a.model}: {e}") from None
        return False
    available = stream.available_memory(device)
    on = bool(a.stream)
    if not on and est["weights"] > 0.4 * available:
        print(
            f"ecoflap-fast: the weights take {_size(est['weights'])} in {str(compute_dtype)[6:]}, over 40% "
            f"of the {_size(available)} available: streaming block by block (--stream)",
            file=sys.stderr,
        )
        on = True
    if on:
        if est["peak_streamed"] > available:
            raise MemoryError(
                f"even streamed, the run needs about {_size(est['peak_streamed'])} (embeddings and head "
                f"{_size(est['outside'])}, two blocks {_size(2 * est['block'])}, activations "
                f"{_size(est['activations'])}) and {_size(available)} are available"
            )
        for flag, name in ((a.export, "--export"), (a.remove_blocks, "--remove-blocks")):
            if flag:
                raise ValueError(f"{name} is not available with --stream; run it on OUTPUT/model afterwards")
        held = stream.process_memory(device)  # the interpreter, torch and the tokenizer, already resident
        print(
            f"ecoflap-fast: streaming; estimated peak {_size(held + est['peak_streamed'])} "
            f"({_size(held)} held now; the weights take {_size(est['weights'])} in memory otherwise)",
            file=sys.stderr,
        )
    return on


def _check_streamed_disk(a, model, source, save_dtype, compute_dtype) -> None:
    """A streamed run writes the pruned checkpoint beside the output as it goes, and every rank on this
    machine keeps the blocks of the towers before the last (several-tower models) in the compute
    dtype until the end: both are checked against the free space before any work (the exports were
    checked before the model was opened)."""
    from . import _fs, parallel, walk

    upstream = tuple(s.path + "." for s in walk.structure(model).stacks[:-1])
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", parallel.world()))
    written = source.nbytes(dtype=save_dtype)
    spill = ranks * source.nbytes([n for n in source.meta if n.startswith(upstream)], compute_dtype) if upstream else 0
    _fs.check_writable(Path(a.output).expanduser().resolve(), written + spill)


def _prune_streamed(a, model, loader, tok, calibration, config, stage1_calibration, save_dtype):
    """Stage 1 and stage 2 on a streamed skeleton; every pruned block is written to a temporary folder
    beside the output as soon as it is done. Returns (the folder, the report)."""
    import shutil
    import tempfile
    from pathlib import Path

    from . import checkpoint, parallel, walk
    from .prune import prune_

    out = a.output.expanduser().resolve()
    main = parallel.is_main()
    folder = None
    if main:
        out.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.model-", dir=out.parent))
    folder = Path(parallel.broadcast(str(folder)))
    writer = None
    # every rank's spill of pruned upstream towers (multi-tower models), named like a temporary of
    # the output so that a later run on it removes what a killed run left
    out.parent.mkdir(parents=True, exist_ok=True)
    loader.spill_dir = tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        skip = checkpoint.tied_names(model)
        writer = checkpoint.ShardWriter(folder, checkpoint.layout(model, save_dtype, skip)) if main else None
        cast = lambda t: t.to(save_dtype) if t.is_floating_point() else t  # noqa: E731

        def write(block):
            for n, t in block.module.state_dict().items():
                writer.add(f"{block.path}.{n}", cast(t))

        rep = prune_(
            model,
            calibration,
            config,
            stage1_calibration=stage1_calibration,
            loader=loader,
            after_block=write if main else None,
        )
        if main:
            stacks = [s.path + "." for s in walk.structure(model).stacks]
            for n, t in model.state_dict().items():
                if n not in skip and not n.startswith(tuple(stacks)):
                    writer.add(n, cast(t))
            writer.close()
            checkpoint.write_config(model, folder, save_dtype)
            if tok is not None and not isinstance(tok, tuple):
                tok.save_pretrained(folder)
        parallel.barrier()
        loader.checkpoint = checkpoint.Checkpoint(folder)  # the pruned evaluation reads what was written
        return folder, rep
    except BaseException:
        if main:
            if writer is not None:
                writer.abort()
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        loader.discard_spill()  # later reads come from the written checkpoint
        shutil.rmtree(loader.spill_dir, ignore_errors=True)
        loader.spill_dir = None


def _check_depth_request(a) -> None:
    """--remove-blocks against the model's layer count, from its config alone (before loading weights)."""
    from . import depth, models

    if a.depth_nsamples <= 0:
        raise ValueError(f"--depth-nsamples must be positive, got {a.depth_nsamples}")
    path = models.resolve(a.model)
    if path.is_dir():
        cfg = json.loads((path / "config.json").read_text())
        n = cfg.get("num_hidden_layers", cfg.get("n_layer", cfg.get("num_layers")))
        if isinstance(n, int):
            depth.block_count(a.remove_blocks, n)


def _remove_blocks_step(a, model, objective, calib_tokens, progress: bool):
    """Depth pruning before width pruning: score, remove, report (None without --remove-blocks)."""
    if not a.remove_blocks:
        return None
    from . import data, depth, walk

    if calib_tokens is None:
        raise ValueError("--remove-blocks supports decoder-only language models for now")
    windows = data.calibration_windows(calib_tokens, a.depth_nsamples, a.stage1_seqlen, a.seed + 2)
    batches = walk.as_batches(windows, 4, objective.from_ids)
    plan = walk.plan(model, batches[0])
    depth.check_supported(model, plan, objective)
    k = depth.block_count(a.remove_blocks, len(plan.stacks[0].blocks))
    cfg = depth.DepthConfig(remove=k, scorer=a.block_scorer, seed=a.seed, progress=progress)
    chosen = depth.choose_blocks(model, plan, objective, batches, k, cfg)
    chosen.update(depth.remove_blocks_(model, plan, chosen["removed_blocks"]))
    return chosen


def _depth_only_report(model, calibration, config) -> dict:
    """The report of a run that removed blocks and pruned no weight: what is left, counted."""
    from . import objectives, walk
    from .prune import measure_sparsity

    objective = objectives.for_model(model)
    plan = walk.plan(model, walk.as_batches(calibration, config.batch_size, objective.from_ids)[0])
    achieved, per = measure_sparsity(plan)
    return {
        "model_class": plan.model_class,
        "allocator": "none",
        "pruner": "none (blocks removed only)",
        "pattern": "none",
        "target_sparsity": 0.0,
        "achieved_sparsity": achieved,
        "layer_sparsity": per,
        "layer_numel": {n: m.numel for n, m in plan.matrices().items()},
        "layer_block": {n: m.block.key for n, m in plan.matrices().items()},
        "sparsity_map": {},
        "stage1": {"method": "none"},
        "plan": plan.summary(),
        "timings": {"stage1_s": 0.0, "stage2_s": 0.0},
        "seed": config.seed,
    }


def _quality(a, model, tok, objective, eval_texts, held_pairs, progress: bool, plan=None):
    """(measure(label) -> float, metric name) of held-out quality for this kind of model; the data
    are prepared only when --eval asks for them."""
    from . import data, evaluate, walk

    if not a.eval:
        return None, None
    if objective.images:  # the held-out image-caption pairs, by kind
        held = data.vlm_batches(held_pairs, tok, model, batch_size=a.batch_size)
        if objective.kind == "representation":  # a vision backbone: its features against the dense model's
            dense = evaluate.sentence_embeddings(model, held, plan)
            return (lambda label: evaluate.embedding_cosine(model, held, dense, plan)), "embedding_cosine"
        on_demand = (lambda: walk.on_demand(plan)) if plan is not None else contextlib.nullcontext
        if objective.kind == "contrastive":
            measure, metric = (lambda label: evaluate.retrieval(model, held, progress=progress)), "contrastive_loss"
        elif objective.kind == "caption-lm":
            measure, metric = (lambda label: evaluate.caption_loss(model, held, progress=progress)), "caption_loss"
        else:
            with on_demand():
                dense = evaluate.predictions(model, held)  # before pruning
            measure = lambda label: {"top1_agreement": evaluate.top1_agreement(model, held, dense)}  # noqa: E731
            metric = "top1_agreement"

        def measured(label, measure=measure):  # a streamed model reads each block on its call
            with on_demand():
                return measure(label)

        return measured, metric
    windows = data.eval_windows(
        data.tokenize(tok, eval_texts, max_tokens=a.eval_windows * a.eval_seqlen), a.eval_seqlen, a.eval_windows
    )
    if objective.kind in ("causal-lm", "seq2seq"):
        return (
            lambda label: evaluate.perplexity(
                model, windows, progress=progress, desc=f"perplexity ({label})", plan=plan
            )
        ), "ppl"
    batches = [{"input_ids": w} for w in windows.split(4)]
    dense = evaluate.sentence_embeddings(model, batches, plan)  # before pruning
    return (lambda label: evaluate.embedding_cosine(model, batches, dense, plan)), "embedding_cosine"


def _export(a) -> dict:
    import torch

    from . import models
    from .export import export_

    out = a.output.expanduser().resolve()
    _reliability_checks(a, out)  # before loading the model; then the output's lock
    model, tok = models.load_model(a.model, trust_remote_code=a.trust_remote_code)
    dtype = getattr(torch, DTYPES[a.dtype]) if a.dtype else None
    return export_(
        model,
        out,
        a.format,
        tokenizer=tok if not isinstance(tok, tuple) else None,
        force=a.force,
        dtype=dtype,
        plain_config=a.plain_config,
    )


def _eval(a) -> dict:
    import torch

    from . import data, evaluate, models

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _reliability_checks(a, None)
    model, tok = models.load_model(
        a.model, dtype=getattr(torch, DTYPES[a.dtype]), device=device, trust_remote_code=a.trust_remote_code
    )
    _check_loaded_context(a, model)
    _, eval_texts = data.corpus(None, a.eval_text)
    windows = data.eval_windows(
        data.tokenize(tok, eval_texts, max_tokens=a.eval_windows * a.eval_seqlen), a.eval_seqlen, a.eval_windows
    )
    return {"model": a.model, "ppl": evaluate.perplexity(model, windows, progress=not a.no_progress)}


def _inspect(a) -> str:
    import torch

    from . import models, objectives, walk

    _reliability_checks(a, None)
    model, tok = models.load_model(a.model, trust_remote_code=a.trust_remote_code)
    objective = objectives.for_model(model)
    if objective.images:
        from . import data

        if tok is None:
            raise ValueError(f"{a.model} has no processor files to build a dry-run batch of image-caption pairs")
        calib, _ = data.image_caption_pairs()
        batch = data.vlm_batches(calib[:2], tok, model, batch_size=2)[0]
    else:
        batch = objective.from_ids(torch.randint(0, min(1000, model.get_input_embeddings().num_embeddings), (1, 16)))
    plan = walk.plan(model, batch)
    summary = plan.summary()
    summary["objective"] = objective.description
    if a.json:
        return json.dumps(summary, indent=2)
    return format_plan(plan, objective.description)


def format_plan(plan, objective: str) -> str:
    """The plan as a few readable lines."""
    s = plan.summary()
    lines = [
        f"{s['model_class']}: {len(s['stacks'])} stack(s), {s['prunable_matrices']} prunable matrices, "
        f"{s['prunable_numel'] / 1e6:.2f}M weights ({s['coverage_of_block_matrices']:.1%} of the block matrices)",
        f"stage-1 loss: {objective}",
    ]
    for st, stack in zip(s["stacks"], plan.stacks):
        kinds = {}
        for m in stack.blocks[0].matrices:
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
        first = ", ".join(
            f"{m.name[len(stack.blocks[0].path) + 1 :]} {list(m.shape)}" for m in stack.blocks[0].matrices[:12]
        )
        more = len(stack.blocks[0].matrices) - 12
        lines.append(
            f"  {st['name']:9s} {st['path']}: {st['blocks']} blocks, capture by {st['capture']}, "
            f"{st['prunable_numel'] / 1e6:.2f}M prunable; block 0: {first}" + (f" ... (+{more})" if more > 0 else "")
        )
    for reason, d in s["dense"].items():
        names = ", ".join(d["names"][:4]) + (f" ... (+{len(d['names']) - 4})" if len(d["names"]) > 4 else "")
        lines.append(f"  dense ({reason}): {d['numel'] / 1e6:.3f}M in {len(d['names'])} tensors: {names}")
    for n in s["notes"]:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def _bench(a) -> int:
    import torch

    from .bench import ops as ops_bench
    from .bench import pipeline
    from .bench.shapes import SHAPE_SETS

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = device.split(":")[0]
    if a.ops_shapes not in SHAPE_SETS:
        raise ValueError(f"--ops-shapes must be one of {sorted(SHAPE_SETS)}, got {a.ops_shapes!r}")
    for name in ("nsamples", "seqlen", "batch_size", "repeat"):
        if getattr(a, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    if not a.no_pipelines and not a.no_llmcompressor and pipeline.llmcompressor_available() is not None:
        raise ImportError(
            f"llm-compressor cannot be imported ({pipeline.llmcompressor_available()}); run `make bench-pipeline` "
            "(its own environment) or pass --no-llmcompressor"
        )
    out = a.out.expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} exists and is not a folder")
    if not a.no_ops:
        res = ops_bench.run(
            device, SHAPE_SETS[a.ops_shapes], getattr(torch, a.ops_dtype), ops_bench.OPS, repeat=3, sparsity=a.sparsity
        )
        print(f"wrote {len(res.rows)} rows to {res.write(out / f'ops_{kind}.csv')}")
    if not a.no_pipelines:
        res, summary = pipeline.run(
            model=a.model,
            device=device,
            patterns=a.patterns,
            sparsity=a.sparsity,
            nsamples=a.nsamples,
            seqlen=a.seqlen,
            batch_size=a.batch_size,
            reference_blocks=a.reference_blocks,
            with_llmcompressor=not a.no_llmcompressor,
            with_ecoflap=not a.no_ecoflap,
            repeat=a.repeat,
        )
        csv_path = res.write(out / f"pipeline_{kind}.csv")
        title = f"{a.model}, {a.nsamples}x{a.seqlen} calibration tokens, sparsity {a.sparsity} ({res.env['device']})"
        png = pipeline.plot(summary, out / f"pipeline_{kind}.png", title)
        print(f"wrote {len(res.rows)} rows to {csv_path} and the plot {png}")
        mismatched = [r for r in res.rows if r["provider"] == "backend_vs_llmcompressor" and float(r["median"]) != 0]
        if mismatched:
            print(
                "ecoflap-fast: llm-compressor with this engine as backend changed "
                f"{mismatched[0]['median']} weights ({mismatched[0]['op']})",
                file=sys.stderr,
            )
            return 1
    return 0


# ---- reliability: every check before any work, the output lock, signals, one-line errors ----------
# (docs/RELIABILITY.md says what these promise and which tests hold them)
_SESSION: dict = {}


class _Terminated(BaseException):
    """SIGTERM/SIGHUP, raised in the main thread so that every ``finally`` (temporary folders, the
    output lock) runs before the process exits."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _add_reliability_options(sub) -> None:
    for name, p in sub.choices.items():
        p.add_argument("--debug", action="store_true", help="print the traceback of an error")
        if name in ("prune", "export", "eval", "inspect"):
            p.add_argument(
                "--trust-remote-code",
                action="store_true",
                help="let a model folder's own Python code (config.json auto_map) run; such a folder is refused "
                "without it",
            )
        if name in ("prune", "export", "eval"):
            p.add_argument(
                "--no-memory-check",
                action="store_true",
                help="run even when the memory estimate is above what is available",
            )


def _reliability_checks(a, out) -> None:
    """The checks of ``preflight`` for this command, then (with an output) its lock for the run."""
    import torch

    from . import _fs, preflight

    preflight.check_numbers(a)
    preflight.check_text_files(a)
    if out is not None:
        if Path(a.output).expanduser().is_symlink():
            raise FileExistsError(f"output {str(a.output)!r} is a symbolic link; give the folder it should be instead")
        check_destination(out, a.force, protect=preflight.inputs_of(a))
        _fs.check_writable(out)
    smap = preflight.read_sparsity_map(a.sparsity_map) if getattr(a, "sparsity_map", None) is not None else None
    facts = preflight.model_facts(a.model, getattr(a, "trust_remote_code", False))
    device = getattr(a, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    check_memory = not getattr(a, "no_memory_check", True)
    weights = facts.weight_bytes or 0
    if a.command == "prune":
        lengths = {"--seqlen": a.seqlen}
        if a.allocator.startswith("ecoflap") or a.remove_blocks:
            lengths["--stage1-seqlen"] = a.stage1_seqlen
        if a.eval:
            lengths["--eval-seqlen"] = a.eval_seqlen
        preflight.check_seqlens(facts, lengths)
        if smap is not None and a.pattern == "unstructured":
            preflight.check_map_names(facts, smap, a.sparsity_map)
        parts = preflight.prune_estimate(facts, a, getattr(torch, DTYPES[a.dtype]), DTYPES[a.dtype])
        if check_memory and parts is not None:
            preflight.check_memory(facts, parts, device, "this run")
        need = preflight.output_bytes(facts, a, a.export, a.save_model, a.export_dtype and DTYPES[a.export_dtype])
        _fs.check_writable(out, need)
    elif a.command == "eval":
        preflight.check_seqlens(facts, {"--eval-seqlen": a.eval_seqlen})
        if check_memory and facts.weight_bytes is not None:
            vocab = facts.dim("vocab_size", default=32000)
            parts = {"weights": weights * 2, "logits": 4 * a.eval_seqlen * vocab * 4 * 2}
            parts["tokenizer and data"] = preflight.PROCESS_BASE
            preflight.check_memory(facts, parts, device, "evaluation")
    elif a.command == "export":
        if check_memory and facts.weight_bytes is not None:  # the model, its export copy, one layer decoded back
            parts = {"weights": weights * 2, "export copy": weights, "data": preflight.PROCESS_BASE}
            preflight.check_memory(facts, parts, "cpu", "this export")
        _fs.check_writable(out, preflight.output_bytes(facts, a, [a.format], False, a.dtype and DTYPES[a.dtype]))
    if out is not None and os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes and locks
        stack = _SESSION.get("stack")
        if stack is None:  # called outside main(): held until the process exits
            import contextlib

            stack = _SESSION["stack"] = contextlib.ExitStack()
        stack.enter_context(_fs.output_lock(out))


def _check_loaded_context(a, model) -> None:
    """Sequence lengths against the context of a model whose files carry no config.json (GGUF)."""
    from . import preflight

    lengths = {"--eval-seqlen": a.eval_seqlen} if a.command == "eval" or getattr(a, "eval", False) else {}
    if a.command == "prune":
        lengths["--seqlen"] = a.seqlen
    preflight.check_seqlens(preflight.ModelFacts(None, model.config.to_dict()), lengths)


def _calibration_tokens(a) -> int:
    from . import data

    windows = [(a.nsamples, a.seqlen), (a.stage1_nsamples, a.stage1_seqlen)]
    if getattr(a, "remove_blocks", None):
        windows.append((a.depth_nsamples, a.stage1_seqlen))
    return data.calibration_budget(*windows)


def _parse(argv):
    """The arguments; a Ctrl-C while the parser imports the engine is one line and exit 130, too."""
    try:
        a = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("ecoflap-fast: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    if a.command in ("prune", "eval") and a.dtype == "auto":
        import torch

        from . import precision

        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        a.dtype, a.dtype_reason = precision.resolve("auto", device)
    return a


def _on_signal(signum, frame):
    raise _Terminated(signum)


def _begin_session(a) -> None:
    """For one command: no prompt can read the terminal (stdin is /dev/null), SIGTERM/SIGHUP raise
    so that cleanup runs, and the output locks taken by the checks are released at the end."""
    import contextlib
    import signal
    import threading

    _SESSION.clear()
    _SESSION["stack"] = contextlib.ExitStack()
    _SESSION["debug"] = getattr(a, "debug", False) or os.environ.get("ECOFLAP_DEBUG") == "1"
    _SESSION["stdin"] = sys.stdin
    sys.stdin = open(os.devnull)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None:
                handlers[sig] = signal.signal(sig, _on_signal)
    _SESSION["handlers"] = handlers


def _end_session() -> None:
    """Release the locks (a signal during these milliseconds is ignored: the command has ended)."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    ignored = {}
    if main:
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None:
                ignored[sig] = signal.signal(sig, signal.SIG_IGN)
    stack = _SESSION.pop("stack", None)
    try:
        if stack is not None:
            stack.close()
    finally:
        for sig, handler in ignored.items():
            signal.signal(sig, handler)
    for sig, handler in _SESSION.pop("handlers", {}).items():
        signal.signal(sig, handler)
    old = _SESSION.pop("stdin", None)
    if old is not None:
        sys.stdin.close()
        sys.stdin = old


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, MemoryError) and not text:
        text = "out of memory"
    return text or type(e).__name__


def _print_traceback_if_debug(e: BaseException) -> None:
    if _SESSION.get("debug"):
        import traceback

        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)


def _uncaught(e: BaseException) -> int:
    """Exit status and one line for what the user-error clause does not catch."""
    import signal

    _print_traceback_if_debug(e)
    if isinstance(e, KeyboardInterrupt):
        print("ecoflap-fast: interrupted; no output was left half-written", file=sys.stderr)
        return 130
    if isinstance(e, _Terminated):
        name = signal.Signals(e.signum).name
        print(f"ecoflap-fast: stopped by {name}; no output was left half-written", file=sys.stderr)
        return 128 + e.signum
    if not isinstance(e, Exception):  # SystemExit, GeneratorExit: not ours to handle
        raise e
    if type(e).__name__ == "SafetensorError" and "I/O error" in str(e):  # writing failed: disk full, quota, ...
        print(f"ecoflap-fast: error: writing the output failed: {_one_line(e)}", file=sys.stderr)
        return 2
    import tempfile
    import traceback

    fd, log = tempfile.mkstemp(prefix="ecoflap-fast-internal-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(f"argv: {sys.argv}\n")
        traceback.print_exception(type(e), e, e.__traceback__, file=f)
    print(
        f"ecoflap-fast: internal error: {type(e).__name__}: {_one_line(e)} -- this is a bug in ecoflap-fast, not "
        f"in your input; please report it with the traceback saved in {log} (or rerun with --debug)",
        file=sys.stderr,
    )
    return 70


def main(argv=None) -> int:
    a = _parse(argv)
    _begin_session(a)
    if getattr(a, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        if a.command == "prune":
            from . import parallel

            rep = _prune(a)
            if not parallel.is_main():
                parallel.finish()
                return 0
            t = rep["timings"]
            line = (
                f"pruned {rep['model']} ({rep['allocator']} + {rep['pruner']}, {rep['pattern']}): "
                f"achieved sparsity {rep['achieved_sparsity']:.4f} (target {rep['target_sparsity']:.4f})"
            )
            if rep["ppl_pruned"] is not None:
                line += f"; held-out perplexity {rep['ppl_dense']:.2f} dense -> {rep['ppl_pruned']:.2f} pruned"
            if rep.get("cosine_pruned") is not None:
                line += f"; held-out embedding cosine to the dense model {rep['cosine_pruned']:.4f}"
            if rep.get("loss_pruned") is not None:
                line += f"; held-out contrastive loss {rep['loss_dense']:.4f} dense -> {rep['loss_pruned']:.4f} pruned"
            ev = rep.get("eval") or {}
            if "image_to_text_r1" in (ev.get("pruned") or {}):
                d, q = ev["dense"], ev["pruned"]
                line += (
                    f", R@1 image->text {d['image_to_text_r1']:.3f} -> {q['image_to_text_r1']:.3f}, "
                    f"text->image {d['text_to_image_r1']:.3f} -> {q['text_to_image_r1']:.3f}"
                )
            if "caption_loss" in (ev.get("pruned") or {}):
                d, q = ev["dense"], ev["pruned"]
                line += (
                    f"; held-out caption loss {d['caption_loss']:.4f} dense -> {q['caption_loss']:.4f} pruned "
                    f"(perplexity {d['caption_ppl']:.2f} -> {q['caption_ppl']:.2f})"
                )
            if "top1_agreement" in (ev.get("pruned") or {}):
                line += f"; held-out top-1 agreement with the dense model {ev['pruned']['top1_agreement']:.3f}"
            towers = rep.get("towers") or {}
            if len(towers) > 1:
                line += "; towers " + ", ".join(
                    f"{t} {v['achieved_sparsity']:.3f}" + ("" if v["pruned"] else " (not selected)")
                    for t, v in towers.items()
                )
            print(line)
            if rep.get("depth"):
                d = rep["depth"]
                print(
                    f"depth: removed blocks {d['removed_blocks']} of {d['blocks_before']} ({d['scorer']} scorer, "
                    f"{d['seconds']:.1f}s); {d['blocks_after']} blocks left"
                )
            print(f"stage 1: {rep['stage1'].get('decision') or rep['stage1']['method']}")
            print(
                f"time: stage1 {t['stage1_s']:.1f}s, stage2 {t['stage2_s']:.1f}s, eval {t['eval_s']:.1f}s, "
                f"total {t['total_s']:.1f}s; wrote {a.output}/report.json and sparsity.png"
            )
            parallel.finish()
        elif a.command == "bench":
            return _bench(a)
        elif a.command == "inspect":
            print(_inspect(a))
        elif a.command == "export":
            info = _export(a)
            print(
                f"wrote {info['format']} checkpoint to {info['path']}: {info['bytes'] / 2**20:.1f} MiB "
                f"(global sparsity {info['global_sparsity']:.4f}, {info['dtype']}), verified against the model"
            )
        else:
            print(json.dumps(_eval(a)))
    except (
        NotADirectoryError,
        ValueError,
        TypeError,
        FileNotFoundError,
        FileExistsError,
        NotImplementedError,
        ImportError,
        RuntimeError,
        MemoryError,
        OSError,
    ) as e:
        _print_traceback_if_debug(e)
        print(f"ecoflap-fast: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BaseException as e:  # Ctrl-C, SIGTERM/SIGHUP, and internal errors: one line each
        return _uncaught(e)
    finally:
        _end_session()
    return 0


if __name__ == "__main__":
    sys.exit(main())
