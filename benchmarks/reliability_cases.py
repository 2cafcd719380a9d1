"""Issue 16's cases, run as a user would (the command line in subprocesses, on the tiny Llama of
tests/tiny_models.py), each reporting what happened: the measured before/after table of
docs/RELIABILITY.md.

    python benchmarks/reliability_cases.py LABEL [case ...]
        -> benchmarks/results/reliability_LABEL.json ({case: observation}); a scratch folder under /tmp

``reliability_before.json`` was measured on the code before the issue's changes, ``reliability_after.json``
after them. Some cases inject faults (a kill between two renames, a barrier before the final rename)
by patching the engine inside the child process; they adapt to the code they find.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
ROOT = Path(os.environ.get("ECOFLAP_RELIABILITY_WORK") or tempfile.mkdtemp(prefix="ecoflap-reliability-"))
PY = sys.executable
CLI = [sys.executable, "-m", "ecoflap_fast"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(TESTS))
TINY = ROOT / "tiny"
CAL = ROOT / "calib.txt"
EV = ROOT / "eval.txt"
BASE = ["--calib-text", str(CAL), "--eval-text", str(EV), "--nsamples", "4", "--seqlen", "16", "--no-progress"]
UNI = ["--allocator", "uniform"]


def setup() -> None:
    if (TINY / "config.json").is_file():
        return
    sys.path.insert(0, str(TESTS))
    from tiny_models import tiny_llama, word_text, word_tokenizer

    tiny_llama(hidden=64, layers=2).save_pretrained(TINY)
    word_tokenizer().save_pretrained(TINY)
    CAL.write_text(word_text(3000, seed=1))
    EV.write_text(word_text(2000, seed=2))


def run(args, cwd=None, stdin=None, timeout=300, env=None):
    t = time.time()
    p = subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout, env=env or ENV)
    return p.returncode, p.stdout, p.stderr, time.time() - t


def rusage_run(args, timeout=600, rss_kill_gb=None):
    """(rc, stdout, stderr, peak RSS GiB, seconds, killed); kill when RSS passes rss_kill_gb."""
    import tempfile

    import psutil

    t = time.time()
    fo, fe = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    p = subprocess.Popen(args, stdout=fo, stderr=fe, text=True, env=ENV)
    killed = False
    pp = psutil.Process(p.pid)
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        try:
            if (rss_kill_gb and pp.memory_info().rss > rss_kill_gb * 2**30) or time.time() - t > timeout:
                p.kill()
                killed = True
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    p.returncode = os.waitstatus_to_exitcode(status)
    fo.seek(0)
    fe.seek(0)
    return p.returncode, fo.read(), fe.read(), ru.ru_maxrss / 2**20, time.time() - t, killed


def tail(s, n=3):
    lines = [ln for ln in s.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


def tb(s):
    return "Traceback" in s


def fresh(name):
    d = ROOT / "work" / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def listing(d):
    return sorted(p.name for p in Path(d).iterdir()) if Path(d).exists() else None


def complete(out, model=True):
    out = Path(out)
    ok = (out / "report.json").is_file() and (out / "sparsity.png").is_file()
    if model:
        ok = ok and (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    return ok


# ---------------------------------------------------------------------------------------------------------
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def dest_concurrent():
    """Two runs with the same --output (--save-model --force) started together, 3 trials."""
    d = fresh("concurrent")
    out = d / "out"
    res = []
    for trial in range(6):
        if out.exists() and trial < 3:
            shutil.rmtree(out)
        cmd = [*CLI, "prune", "--model", str(TINY), *BASE, *UNI, "--save-model", "--force", "--output", str(out)]
        ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in "ab"]
        rcs, errs = [], []
        for p in ps:
            o, e = p.communicate()
            rcs.append(p.returncode)
            errs.append(tail(e, 1))
        res.append(
            f"trial {trial} ({'no' if trial < 3 else 'an'} earlier output): exit codes {rcs}, "
            f"output complete={complete(out)}, siblings={listing(d)}, stderr={[e[:160] for e in errs]}"
        )
    return "cmd: 2x `ecoflap-fast prune --model tiny ... --save-model --force --output out` at once\n" + "\n".join(res)


def _protect(name, out_of, cwd_of=None):
    d = fresh(name)
    shutil.copytree(TINY, d / "anc" / "tiny")
    (d / "anc" / "precious.txt").write_text("user data")
    model = d / "anc" / "tiny"
    out = out_of(d)
    cwd = cwd_of(d) if cwd_of else d
    rc, o, e, s = run([*CLI, "prune", "--model", str(model), *BASE, *UNI, "--force", "--output", out], cwd=cwd)
    alive = (model / "model.safetensors").is_file()
    return (
        f"cmd: prune --model {model.relative_to(d)} --force --output {out!r} (cwd {Path(cwd).relative_to(d) or '.'})"
        f"\nexit {rc}; model weights still there={alive}; precious.txt there={(d / 'anc' / 'precious.txt').exists()}"
        f"; traceback={tb(e)}; stderr: {tail(e, 1)[:300]}"
    )


@case
def dest_model_folder():
    return _protect("modelfolder", lambda d: str(d / "anc" / "tiny"))


@case
def dest_ancestor():
    return _protect("ancestor", lambda d: str(d / "anc"))


@case
def dest_dot():
    return _protect("dot", lambda d: ".", lambda d: d / "anc")


@case
def dest_empty():
    return _protect("empty", lambda d: "", lambda d: d / "anc")


@case
def dest_inside_model():
    d = fresh("inside")
    shutil.copytree(TINY, d / "tiny")
    before = listing(d / "tiny")
    rc, o, e, s = run([*CLI, "prune", "--model", str(d / "tiny"), *BASE, *UNI, "--output", str(d / "tiny" / "out")])
    return (
        f"cmd: prune --model tiny --output tiny/out\nexit {rc}; model folder before {before} after "
        f"{listing(d / 'tiny')}; stderr: {tail(e, 1)[:300]}"
    )


@case
def dest_is_file():
    d = fresh("isfile")
    (d / "notes.txt").write_text("user notes")
    rc, o, e, s = run([*CLI, "prune", "--model", str(TINY), *BASE, *UNI, "--force", "--output", str(d / "notes.txt")])
    return (
        f"cmd: prune --force --output notes.txt (an existing file)\nexit {rc}; notes.txt is "
        f"{'a file' if (d / 'notes.txt').is_file() else ('a folder' if (d / 'notes.txt').is_dir() else 'gone')}; "
        f"siblings={listing(d)}; stderr: {tail(e, 1)[:300]}"
    )


KILL_BETWEEN = r"""
import os, signal, sys
from pathlib import Path
real = os.replace
calls = []
def replace(a, b):
    calls.append((a, b))
    real(a, b)
    if len(calls) == 1 and str(b).endswith(tuple('0123456789')) or '.old' in str(b):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from ecoflap_fast import _fs
