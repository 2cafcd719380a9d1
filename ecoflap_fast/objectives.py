"""The loss each kind of model is trained with, for stage 1 and evaluation (SPEC §3.1).

  causal-lm       next-token cross-entropy over the whole sequence (padding ignored)
  seq2seq         the prefix-LM loss of encoder-decoder models: token windows are split in half,
                  the first half is the encoder input and the second half the decoder's labels
  masked-lm       masked-token cross-entropy on 15% of the tokens, replaced by random tokens
  contrastive     the image-text contrastive loss of dual encoders, the model's own: CLIP's
                  symmetric softmax loss, SigLIP's sigmoid loss
  caption-lm      generative vision-language models (BLIP-2, LLaVA, Qwen2-VL, ...): next-token
                  cross-entropy on the caption tokens only (``labels``, -100 on the image
                  placeholders, the prompt and padding; ``data.vlm_batches`` makes them)
  classifier      image (or sequence) classifiers: cross-entropy against the dense model's own
                  predictions (its argmax labels on the same inputs, computed once by ``prepare``)
  representation  encoders without a head (sentence embedders): the sensitivity of the sentence
                  embedding, <u, e> with e the normalised mean-pooled last hidden state on the clean
                  inputs and u a fixed random direction per sequence (drawn from the batch's seed).
                  Any loss against the dense model on the same inputs has zero gradient at the dense
                  weights; the gradient of <u, e> measures how far a change of a weight moves the
                  embedding itself, which is what a sentence embedder is judged on.

Every loss is computed in fp32. ``per_sample`` returns one value per sequence for the losses that
are a mean over sequences (the batched finite differences need it); the contrastive loss couples
the samples of a batch and has none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import walk

CORRUPT_FRACTION = 0.15


def _token_ce(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean cross-entropy [B] over the positions where ``valid`` holds (fp32)."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    ce = ce.view(targets.shape) * valid
    return ce.sum(1) / valid.sum(1).clamp_min(1)


def _corrupt(ids: torch.Tensor, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids with CORRUPT_FRACTION of the positions replaced by random tokens, the replaced positions),
    drawn from ``seed`` so every evaluation of a batch sees the same corruption."""
    g = torch.Generator().manual_seed(seed)
    where = torch.rand(ids.shape, generator=g) < CORRUPT_FRACTION
    where[:, 0] |= ~where.any(1)  # at least one position per sequence
    random = torch.randint(0, vocab, ids.shape, generator=g)
    return torch.where(where, random.to(ids.dtype), ids.cpu()).to(ids.device), where.to(ids.device)


def sentence_embedding(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, d] fp32: the mean over the (unmasked) tokens of ``hidden`` [B, T, d], normalised to unit
    length (sentence-transformers' mean pooling)."""
    h = hidden.float()
    m = mask.to(h.device, h.dtype).unsqueeze(-1) if mask is not None else torch.ones_like(h[..., :1])
    return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)


