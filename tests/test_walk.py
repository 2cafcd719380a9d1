"""The walk refuses what it does not understand, before any weight changes, with one line naming
the class; its plan names what stays dense; `ecoflap-fast inspect` prints it."""

from __future__ import annotations

import pytest
import torch
from arch_zoo import build
from torch import nn

from ecoflap_fast import PruneConfig, prune_, walk
from ecoflap_fast.cli import main


class _Block(nn.Module):
    def __init__(self, width=16, raw=0):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.raw = nn.Parameter(torch.randn(raw, width)) if raw else None

    def forward(self, h):
        h = h + self.lin(h)
        return h + (h @ self.raw.t() @ self.raw) * 1e-3 if self.raw is not None else h


class _Toy(nn.Module):
    """A stack of blocks whose forward can misbehave in the ways the walk must refuse."""

    def __init__(self, mode="plain", raw=0):
        super().__init__()
        self.layers = nn.ModuleList(_Block(raw=raw) for _ in range(3))
        self.mode = mode

    def forward(self, x):
        h = x
        order = list(self.layers)
        if self.mode == "reversed":
            order = order[::-1]
        if self.mode == "twice":
            order = order + order
        for i, b in enumerate(order):
            h = b(h)
            if self.mode == "between":
                h = h * 2
        return h


@pytest.mark.parametrize(
    "mode,raw,message",
    [
        ("twice", 0, r"_Toy: block layers.0 is called 2 times in one forward"),
        ("reversed", 0, r"_Toy: in layers, blocks run in the order \[2, 1, 0\]"),
        ("between", 0, r"_Toy: the hidden states change between blocks layers.0 and layers.1"),
        ("plain", 64, r"_Toy: the plan would leave 80% of the block weights unpruned \(largest: layers.\d.raw"),
    ],
)
def test_refused_with_one_line_naming_the_class(mode, raw, message):
    model = _Toy(mode, raw)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(walk.WalkError, match=message) as e:
        walk.plan(model, {"x": torch.randn(2, 5, 16)})
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plain_toy_is_understood():
    plan = walk.plan(_Toy(), {"x": torch.randn(2, 5, 16)})
    assert [b.path for b in plan.blocks] == ["layers.0", "layers.1", "layers.2"]
    assert plan.coverage() == 1.0


def _tiny(cls_name):
    import transformers

    if cls_name == "funnel":
        cfg = transformers.FunnelConfig(vocab_size=64, block_sizes=[1, 1], d_model=16, n_head=2, d_head=8, d_inner=32)
        return transformers.FunnelModel(cfg).eval()
    cfg = transformers.AlbertConfig(
        vocab_size=64,
        embedding_size=16,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
    )
    return transformers.AlbertModel(cfg).eval()


@pytest.mark.parametrize(
    "cls_name,message",
    [
        ("albert", "AlbertModel: no repeated transformer blocks found"),
        (
            "funnel",
            r"FunnelModel: the plan would leave \d+% of the block weights unpruned "
            r"\(largest: encoder.blocks.0.0.\S+ \(stack not run\)",
        ),
    ],
)
def test_real_classes_the_walk_cannot_handle_are_refused_unchanged(cls_name, message):
    model = _tiny(cls_name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        prune_(model, torch.randint(0, 64, (4, 8)), PruneConfig(sparsity=0.5, progress=False))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_calibration_refused_before_work():
    model, _ = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="calibration token windows must be an integer tensor"):
        prune_(model, torch.randn(4, 8), PruneConfig(progress=False))
    with pytest.raises(TypeError, match="calibration batch 0 must be a dict of model inputs"):
        prune_(model, ["text"], PruneConfig(progress=False))
    with pytest.raises(ValueError, match="sparsity map must map matrix names"):
        prune_(model, torch.randint(3, 100, (4, 8)), PruneConfig(progress=False, sparsity_map=[0.5]))
    with pytest.raises(ValueError, match="cannot be combined with pattern 2:4"):
        prune_(model, torch.randint(3, 100, (4, 8)), PruneConfig(progress=False, pattern="2:4", sparsity_map={}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_names_dense_parameters_with_reasons():
    model, batches = build("qwen2-moe")
    s = walk.plan(model, batches[0]).summary()
    assert s["dense"]["router"]["names"] == [
        f"model.layers.{i}.mlp.{n}.weight" for i in range(3) for n in ("gate", "shared_expert_gate")
    ]
    assert s["dense"]["embedding"]["names"] == ["model.embed_tokens.weight"]
    assert s["dense"]["head"]["names"] == ["lm_head.weight"]
    assert s["experts"] == {
        f"model.layers.{i}.mlp.experts.{p}": 4 for i in range(3) for p in ("gate_up_proj", "down_proj")
    }
    t5, batches = build("t5")
    s = walk.plan(t5, batches[0]).summary()
    assert [st["path"] for st in s["stacks"]] == ["encoder.block", "decoder.block"]
    assert [st["capture"] for st in s["stacks"]] == ["full blocks", "full blocks"]  # T5's block 0 returns biases


def test_inspect_prints_the_plan(tmp_path, capsys):
    model, _ = build("gpt2")
    model.save_pretrained(tmp_path / "gpt2")
    assert main(["inspect", "--model", str(tmp_path / "gpt2")]) == 0
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel: 1 stack(s), 12 prunable matrices" in out
    assert "transformer.h: 3 blocks, capture by identity stubs" in out
    assert "attn.c_attn [192, 64]" in out  # Conv1D shown as [out, in]
    assert "dense (embedding)" in out
