"""llm-compressor with this engine as its backend: the same pruned weights, bit for bit.

llm-compressor pins older transformers / compressed-tensors releases, so these tests run in their own
environment (.venv-llmc, made by `make llmc-setup`; `make test` runs them there). In an environment
without llm-compressor they skip, unless ECOFLAP_REQUIRE_LLMCOMPRESSOR=1 makes that an error.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

try:
    import llmcompressor  # noqa: F401
    from llmcompressor.modifiers.pruning.sparsegpt import sgpt_sparsify
    from llmcompressor.modifiers.pruning.wanda import base as wanda_base
    from llmcompressor.modifiers.pruning.wanda import wanda_sparsify
except ImportError as e:
    if os.environ.get("ECOFLAP_REQUIRE_LLMCOMPRESSOR") == "1":
        raise
    pytest.skip(
        f"llm-compressor is not installed here ({e}); `make test` runs this file in .venv-llmc",
        allow_module_level=True,
    )

from tiny_models import tiny_llama, word_tokenizer

from ecoflap_fast.integrations import llmcompressor as backend

CALIB, SEQ = 16, 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(hidden=128, layers=2, seed=3).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def _oneshot(model_dir, recipe, fast: bool, statistics: str = "exact"):
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(2, 128, (CALIB, SEQ), generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    ctx = backend.backend(statistics) if fast else contextlib.nullcontext()
    with ctx:
        oneshot(
            model=model,
            processor=word_tokenizer(),
            dataset=dataset,
            recipe=recipe,
            num_calibration_samples=CALIB,
            max_seq_length=SEQ,
            batch_size=4,
            shuffle_calibration_samples=False,
            pipeline="sequential",
        )
        calls = backend.calls()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2}
    return weights, calls


def _wanda(structure):
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    return WandaPruningModifier(sparsity=0.5, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])


def _sparsegpt(structure):
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    return SparseGPTModifier(
        sparsity=0.5, mask_structure=structure, block_size=32, targets=["Linear"], ignore=["re:.*lm_head"]
    )


LINEARS = 2 * 7  # 2 decoder layers x (q, k, v, o, gate, up, down)


@pytest.mark.parametrize("structure", ["0:0", "2:4", "4:8"])
def test_wanda_oneshot_identical_with_backend(model_dir, structure):
    plain, _ = _oneshot(model_dir, _wanda(structure), fast=False)
    fast, calls = _oneshot(model_dir, _wanda(structure), fast=True)
    assert calls == {"wanda_sparsify_weight: ecoflap_fast": LINEARS}  # every layer took the fast path
    assert plain.keys() == fast.keys() and len(plain) == LINEARS
    for name in plain:
        assert torch.equal(plain[name], fast[name]), name
    zeros = sum(int((w == 0).sum()) for w in fast.values()) / sum(w.numel() for w in fast.values())
    assert zeros == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("structure", ["0:0", "2:4"])
def test_sparsegpt_oneshot_identical_with_backend(model_dir, structure):
    plain, _ = _oneshot(model_dir, _sparsegpt(structure), fast=False)
    fast, calls = _oneshot(model_dir, _sparsegpt(structure), fast=True)
    if structure == "0:0":  # one threshold per 32-column block of every layer
        blocks = 2 * (4 * 128 // 32 + 2 * 128 // 32 + 256 // 32)
        assert calls == {"sparsegpt threshold: ecoflap_fast": blocks}
    for name in plain:
        assert torch.equal(plain[name], fast[name]), name


def test_fused_statistics_agree_within_rounding(model_dir):
    exact, _ = _oneshot(model_dir, _wanda("0:0"), fast=True, statistics="exact")
    fused, calls = _oneshot(model_dir, _wanda("0:0"), fast=True, statistics="fused")
    assert calls["accumulate_row_scalars: ecoflap_fast"] == LINEARS * CALIB // 4
    differ = sum(int(((exact[n] == 0) != (fused[n] == 0)).sum()) for n in exact)
    total = sum(w.numel() for w in exact.values())
    assert differ <= 1e-3 * total  # only near-ties can flip


def test_fused_statistic_matches_fp64():
    lin = torch.nn.Linear(96, 8)
    x = torch.randn(3, 50, 96, dtype=torch.float64)
    ref = (x**2).sum(dim=(0, 1)) / 3
    with backend.backend("fused"):
        s, n = wanda_base.accumulate_row_scalars(x[:2].float(), lin, torch.zeros(96), 0)
        s, n = wanda_base.accumulate_row_scalars(x[2].float(), lin, s, n)
    theirs, m = wanda_sparsify.accumulate_row_scalars(x[:2].float(), lin, torch.zeros(96), 0)
    theirs, m = wanda_sparsify.accumulate_row_scalars(x[2].float(), lin, theirs, m)
    assert n == m == 3
    torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(theirs.double(), ref, rtol=1e-5, atol=0)


def _tie_heavy(rows, cols, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, (rows, cols), generator=g).to(dtype) / 4  # few levels: many ties, zeros
    w[0] = 0  # an all-zero row
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 100), (33, 64), (7, 132)])
@pytest.mark.parametrize("sparsity", [0.29, 0.5, 0.7])
def test_wanda_sparsify_weight_unstructured_matches_on_ties(dtype, shape, sparsity):
    lin = torch.nn.Linear(shape[1], shape[0], bias=False).to(dtype)
    lin.weight.data = _tie_heavy(*shape, dtype, seed=shape[0])
    s = torch.randint(0, 3, (shape[1],), generator=torch.Generator().manual_seed(1)).float()  # zero columns too
    theirs = wanda_sparsify.sparsify_weight(lin, {lin: s.clone()}, sparsity, 0, 0)
    with backend.backend():
        scalars = {lin: s.clone()}
        ours = wanda_base.sparsify_weight(lin, scalars, sparsity, 0, 0)
    assert scalars == {}  # consumed, as llm-compressor does
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_wanda_sparsify_weight_nm_matches_without_ties(nm):
    prune_n, prune_m = nm
    lin = torch.nn.Linear(64, 24, bias=False)
    s = torch.rand(64) + 0.1
    theirs = wanda_sparsify.sparsify_weight(lin, {lin: s.clone()}, 0.5, prune_n, prune_m)
    with backend.backend():
        ours = wanda_base.sparsify_weight(lin, {lin: s.clone()}, 0.5, prune_n, prune_m)
    assert torch.equal(ours, theirs)
    assert int((ours == 0).sum()) == 24 * 64 * prune_n // prune_m


def test_wanda_sparsify_weight_nm_ties_among_zero_weights_give_the_same_weights():
    lin = torch.nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        lin.weight[:, ::2] = 0  # two zero weights in every group of 4: tied zero scores
    s = torch.rand(64) + 0.1
    theirs = wanda_sparsify.sparsify_weight(lin, {lin: s.clone()}, 0.5, 2, 4)
    with backend.backend():
        ours = wanda_base.sparsify_weight(lin, {lin: s.clone()}, 0.5, 2, 4)
    assert torch.equal(ours, theirs)


def test_wanda_sparsify_weight_nm_follows_topk_where_different_weights_tie():
    # groups (1, 0.5, -1, 2): the cut of 2:4 falls between the scores of 1 and -1 (equal), which are
    # different weights; llm-compressor's torch.topk decides which one goes, and so must the backend
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([1.0, 0.5, -1.0, 2.0]).repeat(6, 8)
    w = w[:, torch.randperm(32, generator=g)].contiguous()  # ties in varied positions
    lin = torch.nn.Linear(32, 6, bias=False)
    lin.weight.data = w
    s = torch.ones(32)
    theirs = wanda_sparsify.sparsify_weight(lin, {lin: s.clone()}, 0.5, 2, 4)
    with backend.backend():
        ours = wanda_base.sparsify_weight(lin, {lin: s.clone()}, 0.5, 2, 4)
        calls = backend.calls()
    assert torch.equal(ours, theirs)
    assert calls.get("tied n:m groups given to torch.topk", 0) > 0


def test_conv1d_and_fallbacks():
    import transformers

    conv = transformers.Conv1D(24, 64)  # weight [in=64, out=24]
    s = torch.rand(64) + 0.1
    theirs = wanda_sparsify.sparsify_weight(conv, {conv: s.clone()}, 0.5, 0, 0)
    with backend.backend():
        ours = wanda_base.sparsify_weight(conv, {conv: s.clone()}, 0.5, 0, 0)
        odd = torch.nn.Linear(30, 8)  # 2:4 over 30 columns: not a multiple of 4, llm-compressor's own loop
        s30 = torch.rand(30) + 0.1
        ours_odd = wanda_base.sparsify_weight(odd, {odd: s30.clone()}, 0.5, 2, 4)
        calls = backend.calls()
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_odd, wanda_sparsify.sparsify_weight(odd, {odd: s30.clone()}, 0.5, 2, 4))
    assert calls == {"wanda_sparsify_weight: ecoflap_fast": 1, "wanda_sparsify_weight: llm-compressor": 1}


def test_nan_weight_is_an_error_not_a_mask():
    lin = torch.nn.Linear(16, 4)
    with torch.no_grad():
        lin.weight[1, 3] = float("nan")
    before = lin.weight.detach().clone()
    with backend.backend(), pytest.raises(ValueError, match="NaN or Inf"):
        wanda_base.sparsify_weight(lin, {lin: torch.ones(16)}, 0.5, 0, 0)
    assert torch.equal(lin.weight.isnan(), before.isnan()) and torch.equal(lin.weight.nan_to_num(), before.nan_to_num())


def test_kth_smallest_matches_sort_with_ties():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000):
        x = torch.randint(0, 5, (n,), generator=g).float()
        want = torch.sort(x)[0]
        for i in {0, n // 3, n // 2, n - 1, -1}:
            assert torch.equal(backend.kth_smallest(x, i), want[i]), (n, i)
    with pytest.raises(IndexError):
        backend.kth_smallest(torch.ones(3), 3)


def test_sparsegpt_torch_proxy_only_changes_the_threshold_idiom():
    with backend.backend():
        t = sgpt_sparsify.torch
        x = torch.tensor([3.0, 1.0, 2.0, 1.0])
        assert float(t.sort(x)[0][1]) == 1.0 and float(t.sort(x)[0][2]) == 2.0
        values, indices = t.sort(x)
        assert torch.equal(indices, torch.sort(x)[1])
        assert torch.equal(t.sort(x, descending=True)[0], torch.sort(x, descending=True)[0])
        assert t.nn is torch.nn and t.float32 is torch.float32
    assert sgpt_sparsify.torch is torch


def test_enable_disable_nesting_and_errors():
    original = wanda_base.sparsify_weight
    with pytest.raises(ValueError, match="statistics must be one of"):
        backend.enable("fast")
    with backend.backend():
        with backend.backend():
            assert backend.is_enabled()
        assert backend.is_enabled() and wanda_base.sparsify_weight is not original
        with pytest.raises(RuntimeError, match="already enabled"):
            backend.enable("fused")
    assert not backend.is_enabled()
    assert wanda_base.sparsify_weight is original and sgpt_sparsify.torch is torch
    with pytest.raises(RuntimeError), backend.backend():
        raise RuntimeError("inside")
    assert wanda_base.sparsify_weight is original  # restored on error too