_fs.os.replace = replace
from ecoflap_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


KILL_FALLBACK = r"""
import os, signal, sys
from ecoflap_fast import _fs
_fs._renameat2 = lambda *a: False  # an OS without rename-exchange: the two-rename fallback
real = os.rename
def rename(a, b):
    real(a, b)
    if ".old-" in str(b):
        os.kill(os.getpid(), signal.SIGKILL)
_fs.os.rename = rename
from ecoflap_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


@case
def dest_kill_fallback_recovery():
    """Without renameat2: SIGKILL between the fallback's two renames, then the next run on the output."""
    d = fresh("killfallback")
    out = d / "out"
    args = ["prune", "--model", str(TINY), *BASE, *UNI, "--save-model", "--force", "--output", str(out)]
    rc, *_ = run([*CLI, *args])
    assert rc == 0 and complete(out)
    rc, o, e, s = run([PY, "-c", KILL_FALLBACK, *args])
    mid = f"out complete={complete(out)}, siblings={listing(d)}"
    rc2, o2, e2, _ = run([*CLI, "prune", "--model", str(TINY), *BASE, *UNI, "--output", str(d / "other")])
    rc3, o3, e3, _ = run([*CLI, *args[:-2], "--output", str(out)])
    return (
        "cmd: `prune --save-model --force --output out` with renameat2 disabled, SIGKILL between its two renames; "
        f"then another run on the same output\nkilled run: exit {rc}; {mid}\nnext run on out: exit {rc3}; out "
        f"complete={complete(out)}; siblings={listing(d)}"
    )


