"""Tiny randomly initialised models of the real Hugging Face classes, one per architecture family.

The zoo the naive Wanda oracle (``tests/naive_reference.py``) and the engine's block walk are checked
on. Every model is the library's own class (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...) built
from a config in code, so nothing comes from the hub. ``build(name, seed)`` returns the model in
eval mode, fp32, ``attn_implementation="eager"``, ``use_cache=False`` in the config, MoE experts on
the eager path (``experts_implementation="eager"``: transformers 5 defaults to ``grouped_mm``; the
oracle's hooks only read the experts module's inputs and would work on either path, but eager is
the code its per-expert math restates), together with 2-3 calibration batches (dicts of model
inputs, batch 4).

What the configurations exercise (the things that break naive engines):

- ``gemma2``, ``gemma3``: sliding window 8 < T = 32 and ``layer_types`` alternating sliding/full,
  so every other block gets a different attention mask (and, for Gemma-3, a different rotary table:
  local base 1e4, global base 1e6). ``mistral``: sliding window 12 < T = 32 on every block.
- ``gpt2``: ``Conv1D`` layers (weight ``[in, out]``).
- ``falcon`` (multi-query, parallel attention), ``bloom`` (ALiBi), ``gpt-neox`` (parallel residual,
  partial rotary), ``phi3`` (fused ``qkv_proj`` / ``gate_up_proj`` Linears), ``qwen3`` / ``gemma3``
  (q/k norms), ``deepseek-v3`` (MLA attention: ``q_a_proj``, ``q_b_proj``, ``kv_a_proj_with_mqa``,
  ``kv_b_proj``; ``first_k_dense_replace=1``: block 0 has a dense MLP, blocks 1-2 are MoE with a
  shared expert and group-limited routing, 8 experts in 2 groups, ``topk_group=1``).
- ``mixtral``, ``qwen2-moe`` (shared expert + ``shared_expert_gate``), ``qwen3-moe``,
  ``deepseek-v3``: fused experts ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``, top-2
  routing; ``build`` checks that every expert of every MoE block receives tokens from the
  calibration batches of the dense model.
- ``mixtral-dead-expert`` (in ``EXTRA_NAMES``, not a separate class): ``mixtral`` with expert 5 of
  block 1 unreachable. Its router logits are ``x @ W.T`` with no bias and ``x`` of any sign, so a
  "very negative row" cannot be made input-independent; instead block 1's router weight is edited
  after init to rows ``w1 = -w0``, ``w3 = -w2``, ``w5 = 0``. For every token
  ``max(l0, l1) = |w0 . x| >= 0`` and ``max(l2, l3) = |w2 . x| >= 0 = l5``: two experts always score at
  least as high as expert 5 (equality only if ``w0 . x = 0`` exactly), so top-2 never picks it,
  whatever the earlier blocks' pruning did to ``x``. ``build`` checks the count is 0 and that the
  other experts still get tokens.
- ``t5``: ``T5ForConditionalGeneration`` (gated-gelu, v1.1 style), encoder and decoder stacks, the
  decoder's cross-attention reading the encoder's output; batches carry ``decoder_input_ids``.
- ``bert`` (``BertForMaskedLM``, blocks at ``bert.encoder.layer``) and ``roberta``
  (``RobertaForMaskedLM``, ``roberta.encoder.layer``): ``input_ids`` + ``attention_mask``; batch 1
  is right-padded (rows padded by 0, 5, 9 and 13 tokens) so the mask matters. Tokens are drawn from
  ids >= 3, so only padding uses the pad id (RoBERTa derives position ids from it).
"""

from __future__ import annotations

import torch

B = 4  # calibration batch size of every builder

# name -> (builder of (model class, config), seq len, number of batches, block list paths)
_SPECS: dict = {}


def _spec(name, seq, nbatches, blocks):
    def register(fn):
        _SPECS[name] = (fn, seq, nbatches, blocks)
        return fn

    return register


_COMMON = dict(attn_implementation="eager", use_cache=False)
_MOE = dict(_COMMON, experts_implementation="eager")


@_spec("llama", 24, 3, ["model.layers"])
def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **_COMMON,
    )
    return LlamaForCausalLM, cfg


