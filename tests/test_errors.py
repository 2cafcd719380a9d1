"""Every bad input of SPEC §2 raises a clear error naming the argument and leaves inputs unmodified."""

import subprocess
import sys

import pytest
import torch

import ecoflap_fast
from ecoflap_fast import ops

W = torch.randn(8, 16)
S = torch.rand(16)


def _nan(t, where=(0, 0)):
    t = t.clone()
    t[where] = float("nan")
    return t


BAD_MASK_CALLS = [
    # (id, args, kwargs, exception, message regex)
    ("sparsity-1", (W, S, 1.0), {}, ValueError, r"sparsity must be in \[0, 1\)"),
    ("sparsity-neg", (W, S, -0.1), {}, ValueError, r"sparsity must be in \[0, 1\)"),
    ("sparsity-nan", (W, S, float("nan")), {}, ValueError, "sparsity"),
    ("sparsity-str", (W, S, "0.5"), {}, TypeError, "sparsity must be a float"),
    ("sparsity-missing", (W, S), {}, ValueError, "sparsity is required"),
    ("weight-nan", (_nan(W), S, 0.5), {}, ValueError, "weight contains NaN or Inf"),
    ("weight-inf", (W.clone().fill_(float("inf")), S, 0.5), {}, ValueError, "weight contains NaN or Inf"),
    ("scaler-nan", (W, _nan(S, (3,)), 0.5), {}, ValueError, "scaler_row contains NaN or Inf"),
    ("scaler-negative", (W, -S, 0.5), {}, ValueError, "scaler_row contains negative"),
    ("scaler-length", (W, torch.rand(15), 0.5), {}, ValueError, r"scaler_row must have shape \(16,\)"),
    ("scaler-2d", (W, S.reshape(1, 16), 0.5), {}, ValueError, "scaler_row must have shape"),
    ("weight-3d", (W.reshape(2, 4, 16), S, 0.5), {}, ValueError, "weight must be 2-D"),
    ("weight-int", (W.to(torch.int32), S, 0.5), {}, TypeError, "weight must have dtype"),
    ("weight-list", (W.tolist(), S, 0.5), {}, TypeError, "weight must be a torch.Tensor"),
    ("nm-width", (torch.randn(8, 18), torch.rand(18)), {"nm": (2, 4)}, ValueError, r"needs in_features \(18\)"),
    ("nm-contradicts", (W, S, 0.3), {"nm": (2, 4)}, ValueError, "contradicts nm=2:4"),
    ("nm-bad", (W, S), {"nm": (5, 4)}, ValueError, "1 <= n <= m <= 32"),
    ("nm-type", (W, S), {"nm": "2:4"}, TypeError, "nm must be a pair"),
    ("per-bad", (W, S, 0.5), {"per": "column"}, ValueError, "per must be 'row' or 'matrix'"),
    ("per-matrix-nm", (W, S), {"nm": (2, 4), "per": "matrix"}, ValueError, "cannot be combined"),
    ("device-meta", (W, S.to("meta"), 0.5), {}, ValueError, "one device"),
]


@pytest.mark.parametrize("fn", ["wanda_mask", "wanda_prune_"])
@pytest.mark.parametrize("case", BAD_MASK_CALLS, ids=[c[0] for c in BAD_MASK_CALLS])
def test_bad_selection_input(fn, case):
    _, args, kwargs, exc, msg = case
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    before = [t.clone() for t in tensors]
    with pytest.raises(exc, match=msg):
        getattr(ops, fn)(*args, **kwargs)
    for t, b in zip(tensors, before):
        if t.device.type != "meta":
            assert torch.equal(t, b) or (t.isnan() == b.isnan()).all(), "an input was modified"


def test_select_and_scores_errors():
    with pytest.raises(ValueError, match="scores contains NaN"):
        ops.select_mask(_nan(W), 0.5)
    with pytest.raises(ValueError, match="scores has shape"):
        ops.prune_by_scores_(W.clone(), torch.rand(8, 8), 0.5)
    with pytest.raises(ValueError, match="scaler_row contains negative"):
        ops.wanda_scores(W, -S)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.col_sq_norms(torch.ones(3, 4, dtype=torch.int64))


PACK_CASES = [
    ("pack24-dtype", ops.pack_24_cutlass, (torch.zeros(32, 32),), TypeError, "dense must have dtype"),
    ("pack24-1d", ops.pack_24_cutlass, (torch.zeros(32, dtype=torch.half),), ValueError, "dense must be 2-D"),
    ("pack24-shape", ops.pack_24_cutlass, (torch.zeros(30, 32, dtype=torch.half),), ValueError, "CUTLASS 2:4 layout"),
    (
        "unpack24-meta-dtype",
        ops.unpack_24_cutlass,
        (torch.zeros(32, 16, dtype=torch.half), torch.zeros(32, 2, dtype=torch.int32)),
        TypeError,
        "meta must have dtype",
    ),
    (
        "unpack24-meta-shape",
        ops.unpack_24_cutlass,
        (torch.zeros(32, 16, dtype=torch.half), torch.zeros(32, 4, dtype=torch.int16)),
        ValueError,
        "does not describe values",
    ),
    ("bitmask-dtype", ops.pack_bitmask, (torch.zeros(4, 4, dtype=torch.int64),), TypeError, "dense must have dtype"),
    (
        "unpack-bitmask-dtype",
        ops.unpack_bitmask,
        (torch.zeros(3), torch.zeros(2, 1, dtype=torch.int8), (2, 8)),
        TypeError,
        "bitmask must be uint8",
    ),
    (
        "unpack-bitmask-shape",
        ops.unpack_bitmask,
        (torch.zeros(3), torch.zeros(2, 2, dtype=torch.uint8), (2, 8)),
        ValueError,
        "bitmask has shape",
    ),
]


@pytest.mark.parametrize("case", PACK_CASES, ids=[c[0] for c in PACK_CASES])
def test_bad_pack_input(case):
    _, fn, args, exc, msg = case
    with pytest.raises(exc, match=msg):
        fn(*args)


def test_nm_pack_width():
    with pytest.raises(ValueError, match=r"needs in_features \(6\)"):
        ops.pack_bitmask(torch.zeros(2, 6), nm=(2, 4))


def test_backends_report_and_torch_fallback(tmp_path):
    report = ecoflap_fast.backends()
    assert set(report) >= {"torch-reference", "cpu-cpp", "cuda-cpp", "triton"}
    # With the extension disabled, the ops still work (pure-torch fallback) and say why.
    code = (
        "import torch, ecoflap_fast; from ecoflap_fast import ops, reference as ref\n"
        "print(ecoflap_fast.backends()['cpu-cpp'])\n"
        "w = torch.randn(32, 64).half(); s = torch.rand(64)\n"
        "assert torch.equal(ops.wanda_mask(w, s, 0.5), ref.wanda_mask(w, s, 0.5))\n"
        "d = w.clone(); ops.wanda_prune_(d, s, nm=(2, 4)); v, m = ops.pack_24_cutlass(d)\n"
        "assert torch.equal(ops.unpack_24_cutlass(v, m), d)\n"
    )
    env = {"ECOFLAP_DISABLE_EXT": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "inactive: disabled by ECOFLAP_DISABLE_EXT=1" in out.stdout
