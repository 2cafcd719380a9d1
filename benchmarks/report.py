"""Generates the tables and plot of benchmarks/README.md from the results CSVs (never typed by hand).

python benchmarks/report.py            # rewrites the generated section of benchmarks/README.md
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import RESULTS_DIR  # noqa: E402
from ecoflap_fast.bench.harness import read_results  # noqa: E402

README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _latest_run(rows: list[dict]) -> list[dict]:
    """Rows of the most recent (commit, date) run in a file."""
    last = max((r["date"], r["commit"]) for r in rows)
    return [r for r in rows if (r["date"], r["commit"]) == last]


def _latest_per_key(rows: list[dict]) -> list[dict]:
    """The most recent row of every (op, provider, shape, metric): runs that measured different parts
    (perplexity in one, speed in another) combine."""
    latest = {}
    for r in sorted(rows, key=lambda r: r["date"]):
        latest[(r["op"], r["provider"], r["shape"], r["metric"])] = r
    return sorted(latest.values(), key=lambda r: r["date"])


def ops_table(rows: list[dict]) -> str:
    rows = _latest_run(rows)
    env = rows[0]
    bw = next((float(r["median"]) for r in rows if r["op"] == "copy"), None)
    times = defaultdict(dict)
    for r in rows:
        if r["metric"] == "time":
            times[(r["op"], r["shape"], r["dtype"])][r["provider"]] = float(r["median"])
    frac = {
        (r["op"], r["shape"]): float(r["median"])
        for r in rows
        if r["metric"] == "fraction_of_copy_bw" and r["provider"] == "ecoflap_fast"
    }
    lines = [
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
        f"commit {env['commit']}, {env['date']}. Measured copy bandwidth: {bw:.1f} GB/s."
        if bw
        else "",
        "",
        "| op | shape | dtype | ecoflap_fast ms | % of copy bw | baseline | baseline ms | speed-up |",
        "|---|---|---|---:|---:|---|---:|---:|",
    ]
    for (op, shape, dtype), provs in times.items():
        ours = provs.get("ecoflap_fast")
        if ours is None:
            continue
        for prov, t in provs.items():
            if prov == "ecoflap_fast":
                continue
            lines.append(
                f"| {op} | {shape} | {dtype} | {ours:.2f} | {100 * frac.get((op, shape), 0):.1f}% | "
                f"{prov} | {t:.2f} | **{t / ours:.1f}×** |"
            )
    return "\n".join(lines)


def speedup_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _latest_run(rows)
    sp = [
        (f"{r['op']}\n{r['shape'].split(' ')[-1]}", r["provider"].replace("speedup_vs_", ""), float(r["median"]))
        for r in rows
        if r["metric"] == "speedup"
    ]
    labels = list(dict.fromkeys(s[0] for s in sp))
    provs = list(dict.fromkeys(s[1] for s in sp))
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(labels)), 4))
    width = 0.8 / max(1, len(provs))
    for j, prov in enumerate(provs):
        xs = [i + j * width for i, lab in enumerate(labels) for s in sp if s[0] == lab and s[1] == prov]
        ys = [s[2] for lab in labels for s in sp if s[0] == lab and s[1] == prov]
        ax.bar(xs, ys, width, label=f"vs {prov}")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks([i + width * (len(provs) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up of ecoflap_fast (×, log)")
    ax.set_title(f"{rows[0]['device']} — {rows[0]['date']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(rows: list[dict]) -> str:
    """Median speed-up over the shapes, per (op, baseline)."""
    import statistics

    rows = _latest_run(rows)
    by = defaultdict(list)
    ours = defaultdict(list)
    for r in rows:
        if r["metric"] == "speedup":
            by[(r["op"], r["provider"].replace("speedup_vs_", ""))].append(float(r["median"]))
        if r["metric"] == "time" and r["provider"] == "ecoflap_fast":
            ours[r["op"]].append(r["shape"])
    lines = [
        f"{rows[0]['device']}, {rows[0]['date']} (commit {rows[0]['commit']})",
        "",
        "| op | baseline | median speed-up over shapes | shapes |",
        "|---|---|---:|---:|",
    ]
    for (op, prov), v in by.items():
        lines.append(f"| {op} | {prov} | **{statistics.median(v):.1f}×** | {len(v)} |")
    return "\n".join(lines)


def _replace_between(path: Path, begin: str, end: str, body: str) -> None:
    text = path.read_text()
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


def _quality_rows(rows: list[dict]) -> dict:
    """{model: {(method, sparsity, seed): row}} of the quality rows in the "<model> s=<s> seed=<n>"
    format (the most recent row of each), plus the split-half agreement under the key "rho"."""
    out: dict = defaultdict(dict)
    for r in sorted(rows, key=lambda r: r["date"]):
        if " s=" not in r["shape"] or " seed=" not in r["shape"]:
            continue  # rows of an older format
        model, rest = r["shape"].split(" s=")
        sparsity, seed = rest.split(" seed=")
        key = (r["provider"], float(sparsity), int(seed))
        if r["op"] in ("ppl", "embedding_cosine"):
            out[model][key] = r
        elif r["op"] == "split_half_spearman":
            out[model][("rho",) + key] = r
    return out


_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # Student t, 97.5%, 1-10 df


def mean_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% confidence interval (Student t; above 10 degrees
    of freedom the Cornish-Fisher expansion of t in the normal quantile, within 0.1%)."""
    n = len(values)
    df = n - 1
    if df < 1:
        raise ValueError("a confidence interval needs at least two values")
    if df <= len(_T975):
        t = _T975[df - 1]
    else:
        z = statistics.NormalDist().inv_cdf(0.975)
        t = z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    return statistics.fmean(values), t * statistics.stdev(values) / math.sqrt(n)


