"""Every check before the first expensive step: each bad input below is one line on stderr, exit 2,
no traceback, nothing written, and the model is never loaded (a stub that fails the test stands in
for the loader). Write failures during a run are one line too; an internal error says it is one and
where its traceback is."""

import json
import os
import re
import sys

import pytest
from reliability_helpers import make_tiny_folder, one_error_line, peak_rss_run, prune_args, siblings

from ecoflap_fast import _fs, models
from ecoflap_fast.cli import main


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    make_tiny_folder(root)
    (root / "list.json").write_text("[1, 2]")
    (root / "noentry.json").write_text(json.dumps({"layer_sparsity": {}}))
    (root / "notdict.json").write_text(json.dumps({"sparsity_map": [0.5]}))
    (root / "badvalue.json").write_text(json.dumps({"sparsity_map": {"model.layers.0.mlp.up_proj": 1.5}}))
    (root / "othermodel.json").write_text(json.dumps({"sparsity_map": {"model.layers.9.mlp.up_proj": 0.5}}))
    assert main(prune_args(root, root / "tiny", root / "first")) == 0
    return root


@pytest.fixture()
def no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr(models, "load_model", refuse)


BAD = [
    ("map-json-list", ["--sparsity-map", "{root}/list.json"], "holds a JSON list, not an object"),
    ("map-no-entry", ["--sparsity-map", "{root}/noentry.json"], "has no 'sparsity_map' entry"),
    ("map-not-a-dict", ["--sparsity-map", "{root}/notdict.json"], "must map matrix names to sparsities"),
    ("map-value", ["--sparsity-map", "{root}/badvalue.json"], "= 1.5 is not a number in [0, 1)"),
    ("map-other-model", ["--sparsity-map", "{root}/othermodel.json"], "names 1 matrices this model does not have"),
    (
        "map-with-2:4",
        ["--sparsity-map", "{root}/first/report.json", "--pattern", "2:4"],
        "cannot be combined with pattern 2:4",
    ),
    ("seqlen-beyond-context", ["--seqlen", "1024"], "--seqlen 1024 is beyond the model's context of 256"),
    (
        "stage1-seqlen-beyond-context",
        ["--allocator", "ecoflap-zo", "--stage1-seqlen", "512"],
        "--stage1-seqlen 512 is beyond the model's context",
    ),
    ("eval-seqlen-beyond-context", ["--eval"], "--eval-seqlen 512 is beyond the model's context"),
    ("eval-windows-negative", ["--eval", "--eval-windows", "-1", "--eval-seqlen", "16"], "--eval-windows must be"),
    ("batch-size-zero", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("sparsity-0.995", ["--sparsity", "0.995", "--allocator", "ecoflap-zo"], "above ECoFLaP's default maximum"),
    ("missing-text", ["--calib-text", "{root}/nofile.txt"], "does not exist"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_refused_before_loading_the_model(root, tmp_path, capsys, no_model_loading, case):
    _, extra, message = case
    out = tmp_path / "nested" / "out"
    args = prune_args(root, root / "tiny", out, *[e.format(root=root) for e in extra])
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("ecoflap-fast: error: ") and message in line, line
    assert not (tmp_path / "nested").exists(), "a refused run created folders"


def test_eval_command_window_count(root, capsys, no_model_loading):
    args = ["eval", "--model", str(root / "tiny"), "--eval-text", str(root / "eval.txt"), "--eval-windows", "-1"]
    assert main(args) == 2
    assert "--eval-windows must be at least 1, got -1" in one_error_line(capsys.readouterr().err)


def test_unwritable_output_refused_before_loading(root, tmp_path, capsys, no_model_loading):
    if os.geteuid() == 0:  # root writes through file modes; sysfs refuses even root
        target = "/sys/kernel/ecoflap-never"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        target = str(tmp_path / "ro" / "out")
    assert main(prune_args(root, root / "tiny", target)) == 2
    assert "cannot be written" in one_error_line(capsys.readouterr().err)


def test_too_little_disk_space_refused_before_loading(root, tmp_path, capsys, monkeypatch, no_model_loading):
    import shutil

    monkeypatch.setattr(_fs.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    assert main(prune_args(root, root / "tiny", tmp_path / "out", "--save-model")) == 2
    assert re.search(r"needs about .* has 0 B free", one_error_line(capsys.readouterr().err))


FULL_DISK = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from ecoflap_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_disk_that_fills_up_mid_write_is_one_line_and_leaves_nothing(root, tmp_path):
    out = tmp_path / "out"
    rc, _, err, _ = peak_rss_run(
        [sys.executable, "-c", FULL_DISK, *prune_args(root, root / "tiny", out, "--save-model")]
    )
    assert rc == 2
    assert "writing the output failed" in one_error_line(err) or "File too large" in one_error_line(err)
    assert not out.exists() and siblings(out) == []


def test_internal_error_says_what_to_report(root, tmp_path, capsys, monkeypatch):
    from ecoflap_fast import report

    def bug(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(report, "write_output", bug)
    out = tmp_path / "out"
    assert main(prune_args(root, root / "tiny", out)) == 70
    line = one_error_line(capsys.readouterr().err)
    assert "internal error: ZeroDivisionError: division by zero" in line and "please report it" in line
    log = re.search(r"saved in (\S+\.log)", line).group(1)
    assert "Traceback" in open(log).read()
    os.unlink(log)
    assert not out.exists() and siblings(out) == []
    assert main(prune_args(root, root / "tiny", out, "--debug")) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err
    for log in re.findall(r"saved in (\S+\.log)", err):
        os.unlink(log)
