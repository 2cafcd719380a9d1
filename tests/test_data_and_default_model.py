"""The offline corpus split, calibration windows, and the embedded default model end to end."""

import contextlib

import pytest
import torch

from ecoflap_fast import data


def test_wiki_split_is_disjoint_and_deterministic():
    articles = data.wiki_articles()
    assert len(articles) == 10033
    calib, held = data.split(articles)
    assert len(held) == 1004 and len(calib) == 10033 - 1004
    assert not set(calib) & set(held)
    assert data.split(data.wiki_articles()) == (calib, held)


def test_windows():
    tokens = torch.arange(1000)
    w1 = data.calibration_windows(tokens, 8, 64, seed=3)
    assert w1.shape == (8, 64) and torch.equal(w1, data.calibration_windows(tokens, 8, 64, seed=3))
    assert bool(((w1[:, 1:] - w1[:, :-1]) == 1).all())  # contiguous windows
    assert not torch.equal(w1, data.calibration_windows(tokens, 8, 64, seed=4))
    ev = data.eval_windows(tokens, 100, 4)
    assert torch.equal(ev.flatten(), tokens[:400])
    with pytest.raises(ValueError, match="too little calibration text"):
        data.calibration_windows(tokens[:10], 1, 64)
    with pytest.raises(ValueError, match="too little evaluation text"):
        data.eval_windows(tokens[:10], 64)


@pytest.mark.slow
def test_default_model_prunes_end_to_end():
    from ecoflap_fast import evaluate, models
    from ecoflap_fast.prune import PruneConfig, prune_

    model, tok = models.load_model("default")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(model.model.layers) == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    calib, held = data.split(data.wiki_articles())
    calibration = data.calibration_windows(data.tokenize(tok, calib[:2000]), 8, 64, seed=0)
    windows = data.eval_windows(data.tokenize(tok, held[:200]), 256, 2)
    dense = evaluate.perplexity(model, windows, progress=False)
    rep = prune_(model, calibration, PruneConfig(sparsity=0.5, nsamples=8, seqlen=64, progress=False))
    pruned = evaluate.perplexity(model, windows, progress=False)
    assert rep["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert 5 < dense < 40, dense
    assert dense < pruned < 20 * dense, (dense, pruned)


@pytest.mark.slow
def test_default_model_exports_round_trip(tmp_path):
    """Every format of the 2:4-pruned default model reloads to the same perplexity as in memory (bf16)."""
    from ecoflap_fast import evaluate, export_, load_sparse, models
    from ecoflap_fast.export import FORMATS
    from ecoflap_fast.prune import PruneConfig, prune_

    model, tok = models.load_model("default")
    calib, held = data.split(data.wiki_articles())
    prune_(
        model,
        data.calibration_windows(data.tokenize(tok, calib[:1000]), 4, 64),
        PruneConfig(pattern="2:4", allocator="uniform", progress=False),
    )
    windows = data.eval_windows(data.tokenize(tok, held[:100]), 128, 1)
    export_(model, tmp_path / "ref", "hf-dense", dtype=torch.bfloat16)
    want = evaluate.perplexity(load_sparse(tmp_path / "ref"), windows, progress=False)
    for fmt in FORMATS:
        export_(model, tmp_path / fmt, fmt, dtype=torch.bfloat16)
        with pytest.warns(UserWarning) if fmt == "torch-24" else contextlib.nullcontext():
            back = load_sparse(tmp_path / fmt)
        assert evaluate.perplexity(back, windows, progress=False) == want, fmt