def quality_table(rows: list[dict]) -> str:
    """Per model: quality per method and sparsity at the first seed (ratio to uniform), then the ratio
    ECoFLaP / uniform over every seed run (mean with its 95% interval, min, max, seeds won), how much
    uniform Wanda itself moves between those seeds (the run-to-run noise the ratio is judged against)
    and stage 1's split-half agreement."""
    blocks = []
    for model, cells in _quality_rows(rows).items():
        q = {k: float(v["median"]) for k, v in cells.items() if k[0] != "rho"}
        metric = next(iter(cells.values()))["op"]
        better_low = metric == "ppl"
        dense = q.get(("dense", 0.0, 0))
        sparsities = sorted({k[1] for k in q if k[0] != "dense"})
        seeds = sorted({k[2] for k in q if k[0] != "dense"})
        first = seeds[0]
        methods = [m for m in METHOD_ORDER if any((m, s, first) in q for s in sparsities)]
        env = next(iter(cells.values()))
        name = "perplexity" if better_low else "embedding cosine with the dense model"
        lines = [
            f"**{model}** ({name}; {env['dtype']}, {env['device']}, {env['date']}, commit {env['commit']}); dense "
            + (f"**{dense:.2f}**" if better_low and dense is not None else "1.0000"),
            "",
            f"| method (seed {first}) | " + " | ".join(f"sparsity {s:g}" for s in sparsities) + " |",
            "|---|" + "---:|" * len(sparsities),
        ]
        fmt = (lambda v: f"{v:.1f}") if better_low else (lambda v: f"{v:.4f}")
        for m in methods:
            row = []
            for s in sparsities:
                v, u = q.get((m, s, first)), q.get(("uniform", s, first))
                ratio = f" ({v / u:.2f}×)" if better_low and u and v is not None and m != "uniform" else ""
                row.append("—" if v is None else fmt(v) + ratio)
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        spread = []
        variants = sorted({k[0] for k in q if k[0] not in METHOD_ORDER and k[0] != "dense"})  # m=s+…, n1=…, studies
        for m in methods + variants:
            if m == "uniform":
                continue
            for s in sparsities:
                pairs = [
                    (q[(m, s, sd)], q[("uniform", s, sd)])
                    for sd in seeds
                    if (m, s, sd) in q and ("uniform", s, sd) in q
                ]
                if len(pairs) < 2:
                    continue
                r = [v / u if better_low else (1 - v) / (1 - u) for v, u in pairs]
                rho = [float(cells[("rho", m, s, sd)]["median"]) for sd in seeds if ("rho", m, s, sd) in cells]
                damage = [u if better_low else 1 - u for _, u in pairs]  # uniform's own, seed to seed
                mean, half = mean_interval(r)
                spread.append(
                    f"| {m} | {s:g} | {len(r)} | {mean:.2f}× (± {half:.2f}) | {min(r):.2f}× | {max(r):.2f}× | "
                    f"{sum(x < 1 for x in r)}/{len(r)} | {max(damage) / min(damage):.2f}× | "
                    + (f"{sum(rho) / len(rho):.2f}" if rho else "—")
                    + " |"
                )
        if spread:
            what = "perplexity" if better_low else "(1 − cosine)"
            lines += [
                "",
                f"| method | sparsity | seeds | {what} / uniform's, mean (± 95% interval) | min | max | wins | "
                "uniform's max / min over the seeds | stage-1 split-half ρ |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
                *spread,
            ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


METHOD_ORDER = ["uniform", "owl", "ecoflap-zo", "ecoflap-fo"]


def quality_plot(rows: list[dict], path: Path) -> None:
    """Quality against sparsity, one panel per model, one line per method (first seed; ECoFLaP-zo's
    spread over seeds as a band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data_ = _quality_rows(rows)
    if not data_:
        return
    fig, axes = plt.subplots(1, len(data_), figsize=(4.2 * len(data_), 3.6), squeeze=False)
    for ax, (model, cells) in zip(axes[0], data_.items()):
        q = {k: float(v["median"]) for k, v in cells.items() if k[0] != "rho"}
        metric = next(iter(cells.values()))["op"]
        seeds = sorted({k[2] for k in q if k[0] != "dense"})
        for m in METHOD_ORDER:
            pts = sorted((k[1], v) for k, v in q.items() if k[0] == m and k[2] == seeds[0])
            if not pts:
                continue
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            spread = defaultdict(list)
            for k, v in q.items():
                if k[0] == m:
                    spread[k[1]].append(v)
            xs = sorted(x for x, v in spread.items() if len(v) > 1)
            if xs:
                ax.fill_between(
                    xs, [min(spread[x]) for x in xs], [max(spread[x]) for x in xs], color=line.get_color(), alpha=0.15
                )
        if metric == "ppl":
            ax.set_yscale("log")
            dense = q.get(("dense", 0.0, 0))
            if dense:
                ax.axhline(dense, color="k", ls=":", lw=1, label=f"dense {dense:.2f}")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("held-out perplexity (log)" if metric == "ppl" else "embedding cosine with dense")
        ax.set_title(model, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Wanda local pruner; bands: spread over seeds", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stage1_table(rows: list[dict]) -> str:
    rows = _latest_run(rows)
    get = {(r["provider"], r["metric"]): float(r["median"]) for r in rows}
    shape = rows[0]["shape"]
    lines = [
        f"{rows[0]['device']}, {rows[0]['date']}; {shape}",
        "",
        "| implementation | seconds | vs reference | rel. error median | p90 | max |",
        "|---|---:|---:|---:|---:|---:|",
        f"| reference (full forward per perturbation) | {get[('reference', 'time')]:.1f} | 1× | — | — | — |",
    ]
    for name in ["fast_fd", "grad_estimator"]:
        if (name, "time") in get:
            lines.append(
                f"| {name} | {get[(name, 'time')]:.1f} | {get[(name, 'speedup_vs_reference')]:.1f}× | "
                f"{100 * get[(name, 'rel_err_median')]:.2f}% | {100 * get[(name, 'rel_err_p90')]:.2f}% | "
                f"{100 * get[(name, 'rel_err_max')]:.2f}% |"
            )
    return "\n".join(lines)


def dtype_table(rows: list[dict]) -> str:
    """fp32 against bf16 (GEMM throughput, a forward, dense perplexity) and, per dtype that ran the
    pipeline, uniform Wanda's and ECoFLaP-zo's pruning time (median, min-max) and perplexity."""
    rows = _latest_run(rows)
    get = {(r["op"], r["provider"], r["dtype"]): r for r in rows}
    dtypes = [d for d in ("float32", "bfloat16") if ("gemm", "512x576x1536", d) in get]
    env = rows[0]
    lines = [
        f"{env['device']}, {env['date']} (commit {env['commit']})",
        "",
        "| | " + " | ".join(dtypes) + " |",
        "|---|" + "---:|" * len(dtypes),
    ]

    def cell(key, fmt):
        r = get.get(key)
        return "—" if r is None else fmt(float(r["median"]))

    lines.append(
        "| GEMM 512×576×1536 (GFLOP/s) | "
        + " | ".join(cell(("gemm", "512x576x1536", d), lambda v: f"{v:.1f}") for d in dtypes)
        + " |"
    )
    lines.append(
        "| one 128-token forward (s) | "
        + " | ".join(cell(("time", "forward 1x128", d), lambda v: f"{v:.2f}") for d in dtypes)
        + " |"
    )
    short = sorted({p for (op, p, _) in get if op == "perplexity" and p.startswith("dense, ")})
    for p in short:
        lines.append(
            f"| perplexity ({p} held-out) | "
            + " | ".join(cell(("perplexity", p, d), lambda v: f"{v:.3f}") for d in dtypes)
            + " |"
        )
    full = [d for d in dtypes if ("time", "uniform", d) in get]
    if full:
        lines += [
            "",
            "| dtype | method | pruning time (s), median | min–max | held-out perplexity |",
            "|---|---|---:|---:|---:|",
        ]
        for d in full:
            for m in ("uniform", "ecoflap-zo"):
                t = get[("time", m, d)]
                ppl = get.get(("perplexity", m, d))
                lines.append(
                    f"| {d} | {m} | {float(t['median']):.1f} | {float(t['p20']):.1f}–{float(t['p80']):.1f} | "
                    + (f"{float(ppl['median']):.2f}" if ppl else "—")
                    + " |"
                )
            ratio = get.get(("time_ratio", "ecoflap-zo / uniform", d))
            if ratio:
                lines.append(f"| {d} | ECoFLaP-zo / uniform | **{float(ratio['median']):.2f}×** | | |")
    return "\n".join(lines)


def export_table(rows: list[dict]) -> str:
    rows = _latest_run(rows)
    dense = next(float(r["median"]) for r in rows if r["provider"] == "dense bf16")
    lines = [
        f"{rows[0]['device']}, {rows[0]['date']}; dense bf16 checkpoint **{dense:.1f} MiB**",
        "",
        "| pruned model | format | size (MiB) | vs dense bf16 | reloaded perplexity equal |",
        "|---|---|---:|---:|:---:|",
    ]
    get = {(r["provider"], r["shape"], r["metric"]): float(r["median"]) for r in rows}
    for (prov, shape, metric), v in get.items():
        if metric == "size" and prov != "dense bf16":
            same = get.get((prov, shape, "reload_ppl_equal"))
            lines.append(
                f"| {shape} | {prov} | {v:.1f} | {get[(prov, shape, 'size_vs_dense')]:.2f}× | "
                f"{'yes' if same == 1.0 else 'no'} |"
            )
    return "\n".join(lines)


def pipeline_table(rows: list[dict]) -> str:
    rows = _latest_run(rows)
    get = {(r["op"], r["provider"], r["metric"]): float(r["median"]) for r in rows}
    env = rows[0]
    lines = [
        f"{env['device']}, {env['date']} (commit {env['commit']}); {env['shape']}",
        "",
        "| pipeline | run by | total (s) | activation statistic (s) | mask selection (s) "
        "| calibration forwards + rest (s) | llm-compressor time / this |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    ops_ = list(dict.fromkeys(r["op"] for r in rows if r["op"].startswith("wanda")))
    for op in ops_:
        base = get.get((op, "llmcompressor", "time"))
        for prov in ("ecoflap_fast", "llmcompressor", "llmcompressor+ecoflap_fast"):
            t = get.get((op, prov, "time"))
            if t is None:
                continue
            ratio = f"**{base / t:.2f}×**" if base and prov != "llmcompressor" else ("1" if base else "-")
            lines.append(
                f"| {op} | {prov} | {t:.1f} | {get[(op, prov, 'statistics_s')]:.2f} | "
                f"{get[(op, prov, 'selection_s')]:.2f} | {get[(op, prov, 'rest_s')]:.1f} | {ratio} |"
            )
    checks = []
    for op in ops_:
        same = get.get((op, "backend_vs_llmcompressor", "differing_weights"))
        ours = get.get((op, "ecoflap_fast_vs_llmcompressor", "differing_weights"))
        block0 = get.get((op, "ecoflap_fast_vs_llmcompressor_block0", "differing_weights"))
        if same is not None:
            checks.append(
                f"- {op}: llm-compressor with this engine as its backend vs without: **{int(same)}** differing "
                f"weights; this engine vs llm-compressor: {int(ours)} differing ({int(block0)} in block 0)"
            )
    fast = get.get(("ecoflap-zo", "ecoflap_fast", "time"))
    if fast is not None:
        ref_t = get[("ecoflap-zo", "reference", "time")]
        s1, s2 = get[("ecoflap-zo", "ecoflap_fast", "stage1_s")], get[("ecoflap-zo", "ecoflap_fast", "stage2_s")]
        checks.append(
            f"- ECoFLaP-zo end to end: fast {fast:.1f} s (stage 1 {s1:.1f} s, "
            f"stage 2 {s2:.1f} s) vs reference {ref_t:.1f} s "
            f"(stage 1 {get[('ecoflap-zo', 'reference', 'stage1_s')]:.1f} s, scaled from "
            f"{get[('ecoflap-zo', 'reference', 'stage1_measured_s')]:.1f} s measured on one block; stage 2 "
            f"{get[('ecoflap-zo', 'reference', 'stage2_s')]:.1f} s): **{ref_t / fast:.1f}×**"
        )
    return "\n".join(lines + [""] + checks)


def arch_table(rows: list[dict]) -> str:
    rows = _latest_run(rows)
    env = rows[0]
    by = defaultdict(dict)
    shapes = {}
    for r in rows:
        by[r["op"]][r["metric"]] = float(r["median"])
        shapes[r["op"]] = r["shape"]
    lines = [
        f"{env['device']}, {env['date']} (commit {env['commit']}); tiny random configs of the real classes, "
        "uniform Wanda and ECoFLaP-zo at 0.5",
        "",
        "| model | class: stacks (blocks) | prunable matrices | share of block matrices | mask agreement "
        "with the naive oracle (min) | zeros, uniform | zeros, ECoFLaP-zo | time uniform / naive / ECoFLaP-zo (s) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, m in by.items():
        lines.append(
            f"| {name} | {shapes[name]} | {m['matrices']:.0f} | {m['coverage']:.1%} | {m['agreement_min']:.4f} | "
            f"{m['zeros_uniform']:.4f} | {m['zeros_ecoflap_zo']:.4f} | "
            f"{m['time_uniform_s']:.2f} / {m['time_naive_s']:.2f} / {m['time_ecoflap_zo_s']:.2f} |"
        )
    return "\n".join(lines)


def depth_table(rows: list[dict]) -> str:
    out = []
    for model in sorted({r["shape"].split(",")[0] for r in rows}):
        mine = _latest_per_key([r for r in rows if r["shape"].startswith(model + ",")])
        env = mine[0]
        ppl = defaultdict(dict)
        speed = defaultdict(dict)
        extra = []
        for r in mine:
            k = r["shape"].split("K=")[-1].split()[0] if "K=" in r["shape"] else None
            if r["op"] == "perplexity":
                ppl[int(k)][r["provider"]] = float(r["median"])
            elif r["op"] in ("prefill_512", "decode_32", "ideal_speedup"):
                speed[int(k)][r["op"]] = float(r["median"])
            elif r["op"] in ("depth_plus_width", "width_only"):
                extra.append((r["op"], r["provider"], r["shape"].split(", ", 1)[1], float(r["median"])))
        scorers = [s for s in ("iterative", "bi", "ecoflap", "last") if any(s in v for v in ppl.values())]
        dense = ppl.get(0, {}).get("dense")
        out += [
            f"**{model}** ({env['device']}, {env['date']}, commit {env['commit']}); dense perplexity **{dense:.2f}**",
            "",
            "| K removed | " + " | ".join(scorers) + " |",
            "|---:|" + "---:|" * len(scorers),
        ]
        for k in sorted(k for k in ppl if k):
            out.append(f"| {k} | " + " | ".join(f"{ppl[k].get(s, float('nan')):.1f}" for s in scorers) + " |")
        if speed:
            base = speed.get(0, {})
            out += [
                "",
                "| K removed (iterative) | prefill 512 (ms) | speed-up | decode 32 (ms) | speed-up | ideal |",
                "|---:|---:|---:|---:|---:|---:|",
            ]
            for k in sorted(speed):
                v = speed[k]
                out.append(
                    f"| {k} | {v['prefill_512']:.0f} | {base['prefill_512'] / v['prefill_512']:.2f}× | "
                    f"{v['decode_32']:.0f} | {base['decode_32'] / v['decode_32']:.2f}× | "
                    f"{v.get('ideal_speedup', 1.0):.2f}× |"
                )
        if extra:
            out += ["", "| same remaining block weights | perplexity |", "|---|---:|"]
            for op, prov, shape, v in extra:
                what = (
                    f"depth ({shape}) + uniform width" if op == "depth_plus_width" else f"width only, {prov} ({shape})"
                )
                out.append(f"| {what} | {v:.1f} |")
        out.append("")
    return "\n".join(out).rstrip()


def _scale_cells(rows: list[dict]) -> list[tuple[str, str, dict]]:
    """[(checkpoint, run, {op: value, "commit": ..., "date": ...})] by checkpoint size, then run."""
    by = defaultdict(dict)
    for r in _latest_per_key(rows):
        cell = by[(r["shape"], r["provider"])]
        cell[r["op"]] = float(r["median"])
        cell["commit"], cell["date"] = r["commit"], r["date"]
    size = lambda shape: float(shape.split("(")[1].split()[0])  # noqa: E731
    return [(s, p, m) for (s, p), m in sorted(by.items(), key=lambda kv: (size(kv[0][0]), kv[0][1]))]


def scale_table(rows: list[dict]) -> str:
    cells = _scale_cells(rows)
    lines = [
        f"{rows[-1]['device']}; each row from its latest run",
        "",
        "| checkpoint | run | peak RSS (GiB) | announced peak (GiB) | wall time (s) | achieved sparsity "
        "| masks as 1 rank's | measured |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for shape, prov, m in cells:
        announced = f"{m['estimated_peak']:.2f}" if "estimated_peak" in m else "–"
        agree = f"{m['mask_agreement']:.6f}" if "mask_agreement" in m else "–"
        lines.append(
            f"| {shape} | {prov} | {m['peak_rss']:.2f} | {announced} | {m['wall_time']:.0f} "
            f"| {m.get('achieved_sparsity', 0):.4f} | {agree} | {m['date']}, {m['commit']} |"
        )
    return "\n".join(lines)


def scale_plot(rows: list[dict], path: Path) -> None:
    """Peak resident memory per checkpoint, one bar per run kind, the checkpoint's own bf16 size and
    its fp32 size (what an in-memory run holds) as marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _scale_cells(rows)
    if not cells:
        return
    shapes = list(dict.fromkeys(s for s, _, _ in cells))
    runs = list(dict.fromkeys(p for _, p, _ in sorted(cells, key=lambda c: c[1])))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(runs)
    for j, run in enumerate(runs):
        xs, ys = [], []
        for i, shape in enumerate(shapes):
            m = next((m for s, p, m in cells if s == shape and p == run), None)
            if m is not None:
                xs.append(i + (j - (len(runs) - 1) / 2) * width)
                ys.append(m["peak_rss"])
        bars = ax.bar(xs, ys, width, label=run)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    for i, shape in enumerate(shapes):
        bf16 = float(shape.split("(")[1].split()[0])
        ax.hlines(bf16, i - 0.45, i + 0.45, colors="k", linestyles=":", lw=1)
        ax.hlines(2 * bf16, i - 0.45, i + 0.45, colors="r", linestyles="--", lw=1)
    ax.plot([], [], "k:", label="checkpoint (bf16)")
    ax.plot([], [], "r--", label="weights in fp32")
    ax.set_xticks(range(len(shapes)), [s.split(" (")[0] for s in shapes])
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("uniform Wanda 0.5, 8 x 128 calibration tokens, fp32 compute", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    sections = []
    for csv_path in sorted(RESULTS_DIR.glob("ops_*.csv")):
        rows = read_results(csv_path)
        if not rows:
            continue
        png = RESULTS_DIR / f"{csv_path.stem}.png"
        speedup_plot(rows, png)
        sections.append(f"### {csv_path.name}\n\n{ops_table(rows)}\n\n![speed-ups](results/{png.name})\n")
    text = README.read_text() if README.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(
        f"{head}{BEGIN}\n<!-- generated by benchmarks/report.py from benchmarks/results/*.csv -->\n\n"
        + "\n".join(sections)
        + f"\n{END}{tail}"
    )
    print(f"updated {README}")
    top = README.parent.parent / "README.md"
    cpu = RESULTS_DIR / "ops_cpu.csv"
    if top.exists() and cpu.exists() and "<!-- readme-ops:begin -->" in top.read_text():
        _replace_between(top, "<!-- readme-ops:begin -->", "<!-- readme-ops:end -->", summary_table(read_results(cpu)))
        print(f"updated {top}")
    pipelines = RESULTS_DIR / "pipeline_cpu.csv"
    if pipelines.exists():
        from ecoflap_fast.bench import pipeline

        rows = _latest_run(read_results(pipelines))
        title = f"{rows[0]['shape']} ({rows[0]['device']}, commit {rows[0]['commit']})"
        pipeline.plot(pipeline.summary_from_rows(rows), pipelines.with_suffix(".png"), title)
    quality = RESULTS_DIR / "quality_cpu.csv"
    if quality.exists():
        quality_plot(read_results(quality), quality.with_suffix(".png"))
    scale = RESULTS_DIR / "scale_cpu.csv"
    if scale.exists():
        scale_plot(read_results(scale), scale.with_suffix(".png"))
    for name, marker, table in [
        ("quality_cpu.csv", "readme-quality", quality_table),
        ("stage1_cpu.csv", "readme-stage1", stage1_table),
        ("export_cpu.csv", "readme-export", export_table),
        ("pipeline_cpu.csv", "readme-pipeline", pipeline_table),
        ("arch_cpu.csv", "readme-arch", arch_table),
        ("depth_cpu.csv", "readme-depth", depth_table),
        ("scale_cpu.csv", "readme-scale", scale_table),
        ("dtype_cpu.csv", "readme-dtype", dtype_table),
    ]:
        path = RESULTS_DIR / name
        if top.exists() and path.exists() and f"<!-- {marker}:begin -->" in top.read_text():
            _replace_between(top, f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->", table(read_results(path)))
            print(f"updated {top} ({marker})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