@_spec("mistral", 32, 3, ["model.layers"])
def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=12, **_COMMON,
    )
    return MistralForCausalLM, cfg


@_spec("qwen2", 24, 3, ["model.layers"])
def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **_COMMON,
    )
    return Qwen2ForCausalLM, cfg


@_spec("qwen3", 24, 3, ["model.layers"])
def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, **_COMMON,
    )
    return Qwen3ForCausalLM, cfg


@_spec("phi3", 24, 3, ["model.layers"])
def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **_COMMON,
    )
    return Phi3ForCausalLM, cfg


_LOCAL_GLOBAL = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


@_spec("gemma2", 32, 3, ["model.layers"])
def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=128,
        sliding_window=8, layer_types=list(_LOCAL_GLOBAL), **_COMMON,
    )
    return Gemma2ForCausalLM, cfg


@_spec("gemma3", 32, 3, ["model.layers"])
def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=128,
        sliding_window=8, layer_types=list(_LOCAL_GLOBAL), **_COMMON,
    )
    return Gemma3ForCausalLM, cfg


@_spec("opt", 24, 3, ["model.decoder.layers"])
def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=128, dropout=0.0, **_COMMON,
    )
    return OPTForCausalLM, cfg


@_spec("gpt2", 24, 3, ["transformer.h"])
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=256, n_embd=64, n_layer=3, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **_COMMON,
    )
    return GPT2LMHeadModel, cfg


@_spec("gpt-neox", 24, 3, ["gpt_neox.layers"])
def _gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "partial_rotary_factor": 0.5}, **_COMMON,
    )
    return GPTNeoXForCausalLM, cfg


@_spec("falcon", 24, 3, ["transformer.h"])
def _falcon():
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, multi_query=True,
        parallel_attn=True, bias=False, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, **_COMMON,
    )
    return FalconForCausalLM, cfg


@_spec("bloom", 24, 3, ["transformer.h"])
def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(
        vocab_size=256, hidden_size=64, n_layer=3, n_head=4, pretraining_tp=1, slow_but_exact=False, **_COMMON,
    )
    return BloomForCausalLM, cfg


@_spec("mixtral", 24, 3, ["model.layers"])
def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_local_experts=6, num_experts_per_tok=2,
        sliding_window=None, **_MOE,
    )
    return MixtralForCausalLM, cfg


@_spec("qwen2-moe", 24, 3, ["model.layers"])
def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=64, decoder_sparse_step=1, **_MOE,
    )
    return Qwen2MoeForCausalLM, cfg


@_spec("qwen3-moe", 24, 3, ["model.layers"])
def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True, **_MOE,
    )
    return Qwen3MoeForCausalLM, cfg


@_spec("deepseek-v3", 24, 3, ["model.layers"])
def _deepseek_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, n_group=2,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=128, **_MOE,
    )
    return DeepseekV3ForCausalLM, cfg


@_spec("t5", 24, 3, ["encoder.block", "decoder.block"])
def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=16, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **_COMMON,
    )
    return T5ForConditionalGeneration, cfg


@_spec("bert", 24, 3, ["bert.encoder.layer"])
def _bert():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        **_COMMON,
    )
    return BertForMaskedLM, cfg


@_spec("roberta", 24, 3, ["roberta.encoder.layer"])
def _roberta():
    from transformers import RobertaConfig, RobertaForMaskedLM

    cfg = RobertaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, **_COMMON,
    )
    return RobertaForMaskedLM, cfg


ZOO_NAMES = [
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "opt", "gpt2", "gpt-neox", "falcon", "bloom",
    "mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3", "t5", "bert", "roberta",
]
EXTRA_NAMES = ["mixtral-dead-expert"]
ALL_NAMES = ZOO_NAMES + EXTRA_NAMES
MOE_NAMES = ["mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3", "mixtral-dead-expert"]
ENCODER_NAMES = ["bert", "roberta"]  # padded batches with attention masks

# mixtral-dead-expert: (block index, expert index) that no token can reach
DEAD_EXPERT = (1, 5)

_PAD_ROWS = (0, 5, 9, 13)  # tokens of right padding per row in the padded encoder batch


def _base(name: str) -> str:
    return "mixtral" if name == "mixtral-dead-expert" else name


