"""Depth pruning: scorers against brute force, a real smaller checkpoint that plain transformers
loads and that computes what deleting the layers by hand computes, bad input refused before work."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from arch_zoo import build

from ecoflap_fast import depth, objectives, walk

pytestmark = pytest.mark.usefixtures("one_thread")


def _by_hand(model, path, removed):
    """The model with the blocks ``removed`` deleted from its block list and from the config's layer
    count and ``layer_types`` (Gemma-3 picks each position's mask and rotary table from that list)."""
    m = copy.deepcopy(model)
    parent_path, _, attr = path.rpartition(".")
    parent = m.get_submodule(parent_path)
    blocks = getattr(parent, attr)
    setattr(parent, attr, torch.nn.ModuleList([b for i, b in enumerate(blocks) if i not in removed]))
    if getattr(m.config, "layer_types", None) is not None:
        m.config.layer_types = [t for i, t in enumerate(m.config.layer_types) if i not in removed]
    m.config.num_hidden_layers = len(blocks) - len(removed)
    return m


def _loss(model, batches):
    total = 0.0
    with torch.no_grad():
        for b in batches:
            logits = model(**b, use_cache=False).logits
            total += float(
                F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["input_ids"][:, 1:].reshape(-1))
            )
    return total / len(batches)


def _plan(model, batches):
    return walk.plan(model, batches[0]), objectives.for_model(model)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_iterative_scores_equal_brute_force(name):
    model, batches = build(name)
    plan, obj = _plan(model, batches)
    path = plan.stacks[0].path
    got = depth.choose_blocks(model, plan, obj, batches, 2, depth.DepthConfig(scorer="iterative", progress=False))
    # step 1: every single removal by hand
    n = len(plan.stacks[0].blocks)
    first = {j: _loss(_by_hand(model, path, {j}), batches) for j in range(n)}
    step1 = got["steps"][0]
    for j, v in first.items():
        assert step1["losses"][j] == pytest.approx(v, rel=1e-4), (j, step1["losses"][j], v)
    j0 = min(first, key=first.get)
    assert step1["removed"] == j0
    second = {j: _loss(_by_hand(model, path, {j0, j}), batches) for j in range(n) if j != j0}
    for j, v in second.items():
        assert got["steps"][1]["losses"][j] == pytest.approx(v, rel=1e-4)
    assert got["removal_order"] == [j0, min(second, key=second.get)]


def test_block_influence_equals_hidden_state_cosine():
    model, batches = build("llama")
    plan, obj = _plan(model, batches)
    got = depth.choose_blocks(model, plan, obj, batches, 1, depth.DepthConfig(scorer="bi", progress=False))
    with torch.no_grad():
        hs = [model(**b, use_cache=False, output_hidden_states=True).hidden_states for b in batches]
    n = len(plan.stacks[0].blocks)
    for j in range(n - 1):  # hidden_states[j] is block j's input; the last entry is after the final norm
        want = sum(float(1 - F.cosine_similarity(h[j], h[j + 1], dim=-1).mean()) for h in hs) / len(hs)
        assert got["scores"][j] == pytest.approx(want, rel=1e-5, abs=1e-7)


