"""Tiny randomly initialised vision(-language) models of the real transformers classes, each with the
class's own processor built in code (nothing comes from the hub).

``build_vlm(name, seed)`` returns ``(model, processor, batches)``: the model in eval mode, fp32, eager
attention, caches off in the config; its processor (the class's ``*Processor`` over a word-level
tokenizer of the caption words and an image processor at 16-32 px); and 2 calibration batches of 4
image-caption pairs made by ``ecoflap_fast.data.vlm_batches`` through that processor. ``tower_paths``
gives the block lists of every tower, written by hand per class (not found by the walk), in forward
order, keyed by tower name.

What the configurations exercise:

- ``clip``, ``siglip``: dual encoders (contrastive loss; SigLIP's sigmoid loss).
- ``vit``: ``ViTForImageClassification`` (classifier, no text).
- ``blip2``: vision encoder, Q-Former (cross-attention every 2nd layer, so its blocks differ) reading
  the image features as ``encoder_hidden_states``, OPT language model; the processor inserts the query
  placeholders itself.
- ``instructblip``: the same with the instruction text in the Q-Former (``qformer_input_ids``): the
  query and text tokens go through different feed-forward Linears of the Q-Former layers.
- ``llava``: CLIP vision tower (features of the second-to-last layer) + Llama.
- ``qwen2-vl``: packed patches ``pixel_values [patches, C*T*P*P]`` with ``image_grid_thw``; vision
  blocks take ``[seq, C]`` hidden states with ``cu_seqlens``; M-RoPE in the language model.
- ``qwen2.5-vl``: the same with window attention in the vision tower (block 1 full attention, block 0
  windowed: the two blocks get different ``cu_seqlens``).
- ``gemma3-vl``: SigLIP vision tower + Gemma-3 text model with local/global layers and bidirectional
  attention over the image tokens (``token_type_ids``).
- ``idefics3``, ``smolvlm``: images split into tiles + a global image by the processor, pixel shuffle
  connector, row/column tile tokens.
- ``paligemma``: SigLIP + Gemma with the prefix-LM format (``suffix`` = caption, ``token_type_ids``).
"""

from __future__ import annotations

import contextlib

import torch

B = 4  # pairs per calibration batch
NBATCHES = 2

VLM_NAMES = [
    "clip", "siglip", "vit", "blip2", "instructblip", "llava", "qwen2-vl", "qwen2.5-vl", "gemma3-vl", "idefics3",
    "smolvlm", "paligemma",
]

_EAGER = dict(attn_implementation="eager")

# name -> {tower name: [block list paths]} (hand-written from the modeling files of transformers 5)
TOWERS = {
    "clip": {"vision": ["vision_model.encoder.layers"], "text": ["text_model.encoder.layers"]},
    "siglip": {"vision": ["vision_model.encoder.layers"], "text": ["text_model.encoder.layers"]},
    "vit": {"vision": ["vit.layers"]},
    "blip2": {
        "vision": ["vision_model.encoder.layers"],
        "qformer": ["qformer.encoder.layer"],
        "language": ["language_model.model.decoder.layers"],
    },
    "instructblip": {
        "vision": ["vision_model.encoder.layers"],
        "qformer": ["qformer.encoder.layer"],
        "language": ["language_model.model.decoder.layers"],
    },
    "llava": {"vision": ["model.vision_tower.encoder.layers"], "language": ["model.language_model.layers"]},
    "qwen2-vl": {"vision": ["model.visual.blocks"], "language": ["model.language_model.layers"]},
    "qwen2.5-vl": {"vision": ["model.visual.blocks"], "language": ["model.language_model.layers"]},
    "gemma3-vl": {
        "vision": ["model.vision_tower.encoder.layers"],
        "language": ["model.language_model.layers"],
    },
    "idefics3": {"vision": ["model.vision_model.encoder.layers"], "language": ["model.text_model.layers"]},
    "smolvlm": {"vision": ["model.vision_model.encoder.layers"], "language": ["model.text_model.layers"]},
    "paligemma": {
        "vision": ["model.vision_tower.encoder.layers"],
        "language": ["model.language_model.layers"],
    },
}


def tower_paths(name: str) -> dict[str, list[str]]:
    return {k: list(v) for k, v in TOWERS[name].items()}


def block_lists(name: str) -> list[str]:
    """Every tower's block lists, in forward order."""
    return [p for paths in TOWERS[name].values() for p in paths]