@case
def dest_kill_between_renames():
    """SIGKILL right after the first of the two renames of a replace (injected into os.replace)."""
    d = fresh("killbetween")
    out = d / "out"
    rc, *_ = run([*CLI, "prune", "--model", str(TINY), *BASE, *UNI, "--save-model", "--output", str(out)])
    assert rc == 0 and complete(out)
    rc, o, e, s = run(
        [
            PY,
            "-c",
            KILL_BETWEEN,
            "prune",
            "--model",
            str(TINY),
            *BASE,
            *UNI,
            "--save-model",
            "--force",
            "--output",
            str(out),
        ]
    )
    return (
        "cmd: a second `prune --save-model --force --output out` killed (SIGKILL) right after the first rename of "
        f"its replace\nexit {rc}; out complete={complete(out)}; siblings={listing(d)}"
    )


def _interrupt(sig, name, save=True):
    d = fresh(name)
    out = d / "out"
    rc, *_ = run([*CLI, "prune", "--model", str(TINY), *BASE, *UNI, "--save-model", "--output", str(out)])
    before = complete(out)
    cmd = [*CLI, "prune", "--model", str(TINY), *BASE, *UNI, "--save-model", "--force", "--output", str(out)]
    # a slow part: --eval with many windows keeps the run busy; the signal arrives once a temp folder exists or
    # after a fixed delay
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    t = time.time()
    while time.time() - t < 60 and not [x for x in d.iterdir() if x.name.startswith(".out.tmp-")]:
        time.sleep(0.002)
    os.kill(p.pid, sig)
    o, e = p.communicate()
    return (
        f"cmd: prune --save-model --force --output out, {signal.Signals(sig).name} once the temporary folder exists"
        f"\nexit {p.returncode}; old output was complete={before}, now complete={complete(out)}; "
        f"siblings={listing(d)}; traceback={tb(e)}; stderr last: {tail(e, 1)[:200]}"
    )


@case
def dest_sigterm_debris():
    return _interrupt(signal.SIGTERM, "sigterm")


@case
def dest_sigkill_debris():
    return _interrupt(signal.SIGKILL, "sigkill")


@case
def ctrl_c():
    """SIGINT in the middle of a run (during stage 1 / 2 of a larger model)."""
    d = fresh("ctrlc")
    cmd = [
        *CLI,
        "prune",
        "--model",
        str(TINY),
        "--calib-text",
        str(CAL),
        "--eval-text",
        str(EV),
        "--nsamples",
        "64",
        "--seqlen",
        "64",
        "--eval",
        "--eval-windows",
        "30",
        "--eval-seqlen",
        "64",
        "--output",
        str(d / "out"),
        "--no-progress",
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(5.5)
    p.send_signal(signal.SIGINT)
    o, e = p.communicate()
    lines = [ln for ln in e.strip().splitlines() if ln.strip()]
    return (
        f"cmd: prune ... --eval; SIGINT after 5.5 s\nexit {p.returncode}; traceback={tb(e)}; "
        f"stderr lines={len(lines)}; last: {tail(e, 1)[:200]}; siblings={listing(d)}"
    )


BARRIER = r"""
import os, sys, time
from pathlib import Path
barrier = Path(sys.argv[1]); n = int(sys.argv[2])
from ecoflap_fast import _fs
def wait():
    barrier.joinpath(str(os.getpid())).touch()
    t = time.time()
    while len(list(barrier.iterdir())) < n and time.time() - t < 10:
        time.sleep(0.0005)
if hasattr(_fs, "_commit"):  # after: hold both just before the one-step replace
    real_commit = _fs._commit
    def commit(tmp, out, force):
        wait()
        return real_commit(tmp, out, force)
    _fs._commit = commit
else:  # before: just before the final os.replace(tmp, out)
    real = os.replace
    def replace(a, b):
        if '.tmp-' in str(a) and not str(b).endswith(tuple('0123456789')) and '.old' not in str(b):
            wait()
        return real(a, b)
    _fs.os.replace = replace
from ecoflap_fast.report import write_output
try:
    write_output(Path(sys.argv[3]), {"target_sparsity": 0.5, "layer_sparsity": {"a.0.x": 0.5}, "allocator": "u",
                 "pruner": "w", "pattern": "u", "achieved_sparsity": 0.5}, force=True)
    print("ok")
except Exception as e:
    print(type(e).__name__, e)
"""


@case
def dest_rename_collision():
    """Two processes held at a barrier just before the final rename of the same output (20 trials)."""
    d = fresh("collide")
    outcomes = {}
    for trial in range(10):
        b = d / f"barrier{trial}"
        b.mkdir()
        out = d / "out"
        cmd = [PY, "-c", BARRIER, str(b), "2", str(out)]
        ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in "ab"]
        import re

        res = tuple(sorted(re.sub(r"tmp-\\w+", "tmp-*", p.communicate()[0].strip())[:90] for p in ps))
        outcomes[str(res)] = outcomes.get(str(res), 0) + 1
        shutil.rmtree(b)
    return (
        "cmd: 2 processes write_output(out, force=True), released together just before the final rename, 10 trials"
        f"\noutcomes: {outcomes}; debris: {[n for n in listing(d) if n.startswith('.')]}"
    )