def _qwen2_moe_sparse_step():
    """Qwen2-MoE with MoE in every second layer (decoder_sparse_step=2) and layer 3 forced dense."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
        use_cache=False,
        attn_implementation="eager",
    )
    model = Qwen2MoeForCausalLM(cfg).eval()
    return model, [{"input_ids": torch.randint(3, 128, (2, 12))}]


@pytest.mark.parametrize(
    "name,removed",
    [
        ("llama", [1]),
        ("qwen3", [1]),
        ("gemma3", [0, 2]),
        ("mixtral", [1]),
        ("qwen2-moe", [1]),
        ("deepseek-v3", [0]),
        ("deepseek-v3", [2]),
        ("qwen2-moe-sparse-step", [0, 1, 4]),
    ],
)
def test_removed_blocks_make_a_real_smaller_checkpoint(name, removed, tmp_path):
    from transformers import AutoModelForCausalLM

    model, batches = _qwen2_moe_sparse_step() if name == "qwen2-moe-sparse-step" else build(name)
    plan, obj = _plan(model, batches)
    path = plan.stacks[0].path
    n = len(plan.stacks[0].blocks)
    hand = _by_hand(model, path, set(removed))
    kept_state = {k: v.clone() for k, v in hand.state_dict().items()}
    depth.remove_blocks_(model, plan, removed)
    assert model.config.num_hidden_layers == n - len(removed)
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == n - len(removed)
    for k, v in model.state_dict().items():  # kept blocks bit-equal to the source's
        assert torch.equal(v, kept_state[k]), k
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids, use_cache=False).logits
        want = hand(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "m")
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, use_cache=False).logits, want, rtol=1e-5, atol=1e-5)
        out = loaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)
    for i, layer in enumerate(loaded.get_submodule(path)):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                assert m.layer_idx == i


def test_block_count_and_bad_input():
    assert depth.block_count(2, 10) == 2
    assert depth.block_count(0.25, 10) == 2  # a fraction of the blocks, rounded
    for bad, msg in [
        (10, "would remove 10 of the model's 10 blocks"),
        (-1, "count >= 0"),
        (2.5, "whole number"),
        (float("nan"), "count >= 0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            depth.block_count(bad, 10)


def test_encoders_refused_clearly():
    model, batches = build("bert")
    plan, obj = _plan(model, batches)
    with pytest.raises(
        ValueError, match="depth pruning supports decoder-only language models for now; BertForMaskedLM"
    ):
        depth.choose_blocks(model, plan, obj, batches, 1, depth.DepthConfig(progress=False))


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    from tiny_models import tiny_llama, word_text, word_tokenizer

    root = tmp_path_factory.mktemp("depth")
    tiny_llama(layers=4).save_pretrained(root / "tiny")
    word_tokenizer().save_pretrained(root / "tiny")
    (root / "calib.txt").write_text(word_text(3000, seed=1))
    (root / "eval.txt").write_text(word_text(2000, seed=2))
    return root


def _cli(root, out, *extra):
    return [
        "prune",
        "--model",
        str(root / "tiny"),
        "--calib-text",
        str(root / "calib.txt"),
        "--eval-text",
        str(root / "eval.txt"),
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--stage1-seqlen",
        "16",
        "--depth-nsamples",
        "4",
        "--eval-windows",
        "2",
        "--eval-seqlen",
        "32",
        "--output",
        str(root / out),
        "--no-progress",
        *extra,
    ]


def test_cli_remove_blocks_alone_saves_a_smaller_model(saved_llama, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from ecoflap_fast.cli import main

    assert main(_cli(saved_llama, "d1", "--remove-blocks", "1", "--eval", "--save-model")) == 0
    out = capsys.readouterr().out
    assert "depth: removed blocks [" in out and "3 blocks left" in out
    rep = json.loads((saved_llama / "d1" / "report.json").read_text())
    d = rep["depth"]
    assert d["scorer"] == "iterative" and len(d["removed_blocks"]) == 1 and len(d["steps"]) == 1
    assert rep["achieved_sparsity"] == 0.0 and rep["ppl_pruned"] > 0
    source = AutoModelForCausalLM.from_pretrained(saved_llama / "tiny")
    small, info = AutoModelForCausalLM.from_pretrained(saved_llama / "d1" / "model", output_loading_info=True)
    assert not any(info.values()), info
    assert small.config.num_hidden_layers == 3
    kept = [i for i in range(4) if i not in d["removed_blocks"]]
    for new, old in enumerate(kept):  # --remove-blocks alone: the kept blocks are bit-equal to the source's
        for (ka, a), (kb, b) in zip(
            small.model.layers[new].state_dict().items(), source.model.layers[old].state_dict().items()
        ):
            assert ka == kb and torch.equal(a, b), (new, old, ka)


@pytest.mark.parametrize("scorer", ["bi", "ecoflap"])
def test_cli_remove_blocks_with_width_pruning(saved_llama, scorer):
    import json

    from ecoflap_fast.cli import main

    assert (
        main(
            _cli(
                saved_llama,
                f"d-{scorer}",
                "--remove-blocks",
                "0.5",
                "--block-scorer",
                scorer,
                "--sparsity",
                "0.5",
                "--allocator",
                "uniform",
            )
        )
        == 0
    )
    rep = json.loads((saved_llama / f"d-{scorer}" / "report.json").read_text())
    assert rep["depth"]["blocks_after"] == 2
    assert rep["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert len({k.split(".")[2] for k in rep["layer_sparsity"]}) == 2  # the two remaining blocks


@pytest.mark.parametrize(
    "bad,msg",
    [
        (["--remove-blocks", "4"], "would remove 4 of the model's 4 blocks"),
        (["--remove-blocks", "-1"], None),
        (["--block-scorer", "nope"], None),
    ],
)
def test_cli_depth_bad_input_before_work(saved_llama, capsys, bad, msg):
    from ecoflap_fast.cli import main

    args = _cli(saved_llama, "bad", *bad)
    if msg is None:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
    else:
        assert main(args) == 2
        assert msg in capsys.readouterr().err
    assert not (saved_llama / "bad").exists()