@dataclass
class Objective:
    kind: str
    description: str
    images: bool = False  # the model takes pixel inputs: calibrated and evaluated on images

    @property
    def separable(self) -> bool:
        return self.kind != "contrastive"

    def from_ids(self, ids: torch.Tensor) -> dict:
        """Model inputs for a chunk of token windows ``[b, T]``."""
        if self.kind == "seq2seq":
            half = max(1, ids.shape[1] // 2)
            return {"input_ids": ids[:, :half].contiguous(), "labels": ids[:, half:].contiguous()}
        return {"input_ids": ids}

    def prepare(self, model, batches: list[dict]) -> list[dict]:
        """Batches ready for :meth:`loss`: the representation loss adds the seed of its random
        directions (``_direction_seed``); masked-lm the corrupted inputs; the classifier loss the
        dense model's argmax labels (``_dense_labels``)."""
        if self.kind == "classifier":
            with torch.no_grad():
                return [dict(b, _dense_labels=walk.forward(model, b).logits.argmax(-1)) for b in batches]
        if self.kind == "representation":
            return [dict(b, _direction_seed=7919 * (i + 1)) for i, b in enumerate(batches)]
        if self.kind != "masked-lm":
            return batches
        out = []
        vocab = model.get_input_embeddings().num_embeddings
        for i, b in enumerate(batches):
            corrupted, where = _corrupt(b["input_ids"], vocab, 7919 * (i + 1))
            out.append(dict(b, input_ids=corrupted, _where=where, _clean=b["input_ids"]))
        return out

    @staticmethod
    def inputs(batch: dict) -> dict:
        """The model inputs of a prepared batch (private entries removed)."""
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def per_sample(self, outputs, batch: dict) -> torch.Tensor:
        """[B] fp32 loss per sequence from the model's outputs on ``inputs(batch)``."""
        mask = batch.get("attention_mask")
        if self.kind == "caption-lm" and "labels" not in batch:
            raise ValueError("the caption loss needs 'labels' in every batch (caption tokens; see data.vlm_batches)")
        if self.kind in ("causal-lm", "caption-lm"):
            ids = batch.get("labels", batch["input_ids"])
            valid = (ids[:, 1:] != -100).float()
            if mask is not None:
                valid = valid * mask[:, 1:].float() * mask[:, :-1].float()
            return _token_ce(outputs.logits[:, :-1], ids[:, 1:].clamp_min(0), valid)
        if self.kind == "seq2seq":
            if "labels" in batch:
                labels = batch["labels"]
                return _token_ce(outputs.logits, labels.clamp_min(0), (labels != -100).float())
            dec = batch["decoder_input_ids"]
            return _token_ce(outputs.logits[:, :-1], dec[:, 1:], torch.ones_like(dec[:, 1:], dtype=torch.float32))
        if self.kind == "masked-lm":
            return _token_ce(outputs.logits, batch["_clean"], batch["_where"].float())
        if self.kind == "classifier":
            if "_dense_labels" not in batch:
                raise ValueError("the classifier loss needs the dense model's labels: prepare() the batches first")
            logits = outputs.logits.float()
            return F.cross_entropy(logits, batch["_dense_labels"].to(logits.device), reduction="none")
        if self.kind == "representation":
            if "_direction_seed" not in batch:
                raise ValueError("the representation loss needs its random directions: prepare() the batches first")
            e = sentence_embedding(outputs.last_hidden_state, mask)
            u = torch.randn(e.shape, generator=torch.Generator().manual_seed(batch["_direction_seed"]))
            return (e * u.to(e.device)).sum(-1)
        raise ValueError(f"the {self.kind} loss has no per-sample form")

    def loss(self, model, batch: dict) -> torch.Tensor:
        """The scalar fp32 loss of one prepared batch (differentiable when grad is enabled)."""
        if self.kind == "contrastive":
            return walk.forward(model, self.inputs(batch), return_loss=True).loss.float()
        out = walk.forward(model, self.inputs(batch))
        return self.per_sample(out, batch).mean()


def for_model(model) -> Objective:
    """The objective of ``model``'s kind; ValueError for a kind without one."""
    objective = _objective_of(model)
    objective.images = walk.takes_argument(model, "pixel_values")
    return objective


def _objective_of(model) -> Objective:
    cfg = model.config
    name = type(model).__name__
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    takes_images = walk.takes_argument(model, "pixel_values")
    if takes_images and out_emb is not None:  # an LM head over image + text inputs: a generative VLM
        return Objective(
            "caption-lm",
            "caption loss: next-token cross-entropy on the caption tokens (image placeholders and prompt ignored)",
        )
    if hasattr(model, "get_image_features") and hasattr(model, "get_text_features"):
        if "siglip" in getattr(cfg, "model_type", ""):
            return Objective("contrastive", "image-text contrastive loss (SigLIP's sigmoid loss, the model's own)")
        return Objective("contrastive", "symmetric image-text contrastive loss (the model's own)")
    if name.endswith("ForImageClassification") or (
        name.endswith("Classification") and getattr(cfg, "num_labels", 0) > 1
    ):
        return Objective("classifier", "cross-entropy against the dense model's predictions (its argmax labels)")
    if getattr(cfg, "is_encoder_decoder", False):
        return Objective(
            "seq2seq", "prefix-LM loss: encoder reads the first half of each window, decoder predicts the rest"
        )
    if name.endswith("ForMaskedLM"):
        return Objective("masked-lm", "masked-token cross-entropy (15% of tokens replaced by random tokens)")
    if out_emb is not None and (name.endswith("ForCausalLM") or name.endswith("LMHeadModel")):
        return Objective("causal-lm", "next-token cross-entropy over the whole sequence")
    if name.endswith("Model") and out_emb is None:
        return Objective(
            "representation",
            "sentence embedding sensitivity: <u, normalised mean-pooled last hidden state> with a fixed random "
            "direction u per sequence",
        )
    raise ValueError(
        f"{name}: no training objective is known for this kind of model (causal LM, encoder-decoder, "
        "masked LM, generative vision-language model, CLIP-style dual encoder, classifier or bare encoder)"
    )