def _umask():
    u = os.umask(0)
    os.umask(u)
    return oct(u)


@case
def dest_modes():
    d = fresh("modes")
    rc, *_ = run([*CLI, "prune", "--model", str(TINY), *BASE, *UNI, "--save-model", "--output", str(d / "out")])
    m = lambda p: oct(p.stat().st_mode & 0o777)
    return (
        f"cmd: prune --save-model --output out (umask {_umask()})\nout {m(d / 'out')}, out/model "
        f"{m(d / 'out' / 'model')}, model.safetensors {m(d / 'out' / 'model' / 'model.safetensors')}, report.json "
        f"{m(d / 'out' / 'report.json')}"
    )


HOSTILE_CODE = """
from pathlib import Path
Path(MARKER_PATH).write_text("foreign code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class HostileConfig(LlamaConfig):
    model_type = "hostile"
class HostileModel(LlamaForCausalLM):
    config_class = HostileConfig
"""


def hostile_folder(d):
    h = d / "hostile"
    shutil.copytree(TINY, h)
    cfg = json.loads((h / "config.json").read_text())
    cfg["model_type"] = "hostile"
    cfg["architectures"] = ["HostileModel"]
    cfg["auto_map"] = {"AutoConfig": "hostile_code.HostileConfig", "AutoModelForCausalLM": "hostile_code.HostileModel"}
    (h / "config.json").write_text(json.dumps(cfg))
    (h / "hostile_code.py").write_text(HOSTILE_CODE.replace("MARKER_PATH", repr(str(h / "MARKER"))))
    return h


@case
def code_hostile_model():
    d = fresh("hostile")
    h = hostile_folder(d)
    lines = []
    for answer in ["n\n", "y\n"]:
        (h / "MARKER").unlink(missing_ok=True)
        rc, o, e, s = run(
            [
                *CLI,
                "eval",
                "--model",
                str(h),
                "--eval-text",
                str(EV),
                "--eval-windows",
                "1",
                "--eval-seqlen",
                "16",
                "--no-progress",
            ],
            stdin=answer,
        )
        prompt = "[y/N]" in o or "[y/N]" in e
        lines.append(
            f"stdin {answer.strip()!r}: exit {rc}, prompt shown={prompt}, MARKER written={(h / 'MARKER').exists()}"
            f", stderr: {tail(e, 1)[:160]}"
        )
    return "cmd: echo y|n | ecoflap-fast eval --model hostile (config auto_map -> hostile_code.py)\n" + "\n".join(lines)


PICKLE = r"""
import pickle, torch, sys, os
class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"model.embed_tokens.weight": Evil()}, sys.argv[1])
"""


@case
def code_pickle_checkpoint():
    d = fresh("pickle")
    f = d / "binonly"
    f.mkdir()
    shutil.copy(TINY / "config.json", f)
    for t in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / t, f)
    subprocess.run([PY, "-c", PICKLE, str(f / "pytorch_model.bin"), str(d / "PICKLE_MARKER")], check=True, env=ENV)
    rc, o, e, s = run(
        [
            *CLI,
            "eval",
            "--model",
            str(f),
            "--eval-text",
            str(EV),
            "--eval-windows",
            "1",
            "--eval-seqlen",
            "16",
            "--no-progress",
        ]
    )
    return (
        f"cmd: eval --model binonly (pytorch_model.bin whose pickle runs `touch MARKER`)\nexit {rc}; marker "
        f"written={(d / 'PICKLE_MARKER').exists()}; traceback={tb(e)}; stderr: {tail(e, 1)[:200]}"
    )