def block_lists(name: str) -> list[str]:
    """Attribute paths of the model's repeated block lists, in forward order (hand-written per class)."""
    return list(_SPECS[_base(name)][3])


def config_of(name: str):
    """The config ``build(name)`` uses (a fresh object)."""
    return _SPECS[_base(name)][0]()[1]


def make_batches(name: str, config, seed: int = 0) -> list[dict]:
    """2-3 dicts of model inputs of batch ``B``; token ids from a fixed generator (never all zero)."""
    _, seq, nbatches, _ = _SPECS[_base(name)]
    g = torch.Generator().manual_seed(1000 + seed)
    low = 3  # keep ids 0-2 (pad / bos / eos of the various configs) for the special positions
    batches = []
    for b in range(nbatches):
        ids = torch.randint(low, config.vocab_size, (B, seq), generator=g)
        batch = {"input_ids": ids}
        if name == "t5":
            dec = torch.randint(low, config.vocab_size, (B, seq), generator=g)
            dec[:, 0] = config.decoder_start_token_id
            batch["decoder_input_ids"] = dec
        if _base(name) in ENCODER_NAMES:
            mask = torch.ones(B, seq, dtype=torch.long)
            if b == 1:
                for row, pad in enumerate(_PAD_ROWS):
                    if pad:
                        mask[row, seq - pad:] = 0
                        ids[row, seq - pad:] = config.pad_token_id
            batch["attention_mask"] = mask
        batches.append(batch)
    return batches


def expert_modules(model) -> dict:
    """{module name: module} of the fused-experts modules (a 3-D ``gate_up_proj`` parameter)."""
    out = {}
    for mname, mod in model.named_modules():
        p = getattr(mod, "gate_up_proj", None)
        if isinstance(p, torch.nn.Parameter) and p.dim() == 3:
            out[mname] = mod
    return out


@torch.no_grad()
def route_counts(model, batches) -> dict:
    """{experts module name: LongTensor[E]} tokens routed to each expert over ``batches`` (one forward
    each), read from the ``top_k_index`` argument the MoE block passes to its experts module."""
    mods = expert_modules(model)
    counts = {n: torch.zeros(m.gate_up_proj.shape[0], dtype=torch.long) for n, m in mods.items()}

    def hook(name):
        def fn(_mod, args, kwargs):
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            counts[name] += torch.bincount(idx.reshape(-1), minlength=counts[name].numel())[: counts[name].numel()]

        return fn

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in mods.items()]
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return counts


def _kill_expert(model, block: int, expert: int) -> None:
    """Rows of block ``block``'s router: w1 = -w0, w3 = -w2, w[expert] = 0 (see the module docstring)."""
    router = model.model.layers[block].mlp.gate
    with torch.no_grad():
        w = router.weight
        assert expert not in (0, 1, 2, 3), "the paired rows must differ from the dead expert"
        w[1] = -w[0]
        w[3] = -w[2]
        w[expert] = 0.0


def build(name: str, seed: int = 0):
    """(model, batches): the real transformers class, random init from ``seed``, eval, fp32, eager
    attention, caches off; MoE: eager experts and every expert routed to (except the dead one)."""
    if name not in _SPECS and name not in EXTRA_NAMES:
        raise KeyError(f"unknown zoo model {name!r}; known: {ALL_NAMES}")
    factory = _SPECS[_base(name)][0]
    cls, cfg = factory()
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    model.config.use_cache = False
    if name == "mixtral-dead-expert":
        _kill_expert(model, *DEAD_EXPERT)
    assert model.config._attn_implementation == "eager", (name, model.config._attn_implementation)
    batches = make_batches(name, model.config, seed)
    if name in MOE_NAMES:
        assert model.config._experts_implementation == "eager", (name, model.config._experts_implementation)
        counts = route_counts(model, batches)
        assert counts, f"{name}: no fused experts module found"
        for mname, c in counts.items():
            starved = [e for e in range(c.numel()) if c[e] == 0]
            if name == "mixtral-dead-expert" and mname == f"model.layers.{DEAD_EXPERT[0]}.mlp.experts":
                assert starved == [DEAD_EXPERT[1]], (mname, c.tolist())
            else:
                assert not starved, f"{name}: {mname} experts {starved} get no calibration token ({c.tolist()})"
    return model, batches