# ---- tokenizers and image processors ----------------------------------------------------------------
def _caption_words() -> list[str]:
    from ecoflap_fast.data import image_caption_pairs

    calib, held = image_caption_pairs()
    words = {w for _, c in calib + held for w in c.split()}
    return sorted(words | {"caption", "describe", "the", "image", "en", "question", "answer"})


def word_tokenizer(specials=(), named=None, bos="<s>", eos="</s>", pad="<pad>"):
    """A word-level fast tokenizer over the caption words; ``specials`` (and the values of ``named``,
    e.g. {"image_token": "<image>"}) are special tokens matched before whitespace splitting."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    named = dict(named or {})
    base = [pad, "<unk>", bos, eos]
    extra = [t for t in list(specials) + list(named.values()) if t not in base]
    vocab = {t: i for i, t in enumerate(base + extra)}
    for w in _caption_words():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in base + extra])
    kw = dict(tokenizer_object=tok, unk_token="<unk>", pad_token=pad, bos_token=bos, eos_token=eos)
    if named:
        kw["extra_special_tokens"] = named
    return PreTrainedTokenizerFast(**kw)


def _vocab(tok, margin=8) -> int:
    return len(tok) + margin


# ---- builders -----------------------------------------------------------------------------------------
def _clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = word_tokenizer()
    proc = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tok)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=_vocab(tok), max_position_embeddings=64, pad_token_id=0, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, **_EAGER,
    )
    return CLIPModel(cfg), proc


def _siglip():
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tok = word_tokenizer()
    proc = SiglipProcessor(SiglipImageProcessor(size={"height": 32, "width": 32}), tok)
    cfg = SiglipConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=_vocab(tok), max_position_embeddings=64, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        **_EAGER,
    )
    return SiglipModel(cfg), proc


def _vit():
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    proc = ViTImageProcessor(size={"height": 32, "width": 32})
    cfg = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                    patch_size=8, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_EAGER)
    return ViTForImageClassification(cfg), proc


def _opt_text(tok):
    return dict(model_type="opt", vocab_size=_vocab(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=128, dropout=0.0,
                pad_token_id=0, bos_token_id=2, eos_token_id=3)


def _blip_vision():
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8)


def _blip2():
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    tok = word_tokenizer()
    proc = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tok, num_query_tokens=4)
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = Blip2Config(
        vision_config=_blip_vision(),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            cross_attention_frequency=2, encoder_hidden_size=32, vocab_size=64,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        text_config=_opt_text(tok), num_query_tokens=4, image_token_index=image_id, **_EAGER,
    )
    return Blip2ForConditionalGeneration(cfg), proc


def _instructblip():
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )

    tok = word_tokenizer()
    qtok = word_tokenizer(bos="[CLS]", eos="[SEP]", pad="[PAD]")
    proc = InstructBlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok, qtok, num_query_tokens=4)
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = InstructBlipConfig(
        vision_config=_blip_vision(),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            cross_attention_frequency=2, encoder_hidden_size=32, vocab_size=_vocab(qtok),
                            max_position_embeddings=64, pad_token_id=0, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0),
        text_config=_opt_text(tok), num_query_tokens=4, image_token_index=image_id, **_EAGER,
    )
    return InstructBlipForConditionalGeneration(cfg), proc


def _llama_text(tok, **kw):
    return dict(model_type="llama", vocab_size=_vocab(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                pad_token_id=0, bos_token_id=2, eos_token_id=3, **kw)


def _llava():
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = word_tokenizer(named={"image_token": "<image>"})
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_proc, tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8),
        text_config=_llama_text(tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16, **_EAGER,
    )
    return LlavaForConditionalGeneration(cfg), proc


_QWEN_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


@contextlib.contextmanager
def _without_video():
    """Within: a processor takes ``video_processor=None``. Its class check looks the video processor
    class up in transformers' video mapping, which is a placeholder without torchvision; images only
    never touch the video processor."""
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, arg):
        return None if name == "video_processor" and arg is None else check(self, name, arg)

    ProcessorMixin.check_argument_for_proper_class = lenient
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def _qwen_vl(version):
    import transformers as tf

    tok = word_tokenizer(specials=_QWEN_SPECIAL)
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIAL}
    image_proc = tf.Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8, merge_size=2,
                                          temporal_patch_size=2)
    text = dict(vocab_size=_vocab(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                pad_token_id=0, bos_token_id=2, eos_token_id=3)
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], **_EAGER)
    if version == "2":
        with _without_video():
            proc = tf.Qwen2VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=None)
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **common)
        return tf.Qwen2VLForConditionalGeneration(cfg), proc
    with _without_video():
        proc = tf.Qwen2_5_VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=None)
    vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    return tf.Qwen2_5_VLForConditionalGeneration(cfg), proc


_LOCAL_GLOBAL = ["sliding_attention", "full_attention"]


def _gemma_text(tok, **kw):
    return dict(vocab_size=_vocab(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                pad_token_id=0, bos_token_id=2, eos_token_id=3, **kw)


def _siglip_vision():
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8)


def _gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = word_tokenizer(named=named)
    proc = Gemma3Processor(Gemma3ImageProcessor(size={"height": 32, "width": 32}), tok, image_seq_length=4)
    text = _gemma_text(tok, query_pre_attn_scalar=16, sliding_window=8, layer_types=list(_LOCAL_GLOBAL))
    cfg = Gemma3Config(
        text_config=text, vision_config=_siglip_vision(), mm_tokens_per_image=4,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"), **_EAGER,
    )
    return Gemma3ForConditionalGeneration(cfg), proc


_TILE_TOKENS = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
_IDEFICS_SPECIAL = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *_TILE_TOKENS]


def _idefics(kind):
    import transformers as tf

    tok = word_tokenizer(specials=_IDEFICS_SPECIAL)
    size = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    vision = _siglip_vision()
    text = _llama_text(tok)
    image_id = tok.convert_tokens_to_ids("<image>")
    if kind == "idefics3":
        proc = tf.Idefics3Processor(tf.Idefics3ImageProcessor(**size), tok, image_seq_len=4)
        cfg = tf.Idefics3Config(vision_config=vision, text_config=text, image_token_id=image_id, scale_factor=2,
                                **_EAGER)
        return tf.Idefics3ForConditionalGeneration(cfg), proc
    with _without_video():
        proc = tf.SmolVLMProcessor(tf.SmolVLMImageProcessor(**size), tok, video_processor=None, image_seq_len=4)
    cfg = tf.SmolVLMConfig(vision_config=vision, text_config=text, image_token_id=image_id, scale_factor=2, **_EAGER)
    return tf.SmolVLMForConditionalGeneration(cfg), proc


def _paligemma():
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    tok = word_tokenizer(named={"image_token": "<image>"})
    image_proc = SiglipImageProcessor(size={"height": 32, "width": 32})
    image_proc.image_seq_length = 16
    proc = PaliGemmaProcessor(image_proc, tok)  # adds the location and segmentation tokens to the tokenizer
    text = _gemma_text(tok)
    text["model_type"] = "gemma"
    cfg = PaliGemmaConfig(vision_config=_siglip_vision(), text_config=text, projection_dim=64,
                          image_token_index=tok.convert_tokens_to_ids("<image>"), **_EAGER)
    return PaliGemmaForConditionalGeneration(cfg), proc


_BUILDERS = {
    "clip": _clip, "siglip": _siglip, "vit": _vit, "blip2": _blip2, "instructblip": _instructblip, "llava": _llava,
    "qwen2-vl": lambda: _qwen_vl("2"), "qwen2.5-vl": lambda: _qwen_vl("2.5"), "gemma3-vl": _gemma3,
    "idefics3": lambda: _idefics("idefics3"), "smolvlm": lambda: _idefics("smolvlm"), "paligemma": _paligemma,
}


def build_model(name: str, seed: int = 0):
    """(model, processor): the real class, random init from ``seed``, eval, fp32, eager, caches off."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown VLM zoo model {name!r}; known: {VLM_NAMES}")
    torch.manual_seed(seed)
    model, proc = _BUILDERS[name]()
    model = model.float().eval()
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = False
    return model, proc


def build_vlm(name: str, seed: int = 0):
    """(model, processor, calibration batches): ``NBATCHES`` batches of ``B`` embedded image-caption pairs."""
    from ecoflap_fast import data

    model, proc = build_model(name, seed)
    calib, _ = data.image_caption_pairs()
    batches = data.vlm_batches(calib[: B * NBATCHES], proc, model, batch_size=B)
    return model, proc, batches


def held_out(name: str, proc, model):
    """Held-out batches (the embedded pairs that are never used for calibration)."""
    from ecoflap_fast import data

    _, held = data.image_caption_pairs()
    return data.vlm_batches(held, proc, model, batch_size=B)