@case
def export_torch24_as_model():
    d = fresh("t24model")
    out = d / "out"
    rc, o, e, s = run(
        [
            *CLI,
            "prune",
            "--model",
            str(TINY),
            *BASE,
            *UNI,
            "--pattern",
            "2:4",
            "--export",
            "torch-24",
            "--save-model",
            "--output",
            str(out),
        ]
    )
    assert rc == 0, e
    ev = ["--eval-text", str(EV), "--eval-windows", "2", "--eval-seqlen", "32", "--no-progress"]
    rc1, o1, e1, _ = run([*CLI, "eval", "--model", str(out / "model"), *ev])
    rc2, o2, e2, _ = run([*CLI, "eval", "--model", str(out / "torch-24"), *ev])
    rc3, o3, e3, _ = run(
        [*CLI, "export", "--model", str(out / "torch-24"), "--format", "hf-dense", "--output", str(d / "re")]
    )
    code = (
        "import sys, torch, warnings; warnings.simplefilter('ignore'); from ecoflap_fast import models\n"
        "from safetensors.torch import load_file\n"
        "ref = load_file(sys.argv[2] + '/model.safetensors')['model.layers.0.self_attn.q_proj.weight']\n"
        "m, _ = models.load_model(sys.argv[1])\n"
        "w = m.model.layers[0].self_attn.q_proj.weight.to(ref.dtype)\n"
        "print(f'q_proj as loaded by --model: {float((w == 0).float().mean()):.3f} zeros (pruned: "
        "{float((ref == 0).float().mean()):.3f}), max |diff| to the pruned weights {float((w - ref).abs().max()):.3g}')"
    )
    r4 = subprocess.run(
        [PY, "-c", code, str(out / "torch-24"), str(out / "model")], capture_output=True, text=True, env=ENV
    )
    return (
        "cmd: prune --pattern 2:4 --export torch-24 --save-model; eval --model out/model; eval --model out/torch-24;"
        " export --model out/torch-24 --format hf-dense\n"
        f"eval pruned model: exit {rc1} {tail(o1 or e1, 1)[:120]}\neval torch-24 folder: exit {rc2} "
        f"{tail(o2 or e2, 1)[:200]}\n{tail(r4.stdout or r4.stderr, 1)[:300]}\n"
        f"re-export: exit {rc3} {tail(o3 or e3, 1)[:300]}"
    )


