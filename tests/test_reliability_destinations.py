"""Outputs are never lost: refused destinations, one run per output (an OS lock), a one-step replace,
no temporaries left after an error, Ctrl-C or SIGTERM, and after SIGKILL only what the next run on
that output removes; modes follow the umask."""

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from reliability_helpers import CLI, ENV, make_tiny_folder, one_error_line, output_state, prune_args, run_cli, siblings

from ecoflap_fast import _fs
from ecoflap_fast.cli import main


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dest")
    make_tiny_folder(root)
    return root


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


REFUSED = [
    # (id, output (relative to the cwd, or under {sandbox}), cwd relative to the sandbox, message)
    ("model-folder", "anc/tiny", ".", "is an input of this run"),
    ("ancestor-of-model", "anc", ".", "an input of this run"),
    ("inside-model", "anc/tiny/out", ".", "is inside"),
    ("dot", ".", "anc", "is the current folder"),
    ("empty-string", "", "anc", "is the current folder"),
    ("contains-cwd", "{sandbox}/anc", "anc/tiny", "contains the current folder"),
    ("a-file", "anc/notes.txt", ".", "is not a folder"),
    ("a-symlink", "anc/link", ".", "is a symbolic link"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_destinations_touch_nothing(root, tmp_path, monkeypatch, capsys, case):
    _, out, cwd, message = case
    shutil.copytree(root / "tiny", tmp_path / "anc" / "tiny")
    (tmp_path / "anc" / "notes.txt").write_text("user data")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("user data")
    (tmp_path / "anc" / "link").symlink_to(tmp_path / "elsewhere")
    before = _digest(tmp_path)
    monkeypatch.chdir(tmp_path / cwd)
    args = prune_args(root, tmp_path / "anc" / "tiny", out.format(sandbox=tmp_path), "--force")
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line, line
    assert _digest(tmp_path) == before, "a refused run changed files"
    assert not [p for p in tmp_path.rglob(".*")], "a refused run left temporaries"


@pytest.mark.parametrize("path", ["/", "~"])
def test_root_and_home_refused(path):
    with pytest.raises(ValueError, match="filesystem root|home folder"):
        _fs.check_destination(Path(os.path.expanduser(path)), True)


HELD_BEFORE_WRITING = r"""
import pathlib, sys, time
from ecoflap_fast import report
real = report.write_output
def held(*a, **k):
    while not pathlib.Path(sys.argv[1]).exists():
        time.sleep(0.01)
    return real(*a, **k)
report.write_output = held
from ecoflap_fast.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_second_run_on_the_same_output_fails_at_once(root, tmp_path):
    """Run A is held just before it writes; run B on the same output, started meanwhile, fails at once
    with a clear message; A's output then appears complete."""
    out, go = tmp_path / "out", tmp_path / "go"
    args = prune_args(root, root / "tiny", out, "--save-model")
    a = subprocess.Popen(
        [CLI[0], "-c", HELD_BEFORE_WRITING, str(go), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
    )
    try:
        deadline = time.time() + 120
        while not (tmp_path / ".out.lock").exists() and time.time() < deadline:
            time.sleep(0.01)
        assert (tmp_path / ".out.lock").exists(), "run A never took the lock"
        t = time.time()
        b = run_cli(prune_args(root, root / "tiny", out, "--save-model", "--force"))
        assert b.returncode == 2 and "is being written by another run" in one_error_line(b.stderr)
        assert time.time() - t < 60 and not out.exists()
    finally:
        go.touch()
    assert a.wait(timeout=300) == 0, a.stderr.read()
    assert output_state(out) == "seed 0"
    assert siblings(out) == []


def test_lock_is_exclusive_between_processes_and_reentrant(tmp_path):
    out = tmp_path / "o"
    code = f"from ecoflap_fast._fs import output_lock\nwith output_lock({str(out)!r}): print('got it')"
    with _fs.output_lock(out):
        with _fs.output_lock(out):  # the same process again: re-entrant
            r = subprocess.run([CLI[0], "-c", code], capture_output=True, text=True, env=ENV)
            assert r.returncode != 0 and "OutputBusyError" in r.stderr and f"process {os.getpid()}" in r.stderr
    r = subprocess.run([CLI[0], "-c", code], capture_output=True, text=True, env=ENV)
    assert r.stdout.strip() == "got it"
    assert siblings(out) == [] and not out.exists()


def test_replace_is_one_step_and_the_fallback_repairs_itself(tmp_path, monkeypatch):
    out = tmp_path / "out"
    for i in range(2):  # rename-exchange where the OS has it
        with _fs.staged_folder(out, force=True) as tmp:
            (tmp / "v").write_text(str(i))
    assert (out / "v").read_text() == "1" and siblings(out) == []
    # no exchange: a crash between the two renames leaves the previous output beside it, and the
    # next run on that output puts it back before anything else
    monkeypatch.setattr(_fs, "_renameat2", lambda *a: False)
    real = os.rename

    def crash_after_moving_aside(a, b):
        real(a, b)
        if ".old-" in str(b):
            raise SystemExit("killed")

    monkeypatch.setattr(_fs.os, "rename", crash_after_moving_aside)
    with pytest.raises(SystemExit):
        with _fs.staged_folder(out, force=True) as tmp:
            (tmp / "v").write_text("2")
    assert not out.exists() and [n for n in siblings(out) if ".old-" in n]
    monkeypatch.setattr(_fs.os, "rename", real)
    with _fs.output_lock(out):
        assert (out / "v").read_text() == "1"
    with _fs.staged_folder(out, force=True) as tmp:
        (tmp / "v").write_text("3")
    assert (out / "v").read_text() == "3" and siblings(out) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_modes_follow_the_umask(root, tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        assert main(prune_args(root, root / "tiny", tmp_path / "out", "--save-model")) == 0
    finally:
        os.umask(old)
    for p in [tmp_path / "out", *(tmp_path / "out").rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode & 0o777))


def test_signals_at_random_points_leave_old_or_new_output(root, tmp_path):
    """SIGKILL, SIGINT and SIGTERM at seeded random points of `prune --save-model --force` over an
    existing output: afterwards the output is the old complete one or the new complete one; SIGINT and
    SIGTERM leave nothing beside it and exit 130/143 with one line; after SIGKILL the next run on the
    output removes what the killed one left."""
    out = tmp_path / "out"
    assert run_cli(prune_args(root, root / "tiny", out, "--save-model")).returncode == 0
    assert output_state(out) == "seed 0"
    rng = random.Random(16)
    state = "seed 0"
    trials = [(s, rng.uniform(2.0, 12.0)) for s in (signal.SIGKILL, signal.SIGINT, signal.SIGKILL)]
    trials += [(signal.SIGKILL, "write"), (signal.SIGINT, "write"), (signal.SIGTERM, "write")]
    trials += [(signal.SIGKILL, "replaced")]  # right after the new output took the old one's place
    for seed, (sig, when) in enumerate(trials, start=1):
        args = prune_args(root, root / "tiny", out, "--save-model", "--force", "--seed", str(seed))
        p = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        if when == "write":  # once the new output is being written beside the old one
            deadline = time.time() + 120
            while not [n for n in siblings(out) if ".tmp-" in n] and time.time() < deadline and p.poll() is None:
                time.sleep(0.001)
        elif when == "replaced":
            inode, deadline = out.stat().st_ino, time.time() + 120
            while out.stat().st_ino == inode and time.time() < deadline and p.poll() is None:
                time.sleep(0.0005)
        else:
            time.sleep(when)
        p.send_signal(sig)
        _, err = p.communicate(timeout=300)
        before, state = state, output_state(out)
        assert state in (before, f"seed {seed}"), (sig, when, before, state)
        left = siblings(out)
        if sig == signal.SIGKILL:
            assert set(n.split(".")[2].split("-")[0] for n in left) <= {"lock", "tmp"}, left
            with _fs.output_lock(out):  # what the next run does first
                pass
            assert siblings(out) == []
        else:
            assert left == [], (sig, left)
            if when == "write" and p.returncode != 0:
                assert p.returncode == 128 + sig, (sig, p.returncode, err[-2000:])
                one_error_line(err)
        assert output_state(out) != "INCOMPLETE"
