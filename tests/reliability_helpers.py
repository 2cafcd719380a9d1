"""Shared pieces of the reliability tests: a saved tiny model folder, CLI arguments, subprocess runs
with their peak RSS, and what a complete output looks like."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(HERE))
CLI = [sys.executable, "-m", "ecoflap_fast"]


def make_tiny_folder(root: Path, name: str = "tiny") -> Path:
    from tiny_models import tiny_llama, word_text, word_tokenizer

    folder = root / name
    tiny_llama(hidden=64).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    if not (root / "calib.txt").exists():
        (root / "calib.txt").write_text(word_text(3000, seed=1))
        (root / "eval.txt").write_text(word_text(2000, seed=2))
    return folder


def prune_args(root: Path, model: Path, out, *extra) -> list[str]:
    return [
        "prune",
        "--model",
        str(model),
        "--calib-text",
        str(root / "calib.txt"),
        "--eval-text",
        str(root / "eval.txt"),
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--allocator",
        "uniform",
        "--no-progress",
        "--output",
        str(out),
        *extra,
    ]


def run_cli(args, *, stdin: str | None = None, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, env=env or ENV, timeout=timeout)


def peak_rss_run(cmd, *, env=None, timeout=300) -> tuple[int, str, str, float]:
    """(exit status, stdout, stderr, peak RSS in GiB) of a subprocess, from its own rusage (wait4)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env or ENV)
        t = time.time()
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.time() - t > timeout:
                p.kill()
            time.sleep(0.02)
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        return p.returncode, fo.read(), fe.read(), ru.ru_maxrss / 2**20


def output_state(out: Path) -> str | None:
    """'seed N' of a complete prune output (report, plot, saved model whose weights parse), None when
    there is no output, 'INCOMPLETE' when something is missing or damaged."""
    if not os.path.lexists(out):
        return None
    try:
        rep = json.loads((out / "report.json").read_text())
        assert (out / "sparsity.png").stat().st_size > 0
        from ecoflap_fast._untrusted import safetensors_folder

        assert safetensors_folder(out / "model")
        json.loads((out / "model" / "config.json").read_text())
        return f"seed {rep['seed']}"
    except Exception:
        return "INCOMPLETE"


def siblings(out: Path) -> list[str]:
    """Names beside ``out`` that belong to it (its temporaries, lock)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr
    return lines[0]
