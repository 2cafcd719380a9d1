"""The pruning driver: validation and the plan first, then the per-block sparsity allocation
(uniform, OWL or ECoFLaP's stage 1), then stage 2; the report says what was pruned and what not.

Everything that can be checked is checked before a weight changes: the configuration, the
calibration batches, the walk's plan (discovery and one dry forward), N:M widths and the sparsity
map's names and values.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from . import objectives, ops, parallel, stage1, stage2, walk
from .allocate import ecoflap_allocation, owl_sparsities
from .stage2 import PATTERNS, PRUNERS

ALLOCATORS = ("ecoflap-zo", "ecoflap-fo", "owl", "uniform")


@dataclass
class PruneConfig:
    sparsity: float = 0.5
    pattern: str = "unstructured"
    pruner: str = "wanda"
    allocator: str = "uniform"
    nsamples: int = 32
    seqlen: int = 128
    batch_size: int = 8
    seed: int = 0
    progress: bool = True
    sparsity_map: dict | None = field(default=None, repr=False)
    # tower names (the plan's stack names: vision, qformer, language, text, ...) to prune; None: every
    # tower, under one global budget
    towers: tuple[str, ...] | None = None
    # stage 1 (ECoFLaP)
    max_sparsity: float | None = None  # m; default sparsity + 0.1
    # "expected": E_z|<z, grad L>| = sqrt(2/pi)|grad L| (noise-free); "grad": <z, grad L> with zo_draws draws
    # per (tensor, batch); "fd": forward-only finite differences (the paper's setting); docs/ALLOCATION.md
    zo_estimator: str = "expected"
    zo_draws: int = 1
    eps: float = 1e-3
    group: str = "block"  # "block" or "tensor"
    group_reduce: str = "sum"  # "sum" or "avg"
    fo_metric: str = "wg"  # first order: |W|*g ("wg") or g ("g")
    # OWL
    owl_lambda: float = 0.08
    owl_m: float = 5.0

    @property
    def m(self) -> float:
        return self.max_sparsity if self.max_sparsity is not None else min(self.sparsity + 0.1, 0.99)

    def validate(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {sorted(PATTERNS)}, got {self.pattern!r}")
        nm = PATTERNS[self.pattern]
        if nm is not None:
            self.sparsity = 1 - nm[0] / nm[1]
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"pruner must be one of {PRUNERS}, got {self.pruner!r}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"allocator must be one of {ALLOCATORS}, got {self.allocator!r}")
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_sparsity is not None and not self.sparsity <= self.max_sparsity < 1:
            raise ValueError(f"max sparsity must be in [sparsity={self.sparsity}, 1), got {self.max_sparsity}")
        self._validate_map_and_bound(nm)
        if self.zo_estimator not in ("expected", "grad", "fd"):
            raise ValueError(f"zo estimator must be 'expected', 'grad' or 'fd', got {self.zo_estimator!r}")
        if isinstance(self.zo_draws, bool) or not isinstance(self.zo_draws, int) or not 1 <= self.zo_draws <= 4096:
            raise ValueError(f"zo draws must be an integer in [1, 4096], got {self.zo_draws!r}")
        if self.group not in ("block", "tensor") or self.group_reduce not in ("sum", "avg"):
            raise ValueError(
                f"group must be block|tensor and group reduce sum|avg, got {self.group}/{self.group_reduce}"
            )
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.towers is not None:
            if isinstance(self.towers, str) or not all(isinstance(t, str) and t for t in self.towers):
                raise ValueError(f"towers must be a tuple of tower names, got {self.towers!r}")
            if not self.towers:
                raise ValueError("towers is empty: name at least one tower (or None for every tower)")
            self.towers = tuple(self.towers)

    def _validate_map_and_bound(self, nm) -> None:
        """The sparsity map's structure and its conflict with N:M patterns, and ECoFLaP's bound m,
        checked with the configuration (before any model is touched)."""
        for name in ("nsamples", "seqlen", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if self.sparsity_map is not None:
            if not isinstance(self.sparsity_map, dict):
                raise ValueError(
                    f"sparsity map must map matrix names to sparsities, got a {type(self.sparsity_map).__name__}"
                )
            if nm is not None:
                raise ValueError(
                    f"a sparsity map cannot be combined with pattern {self.pattern} (every layer is 1 - n/m)"
                )
            for k, v in self.sparsity_map.items():
                if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                    raise ValueError(f"sparsity map entry {k!r} = {v!r} is not a number in [0, 1)")
        elif nm is None and self.allocator.startswith("ecoflap") and self.max_sparsity is None:
            if self.m < self.sparsity:
                raise ValueError(
                    f"sparsity {self.sparsity} is above ECoFLaP's default maximum layer sparsity "
                    f"m = min(sparsity + 0.1, 0.99) = {self.m:g}; give a maximum in [{self.sparsity}, 1) "
                    "(--max-sparsity) or use the uniform allocator"
                )


def _check_matrices(plan: walk.Plan, config: PruneConfig) -> None:
    nm = PATTERNS[config.pattern]
    if nm is None:
        return
    for name, m in plan.matrices().items():
        if m.in_features % nm[1]:
            raise ValueError(
                f"pattern {config.pattern} needs in_features divisible by {nm[1]}; {name} has {m.in_features}"
            )


def _check_sparsity_map(plan: walk.Plan, config: PruneConfig) -> dict[str, float] | None:
    if config.sparsity_map is None:
        return None
    if not isinstance(config.sparsity_map, dict):
        raise ValueError(
            f"sparsity map must map matrix names to sparsities, got a {type(config.sparsity_map).__name__}"
        )
    if PATTERNS[config.pattern] is not None:
        raise ValueError(f"a sparsity map cannot be combined with pattern {config.pattern} (every layer is 1 - n/m)")
    names = list(plan.matrices())
    missing = [n for n in names if n not in config.sparsity_map]
    if missing:
        raise ValueError(f"sparsity map has no entry for {len(missing)} matrices, first {missing[0]!r}")
    out = {}
    for n in names:
        v = config.sparsity_map[n]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"sparsity map entry {n!r} = {v!r} is not a number in [0, 1)")
        out[n] = float(v)
    return out


def _group_of(m: walk.Matrix, group: str) -> str:
    return m.name if group == "tensor" else m.block.key


def allocate(
    model,
    plan: walk.Plan,
    config: PruneConfig,
    batches: list[dict],
    stage1_batches: list[dict],
    objective: objectives.Objective,
    stage1_ids: list[int] | None = None,
) -> tuple[dict[str, float], dict]:
    """Per-matrix sparsity (matrix name -> sparsity) and what the allocator measured."""
    mats = plan.matrices()
    given = _check_sparsity_map(plan, config)
    if given is not None:
        return given, {"method": "sparsity map given"}
    uniform = {n: float(config.sparsity) for n in mats}
    if config.allocator == "uniform":
        return uniform, {"method": "uniform"}
    if PATTERNS[config.pattern] is not None:
        return uniform, {"method": f"uniform ({config.pattern} fixes every layer at {config.sparsity:g})"}
    if config.allocator == "owl":
        ratios: dict[str, float] = {}

        def outliers(block, stats, _tokens):
            scores = torch.cat(
                [
                    ops.wanda_scores(m.weight(), stats[m.name].scaler_row).flatten()
                    for m in block.matrices
                    if m.name in stats
                ]
            )
            ratios[block.key] = float((scores > config.owl_m * scores.mean()).float().mean())

        stage2.sequential(model, plan, batches, outliers, desc="OWL: outlier ratios", progress=config.progress)
        keys = list(ratios)
        per_block = dict(zip(keys, owl_sparsities([ratios[k] for k in keys], config.sparsity, config.owl_lambda)))
        return (
            {n: per_block[m.block.key] for n, m in mats.items()},
            {"method": f"OWL (M={config.owl_m}, lambda={config.owl_lambda})", "outlier_ratio": ratios},
        )
    res = stage1.tensor_scores(
        model,
        stage1_batches,
        plan=plan,
        objective=objective,
        method="zo" if config.allocator == "ecoflap-zo" else "fo",
        estimator=config.zo_estimator,
        draws=config.zo_draws,
        eps=config.eps,
        seed=config.seed,
        fo_metric=config.fo_metric,
        progress=config.progress,
        batch_ids=stage1_ids,
    )
    groups: dict[str, list[str]] = {}
    for n, m in mats.items():
        groups.setdefault(_group_of(m, config.group), []).append(n)
    keys = list(groups)
    sizes = [sum(mats[n].numel for n in groups[g]) for g in keys]
    scores = [sum(res.tensor_scores[n] for n in groups[g]) for g in keys]
    if config.group_reduce == "avg":
        scores = [sc / sz for sc, sz in zip(scores, sizes)]
    alloc = ecoflap_allocation(sizes, scores, config.sparsity, config.m)
    halves = split_half_agreement(
        res.batch_scores, groups, keys, sizes if config.group_reduce == "avg" else None
    )
    per_group = dict(zip(keys, alloc.sparsity))
    info = {
        "method": f"ECoFLaP stage 1: {res.method}",
        "loss": res.loss,
        "stage1_s": res.seconds,
        "max_sparsity": config.m,
        "group": config.group,
        "group_reduce": config.group_reduce,
        "group_scores": dict(zip(keys, scores)),
        "split_half_spearman": halves,
        "tensor_scores": res.tensor_scores,
        "fallback": alloc.fallback,
    }
    (n_batches,) = parallel.all_reduce_floats(len(stage1_batches))  # over every rank
    info["decision"] = _decision(res, int(n_batches), halves, alloc, config)
    return {n: per_group[_group_of(m, config.group)] for n, m in mats.items()}, info


AGREEMENT_WARN = 0.5  # split-half Spearman below which the report warns that chance decides the allocation


def _decision(res, n_batches: int, halves: float | None, alloc, config: PruneConfig) -> str:
    """What the allocator decided and why, in one sentence (report.json's ``stage1.decision``)."""
    if alloc.fallback:
        return f"uniform sparsity {config.sparsity:g}: {alloc.fallback}"
    lo, hi = min(alloc.sparsity), max(alloc.sparsity)
    text = (
        f"{config.group} sparsities {lo:.3f}-{hi:.3f} (target {config.sparsity:g}, bound m={config.m:g}) from "
        f"{res.method} on {n_batches} stage-1 batch(es)"
    )
    if halves is None:
        return text + (
            "; split-half agreement not measured (one batch)"
            if n_batches < 2
            else "; split-half agreement not measured (no per-batch scores)"
        )
    text += f"; split-half Spearman of the scores {halves:.2f}"
    if halves < AGREEMENT_WARN:
        text += (
            f" (below {AGREEMENT_WARN}: the two halves of the stage-1 data disagree, so chance decides much of "
            "this allocation; give more --stage1-nsamples)"
        )
    return text


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists."""
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def split_half_agreement(
    batch_scores, groups: dict[str, list[str]], keys: list[str], sizes: list[int] | None = None
) -> float | None:
    """Spearman correlation of the group scores computed on the even-numbered and on the odd-numbered
    stage-1 batches: how much of the allocation the data decides rather than chance (None with
    fewer than 2 batches or no per-batch scores). With ``sizes`` (``group_reduce="avg"``) each
    half's group score is divided by its group's size, as the allocated scores are."""
    if not batch_scores or len(batch_scores) < 2:
        return None
    halves = []
    for parity in (0, 1):
        rows = [row for b, row in batch_scores.items() if b % 2 == parity]
        half = [sum(row.get(n, 0.0) for row in rows for n in groups[g]) for g in keys]
        halves.append(half if sizes is None else [h / n for h, n in zip(half, sizes)])
    return spearman(*halves)


def measure_sparsity(plan: walk.Plan) -> tuple[float, dict[str, float]]:
    """(zeros / elements over every prunable matrix, per-matrix zero fraction), counted."""
    per, zeros, total = {}, 0, 0
    for name, m in plan.matrices().items():
        w = m.weight()
        z = int((w == 0).sum())
        per[name] = z / w.numel()
        zeros += z
        total += w.numel()
    return (zeros / total if total else 0.0), per


def tower_sparsity(plan: walk.Plan, zeros: dict[str, int]) -> dict[str, dict]:
    """Per tower (stack name, forward order): its path, prunable elements, achieved sparsity (zeros
    counted at pruning, ``zeros``) and whether it was pruned; towers left dense are counted now."""
    out = {}
    for stack in plan.stacks + plan.unselected:
        mats = [m for b in stack.blocks for m in b.matrices]
        n = sum(m.numel for m in mats)
        if stack in plan.unselected:
            z = sum(int((m.weight() == 0).sum()) for m in mats)
        else:
            z = sum(zeros[m.name] for m in mats)
        out[stack.name] = {
            "path": stack.path,
            "pruned": stack not in plan.unselected,
            "numel": n,
            "achieved_sparsity": z / n if n else 0.0,
        }
    return out


# Stage 1 scores 4 windows by default, in (at least) 2 batches so that its split-half agreement can be
# measured: with the noise-free estimator 4 x 128 tokens agree with a 32 x 128-token reference as well
# as 8 do (Spearman 0.96 against 0.97 over 4 draws of windows; a single noise draw on 8 windows gave
# 0.73) at ~60% of the time (benchmarks/bench_stage1_tokens.py, docs/ALLOCATION.md).
STAGE1_WINDOWS = 4


def stage1_batch_size(calibration) -> int:
    """Windows per stage-1 batch: 4, fewer when that would leave fewer than 2 batches."""
    n = len(calibration) if isinstance(calibration, torch.Tensor) else 0
    return min(4, max(1, n // 2)) if n else 4


def prepare(model, calibration, config: PruneConfig, stage1_calibration=None, loader=None):
    """Everything checked before any work: (plan, objective, stage-2 batches, stage-1 batches, the
    stage-1 batches' indices in the whole set). Data-parallel ranks get every world()-th batch."""
    config.validate()
    objective = objectives.for_model(model)
    batches = walk.as_batches(calibration, config.batch_size, objective.from_ids)
    if stage1_calibration is None:
        stage1_calibration = calibration[:STAGE1_WINDOWS] if isinstance(calibration, torch.Tensor) else batches
    stage1_batches = walk.as_batches(stage1_calibration, stage1_batch_size(stage1_calibration), objective.from_ids)
    if parallel.active():  # every rank takes every world()-th batch
        if min(len(batches), len(stage1_batches)) < parallel.world():
            raise ValueError(
                f"{len(batches)} calibration batches ({len(stage1_batches)} for stage 1) for {parallel.world()} ranks: "
                "every rank needs at least one (more --nsamples / --stage1-nsamples, or a smaller --batch-size)"
            )
        batches, _ = parallel.shard(batches)
        stage1_batches, stage1_ids = parallel.shard(stage1_batches)
    else:
        stage1_ids = list(range(len(stage1_batches)))
    plan = walk.plan(model, walk.dry_batch(batches[0]), loader=loader)
    if config.towers is not None and loader is not None:
        raise ValueError("--towers with --stream is not supported: a streamed model is pruned in every tower")
    plan = walk.select_towers(plan, config.towers)
    if loader is not None and config.allocator.startswith("ecoflap") and config.zo_estimator == "fd":
        raise ValueError(
            "finite differences (--zo-estimator fd) re-run every later block per tensor: not with --stream"
        )
    if loader is not None and config.allocator.startswith("ecoflap") and len(plan.stacks) != 1:
        raise ValueError(
            f"ECoFLaP's stage 1 with --stream needs a single block stack; {plan.model_class} has {len(plan.stacks)}"
        )
    _check_matrices(plan, config)
    _check_sparsity_map(plan, config)
    return plan, objective, batches, stage1_batches, stage1_ids


@torch.no_grad()
def prune_(
    model, calibration, config: PruneConfig | None = None, stage1_calibration=None, *, loader=None, after_block=None
) -> dict:
    """Prune ``model`` in place; returns the report.

    ``calibration``: token windows ``[n, seqlen]`` (split into batches of ``config.batch_size`` and
    turned into the model's inputs: ``input_ids``, or encoder input + labels for encoder-decoder
    models), or a list of dicts of model inputs used as given (e.g. ``decoder_input_ids`` for T5,
    pixel values for vision models). ``stage1_calibration`` (ECoFLaP's scores) defaults to the first
    ``STAGE1_WINDOWS`` (4) windows / the same batches. Nothing is changed when a check fails.

    ``loader`` (``stream.BlockLoader``): ``model`` is a streamed skeleton; every block is read when
    the walk reaches it and freed after ``after_block(block)`` (which writes its pruned tensors).
    """
    config = config or PruneConfig()
    t0 = time.perf_counter()
    plan, objective, batches, stage1_batches, stage1_ids = prepare(
        model, calibration, config, stage1_calibration, loader
    )
    sparsities, stage1_info = allocate(model, plan, config, batches, stage1_batches, objective, stage1_ids)
    t1 = time.perf_counter()
    tokens_seen: dict[str, int] = {}
    no_input: list[str] = []
    zeros: dict[str, int] = {}
    stat = stage2.statistic(config.pruner)

    def prune_block(block, stats, tokens):
        for m in block.matrices:
            tokens_seen[m.name] = tokens.get(m.name, 0)
            if m.name not in stats:
                no_input.append(m.name)
            stage2.prune_matrix(m, stats.get(m.name), sparsities[m.name], config.pattern, config.pruner)
            zeros[m.name] = int((m.weight() == 0).sum())  # counted now: a streamed block is freed after

    stage2.sequential(
        model,
        plan,
        batches,
        prune_block,
        stat=stat,
        desc="stage 2: prune blocks",
        progress=config.progress,
        after_block=after_block,
        keep_changes=True,
    )
    t2 = time.perf_counter()
    numel = {n: m.numel for n, m in plan.matrices().items()}
    per_matrix = {n: zeros[n] / numel[n] for n in numel}
    achieved = sum(zeros.values()) / sum(numel.values())
    towers = tower_sparsity(plan, zeros)
    summary = plan.summary()
    expert_tokens = {n: tokens_seen[n] for n, m in plan.matrices().items() if m.kind == "expert"}
    return {
        "model_class": plan.model_class,
        "allocator": config.allocator,
        "pruner": config.pruner,
        "pattern": config.pattern,
        "target_sparsity": config.sparsity,
        "achieved_sparsity": achieved,
        "towers": towers,
        "layer_sparsity": per_matrix,
        "layer_numel": numel,
        "layer_block": {n: m.block.key for n, m in plan.matrices().items()},
        "sparsity_map": sparsities,
        "stage1": stage1_info,
        "objective": objective.description,
        "plan": summary,
        "dense": summary["dense"],
        "expert_tokens": expert_tokens,
        "no_calibration_input": {
            "matrices": no_input,
            "action": "pruned by magnitude (|W|) at their sparsity: no calibration token reached them",
        },
        "timings": {"stage1_s": t1 - t0, "stage2_s": t2 - t1},
        "seed": config.seed,
        "nsamples": config.nsamples,
        "seqlen": config.seqlen,
        "config": {k: v for k, v in asdict(config).items() if k != "sparsity_map"},
    }
