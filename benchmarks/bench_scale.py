"""Models bigger than the machine: peak resident memory and wall time of a prune run in memory and
streamed (``--stream``), on random LLaMA-shaped bf16 checkpoints generated on disk block by block.

    python benchmarks/bench_scale.py --sizes 0.5b 1.1b 3b            # in memory vs streamed
    python benchmarks/bench_scale.py --sizes 7b --modes stream       # LLaMA-2-7B shapes on this machine
    python benchmarks/bench_scale.py --sizes 1.1b --modes stream --ranks 1 2

Every run is a fresh ``ecoflap-fast prune`` process (uniform Wanda at 0.5, 8 calibration windows of
128 tokens from the wiki split, SmolLM2's tokenizer); peak memory is the process's own peak RSS
(``getrusage``), or the sum over ranks' peaks for torchrun runs; time is the wall time of the whole
process. In-memory runs pass ``--no-stream`` (no automatic switch); runs with several ranks are
compared with the one-rank run (mask agreement). The checkpoint is generated once per size into
``--work`` (not a repository folder).
Appends rows to benchmarks/results/scale_cpu.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import RESULTS_DIR  # noqa: E402
from ecoflap_fast.bench.harness import Results  # noqa: E402

# hidden, intermediate, layers, heads, kv heads (vocabulary: SmolLM2's 49,152 tokens, untied head)
SIZES = {
    "0.5b": (1024, 2816, 32, 16, 16),
    "1.1b": (2048, 5632, 22, 32, 4),
    "3b": (3072, 8192, 28, 24, 8),
    "7b": (4096, 11008, 32, 32, 32),
}

_RUNNER = r"""
import resource, sys, time
t = time.perf_counter()
from ecoflap_fast.cli import main
rc = main(sys.argv[1:])
print(f"@@peak_rss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} wall_s={time.perf_counter() - t:.2f}")
sys.exit(rc)
"""


def generate(size: str, folder: Path) -> Path:
    """A random LLaMA-shaped bf16 checkpoint written tensor by tensor (never the whole model in memory)."""
    from transformers import LlamaConfig

    from ecoflap_fast import checkpoint, models

    if (folder / "config.json").is_file():
        return folder
    hidden, inter, layers, heads, kv = SIZES[size]
    vocab = 49152
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    tmp = folder.with_name(folder.name + ".tmp")
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv * head_dim, hidden)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv * head_dim, hidden)
        shapes[f"{p}.self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    writer = checkpoint.ShardWriter(tmp, [(n, torch.bfloat16, s) for n, s in shapes.items()])
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():  # norms are ones, matrices N(0, 0.02)
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(*shape, generator=g) * 0.02
        writer.add(name, t.to(torch.bfloat16))
    writer.close()
    cfg.save_pretrained(tmp)
    _, tok = models.load_model("default")
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def run(folder: Path, out: Path, mode: str, ranks: int, dtype: str, nsamples: int) -> tuple[float, float, str]:
    args = [
        "prune",
        "--model",
        str(folder),
        "--allocator",
        "uniform",
        "--sparsity",
        "0.5",
        "--nsamples",
        str(nsamples),
        "--seqlen",
        "128",
        "--batch-size",
        "4",
        "--dtype",
        dtype,
        "--output",
        str(out),
        "--force",
        "--no-progress",
    ]
    args += ["--stream"] if mode == "stream" else ["--no-stream", "--save-model"]  # no automatic switch
    if ranks == 1:
        cmd = [sys.executable, "-c", _RUNNER, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(ranks),
            "--no-python",
            sys.executable,
            "-c",
            _RUNNER,
            *args,
        ]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // ranks)))
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    peaks = [int(line.split("peak_rss_kib=")[1].split()[0]) for line in proc.stdout.splitlines() if "@@peak" in line]
    return sum(peaks) * 1024, wall, proc.stderr


def mask_agreement(a: Path, b: Path) -> tuple[float, int, int]:
    """(fraction of weights whose pruned/kept state agrees, matrices written bit-identically, matrices)
    between two pruned checkpoints of the same model, compared tensor by tensor."""
    from safetensors import safe_open

    maps = [json.loads((d / "model.safetensors.index.json").read_text())["weight_map"] for d in (a, b)]
    if set(maps[0]) != set(maps[1]):
        raise ValueError(f"{a} and {b} hold different tensors")
    same = total = identical = count = 0
    for name in sorted(n for n in maps[0] if n.endswith("proj.weight")):
        with safe_open(str(a / maps[0][name]), "pt") as fa, safe_open(str(b / maps[1][name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        same += int(((x == 0) == (y == 0)).sum())
        total += x.numel()
        identical += bool(torch.equal(x, y))
        count += 1
    return same / total, identical, count


def estimated_peak(stderr: str) -> float | None:
    """The peak the engine announced before the run (bytes, summed over ranks: each announces its
    own), from its streaming message."""
    found = re.findall(r"estimated peak ([\d.]+) (GiB|MiB|KiB)", stderr)
    return sum(float(v) * {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10}[u] for v, u in found) if found else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["0.5b", "1.1b", "3b"], choices=list(SIZES))
    p.add_argument("--modes", nargs="+", default=["memory", "stream"], choices=["memory", "stream"])
    p.add_argument(
        "--ranks", type=int, nargs="+", default=[1], help="with 1 first, later rank counts are compared with it"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ecoflap-scale")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "scale_cpu.csv")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    res = Results("scale", "cpu")
    for size in a.sizes:
        t = time.perf_counter()
        folder = generate(size, a.work / f"llama-{size}")
        ck_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"{size}: checkpoint {ck_bytes / 2**30:.2f} GiB bf16 ({time.perf_counter() - t:.0f}s)", flush=True)
        for mode in a.modes:
            for ranks in a.ranks:
                peak, wall, stderr = run(
                    folder, a.work / f"out-{size}-{mode}-{ranks}", mode, ranks, a.dtype, a.nsamples
                )
                shape = f"llama-{size} ({ck_bytes / 2**30:.2f} GiB bf16), {a.nsamples}x128 tokens"
                provider = f"{mode}, {ranks} rank{'s' if ranks > 1 else ''}"
                res.add("peak_rss", provider, shape, a.dtype, "memory", "GiB", peak / 2**30)
                res.add("wall_time", provider, shape, a.dtype, "time", "s", wall)
                announced = estimated_peak(stderr)
                if announced is not None:
                    res.add("estimated_peak", provider, shape, a.dtype, "memory", "GiB", announced / 2**30)
                rep = json.loads((a.work / f"out-{size}-{mode}-{ranks}" / "report.json").read_text())
                res.add("achieved_sparsity", provider, shape, a.dtype, "sparsity", "ratio", rep["achieved_sparsity"])
                print(
                    f"  {provider:18s} peak RSS {peak / 2**30:6.2f} GiB, wall {wall:7.1f}s, achieved "
                    f"{rep['achieved_sparsity']:.4f}",
                    flush=True,
                )
                if ranks > 1 and 1 in a.ranks:  # the one-process run of this mode came first
                    agree, identical, count = mask_agreement(
                        a.work / f"out-{size}-{mode}-1" / "model", a.work / f"out-{size}-{mode}-{ranks}" / "model"
                    )
                    res.add("mask_agreement", provider, shape, a.dtype, "agreement", "ratio", agree)
                    print(
                        f"  {provider:18s} masks agree with 1 rank's on {agree:.6f} of the weights; "
                        f"{identical}/{count} matrices bit-identical",
                        flush=True,
                    )
                res.write(a.out)
                res.rows.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