BIGWEIGHT = r"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    m.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6
m.save_pretrained(sys.argv[2])
"""


@case
def export_fp16_overflow():
    d = fresh("fp16")
    subprocess.run([PY, "-c", BIGWEIGHT, str(TINY), str(d / "big")], check=True, env=ENV, capture_output=True)
    for t in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / t, d / "big")
    rc, o, e, _ = run(
        [*CLI, "export", "--model", str(d / "big"), "--format", "hf-dense", "--dtype", "fp16", "--output", str(d / "x")]
    )
    infs = "-"
    if rc == 0:
        from safetensors.torch import load_file

        t = load_file(str(d / "x" / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
        infs = int(t.isinf().sum())
    return (
        f"cmd: export --model big (one weight 1e6) --format hf-dense --dtype fp16\nexit {rc}: "
        f"{tail(o or e, 1)[:200]}; inf values in the written up_proj: {infs}"
    )


TAMPER = r"""
import sys, torch, warnings
from safetensors.torch import load_file, save_file
from ecoflap_fast import load_sparse
path = sys.argv[1]
t = load_file(path + "/model.safetensors")
key = "model.layers.0.mlp.up_proj.meta"
m = t[key].clone()
m[0, 0] = 0  # every nibble 0: both kept values of each group claim column 0
t[key] = m
save_file(t, path + "/model.safetensors", metadata={"format": "pt"})
ref = load_file(sys.argv[2] + "/model.safetensors")["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16)
warnings.simplefilter("ignore")
try:
    back = load_sparse(path)
except Exception as e:
    print("refused:", type(e).__name__, str(e)[:200]); sys.exit(0)
w = back.model.layers[0].mlp.up_proj.weight
print(f"loaded without error; up_proj differs from the pruned weights in {int((w != ref).sum())} places, "
      f"non-zeros {int((ref != 0).sum())} -> {int((w != 0).sum())}")
"""


@case
def export_tampered_meta():
    d = fresh("tamper")
    out = d / "out"
    rc, o, e, _ = run(
        [
            *CLI,
            "prune",
            "--model",
            str(TINY),
            *BASE,
            *UNI,
            "--pattern",
            "2:4",
            "--export",
            "torch-24",
            "--save-model",
            "--output",
            str(out),
        ]
    )
    assert rc == 0, e
    rc, o, e, _ = run([PY, "-c", TAMPER, str(out / "torch-24"), str(out / "model")])
    return f"cmd: zero one int16 of up_proj.meta in a torch-24 export, load_sparse it\n{tail(o or e, 1)[:300]}"


@case
def mem_calib_text():
    """Peak RSS of a prune run whose --calib-text is a 20 MB file (the issue: 200 MB peaked at ~22 GiB)."""
    d = fresh("memtext")
    big = d / "big.txt"
    line = EV.read_text() + "\n\n"
    with big.open("w") as f:
        n = 0
        while n < 20 * 2**20:
            f.write(line)
            n += len(line)
    cmd = [
        *CLI,
        "prune",
        "--model",
        str(TINY),
        "--calib-text",
        str(big),
        "--eval-text",
        str(EV),
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        *UNI,
        "--no-progress",
        "--output",
        str(d / "out"),
    ]
    rc, o, e, peak, s, killed = rusage_run(cmd, rss_kill_gb=10)
    return (
        f"cmd: prune --calib-text big.txt (20 MiB) --nsamples 4 --seqlen 16\nexit {rc}; peak RSS {peak:.2f} GiB;"
        f" {s:.1f} s; killed by harness={killed}"
    )


@case
def mem_nsamples():
    d = fresh("memn")
    cmd = [
        *CLI,
        "prune",
        "--model",
        str(TINY),
        "--calib-text",
        str(CAL),
        "--eval-text",
        str(EV),
        "--nsamples",
        "100000",
        "--seqlen",
        "128",
        *UNI,
        "--no-progress",
        "--output",
        str(d / "out"),
    ]
    rc, o, e, peak, s, killed = rusage_run(cmd, timeout=60, rss_kill_gb=3)
    return (
        f"cmd: prune --nsamples 100000 --seqlen 128 (tiny model)\nexit {rc}; peak RSS {peak:.2f} GiB after "
        f"{s:.1f} s; killed by the harness at 3 GiB / 60 s={killed}; stderr: {tail(e, 1)[:200]}"
    )


CRAFT = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
t = load_file(str(src / "model.safetensors"))
p = "model.layers.0.mlp.up_proj"
rows, cols = 16384, 16384
t[p + ".shape"] = torch.tensor([[rows], [cols]])
t[p + ".bitmask"] = torch.zeros(rows, cols // 8, dtype=torch.uint8)
t[p + ".compressed"] = torch.zeros(0)
t[p + ".row_offsets"] = torch.zeros(rows, dtype=torch.int64)
save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
print((dst / "model.safetensors").stat().st_size)
"""

LOADER = r"""
import sys
from ecoflap_fast import load_sparse
try:
    load_sparse(sys.argv[1]); print("loaded")
except Exception as e:
    print("error:", type(e).__name__, str(e)[:200])
"""


@case
def mem_crafted_checkpoint():
    d = fresh("craft")
    out = d / "out"
    rc, o, e, _ = run(
        [*CLI, "prune", "--model", str(TINY), *BASE, *UNI, "--export", "ct-bitmask", "--output", str(out)]
    )
    assert rc == 0, e
    dst = out / "ct-bitmask"
    size = subprocess.run([PY, "-c", CRAFT, str(dst), str(dst)], capture_output=True, text=True, env=ENV).stdout
    rc, o, e, peak, s, killed = rusage_run([PY, "-c", LOADER, str(dst)])
    return (
        f"cmd: load_sparse of a ct-bitmask export whose up_proj claims shape 16384x16384 (all-zero bitmask; file "
        f"{int(size) / 2**20:.1f} MiB)\npeak RSS {peak:.2f} GiB; {tail(o or e, 1)[:200]}"
    )


@case
def corrupt_safetensors():
    d = fresh("corrupt")
    res = []
    for kind in ("truncated", "header-length"):
        f = d / kind
        shutil.copytree(TINY, f)
        data = (f / "model.safetensors").read_bytes()
        if kind == "truncated":
            (f / "model.safetensors").write_bytes(data[: len(data) // 2])
        else:
            (f / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + data[8:])
        rc, o, e, s = run([*CLI, "prune", "--model", str(f), *BASE, *UNI, "--output", str(d / f"out-{kind}")])
        res.append(
            f"{kind}: exit {rc}, traceback={tb(e)}, stderr lines={len(e.strip().splitlines())}, last: "
            f"{tail(e, 1)[:200]}"
        )
    return "cmd: prune --model <folder with a damaged model.safetensors>\n" + "\n".join(res)


@case
def map_json_list():
    d = fresh("maplist")
    (d / "map.json").write_text("[1, 2]")
    rc, o, e, s = run(
        [*CLI, "prune", "--model", str(TINY), *BASE, "--sparsity-map", str(d / "map.json"), "--output", str(d / "out")]
    )
    return f"cmd: prune --sparsity-map map.json (a JSON list)\nexit {rc}; traceback={tb(e)}; last: {tail(e, 1)[:200]}"


@case
def map_wrong_names():
    d = fresh("mapnames")
    (d / "map.json").write_text(json.dumps({"sparsity_map": {"model.layers.9.mlp.up_proj": 0.5}}))
    rc, o, e, s = run(
        [
            *CLI,
            "prune",
            "--model",
            str(TINY),
            *BASE,
            "--sparsity-map",
            str(d / "map.json"),
            "--output",
            str(d / "out"),
            "--eval",
            "--eval-windows",
            "2",
            "--eval-seqlen",
            "32",
        ]
    )
    return (
        f"cmd: prune --eval --sparsity-map map.json (names of another model)\nexit {rc}; {s:.1f} s; "
        f"last: {tail(e or o, 1)[:200]}"
    )


@case
def map_with_24():
    d = fresh("map24")
    rc, *_ = run([*CLI, "prune", "--model", str(TINY), *BASE, *UNI, "--output", str(d / "r1")])
    rc, o, e, s = run(
        [
            *CLI,
            "prune",
            "--model",
            str(TINY),
            *BASE,
            "--pattern",
            "2:4",
            "--sparsity-map",
            str(d / "r1" / "report.json"),
            "--output",
            str(d / "r2"),
        ]
    )
    rec = ""
    if (d / "r2" / "report.json").exists():
        r = json.loads((d / "r2" / "report.json").read_text())
        rec = f"; report says stage1={r['stage1']['method']!r}, pattern={r['pattern']}"
    return f"cmd: prune --pattern 2:4 --sparsity-map r1/report.json\nexit {rc}{rec}; last: {tail(e or o, 1)[:200]}"


@case
def seqlen_beyond_context():
    d = fresh("ctx")
    rc, o, e, s = run(
        [
            *CLI,
            "prune",
            "--model",
            str(TINY),
            "--calib-text",
            str(CAL),
            "--eval-text",
            str(EV),
            "--nsamples",
            "2",
            "--seqlen",
            "1024",
            *UNI,
            "--no-progress",
            "--output",
            str(d / "out"),
        ]
    )
    return (
        f"cmd: prune --seqlen 1024 (max_position_embeddings 256)\nexit {rc}; output written="
        f"{(d / 'out' / 'report.json').exists()}; last: {tail(e or o, 1)[:200]}"
    )


@case
def readonly_output():
    rc, o, e, s = run([*CLI, "prune", "--model", str(TINY), *BASE, *UNI, "--output", "/sys/kernel/ecoflap-out"])
    return (
        f"cmd: prune --output /sys/kernel/ecoflap-out (not writable, even for root)\nexit {rc}; {s:.1f} s; "
        f"traceback={tb(e)}; last: {tail(e, 1)[:200]}"
    )


FSIZE = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from ecoflap_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


@case
def full_disk():
    d = fresh("full")
    rc, o, e, s = run(
        [PY, "-c", FSIZE, "prune", "--model", str(TINY), *BASE, *UNI, "--save-model", "--output", str(d / "out")]
    )
    return (
        f"cmd: prune --save-model with writes capped at 200 kB (RLIMIT_FSIZE: a full disk)\nexit {rc}; "
        f"traceback={tb(e)}; siblings={listing(d)}; last: {tail(e, 1)[:200]}"
    )


@case
def sparsity_0995():
    d = fresh("s995")
    rc, o, e, s = run([*CLI, "prune", "--model", str(TINY), *BASE, "--sparsity", "0.995", "--output", str(d / "out")])
    return f"cmd: prune --sparsity 0.995 (allocator ecoflap-zo)\nexit {rc}; {s:.1f} s; last: {tail(e or o, 1)[:250]}"


@case
def eval_windows_negative():
    rc, o, e, s = run(
        [
            *CLI,
            "eval",
            "--model",
            str(TINY),
            "--eval-text",
            str(EV),
            "--eval-windows",
            "-1",
            "--eval-seqlen",
            "16",
            "--no-progress",
        ]
    )
    code = "import torch; from ecoflap_fast import data; print(data.eval_windows(torch.arange(2000), 16, -1).shape)"
    r2 = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=ENV)
    return (
        f"cmd: eval --eval-windows -1 --eval-seqlen 16 (2000-word text)\nexit {rc}: {tail(o or e, 1)[:160]}; "
        f"data.eval_windows(2000 tokens, 16, -1) -> {r2.stdout.strip() or tail(r2.stderr, 1)}"
    )


OPS_GRAD = r"""
import torch
from ecoflap_fast import ops
torch.manual_seed(0)
w = torch.nn.Parameter(torch.randn(8, 16))
x = torch.randn(4, 16)
try:
    y = (x @ w.t()).pow(2).sum()
    ops.wanda_prune_(w, torch.rand(16), 0.5)
    y.backward()
    ref = torch.autograd.grad((x @ w.detach().clone().requires_grad_().t()).pow(2).sum(), [])  if False else None
    print("wanda_prune_ on a Parameter that requires grad: no error; backward ran with", int((w == 0).sum()),
          "weights zeroed under the saved graph")
except Exception as e:
    print("refused:", type(e).__name__, e)
v = torch.randn(8, 16, requires_grad=True)
try:
    ops.prune_by_scores_(v[:, :8], torch.rand(8, 8), 0.5)
    print("prune_by_scores_ on a view of a grad tensor: no error")
except Exception as e:
    print("view refused:", type(e).__name__, e)
"""

OPS_META = r"""
import torch
from ecoflap_fast import ops
w, s = torch.empty(8, 16, device="meta"), torch.empty(16, device="meta")
for name, fn in [("wanda_prune_", lambda: ops.wanda_prune_(w, s, 0.5)),
                 ("wanda_mask", lambda: ops.wanda_mask(w, s, 0.5)),
                 ("prune_by_scores_", lambda: ops.prune_by_scores_(w, torch.empty(8, 16, device="meta"), 0.5))]:
    try:
        fn(); print(name, "meta: no error")
    except Exception as e:
        print(name, "meta:", type(e).__name__, str(e).splitlines()[0][:150])
"""


@case
def ops_requires_grad():
    r = subprocess.run([PY, "-c", OPS_GRAD], capture_output=True, text=True, env=ENV)
    return "cmd: ops.wanda_prune_(Parameter, ...) between forward and backward\n" + (r.stdout + tail(r.stderr, 2))


@case
def ops_meta():
    r = subprocess.run([PY, "-c", OPS_META], capture_output=True, text=True, env=ENV)
    return "cmd: ops on meta tensors\n" + (r.stdout + tail(r.stderr, 2))


@case
def concurrent_different_outputs():
    d = fresh("diffout")
    cmd = lambda o: [*CLI, "prune", "--model", str(TINY), *BASE, "--output", str(d / o)]
    ps = [subprocess.Popen(cmd(o), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV) for o in ("a", "b")]
    rcs = [p.wait() for p in ps]
    ra, rb = (json.loads((d / o / "report.json").read_text()) for o in ("a", "b"))
    same = ra["layer_sparsity"] == rb["layer_sparsity"] and ra["sparsity_map"] == rb["sparsity_map"]
    return f"cmd: two prune runs at once, outputs a and b\nexit {rcs}; identical allocations and sparsities={same}"


if __name__ == "__main__":
    label = sys.argv[1]
    names = sys.argv[2:] or list(CASES)
    setup()
    results_path = HERE / "results" / f"reliability_{label}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for n in names:
        t = time.time()
        try:
            r = CASES[n]()
        except Exception:
            import traceback

            r = "HARNESS ERROR " + traceback.format_exc()[-800:]
        r += f"\n[{time.time() - t:.1f} s]"
        print(f"== {n}\n{r}\n", flush=True)
        results[n] = r
        results_path.write_text(json.dumps(results, indent=1) + "\n")
