"""Held-out quality, through the walk's forward (caches off): perplexity for language models, the
contrastive loss for CLIP-style models, and for encoders without a head the cosine between the
model's and the dense model's mean-pooled sentence embeddings.

Vision models on held-out image-caption pairs (``data.vlm_batches``), by kind:
generative VLMs :func:`caption_loss` (loss and perplexity on the caption tokens); dual encoders
:func:`retrieval` (image->text and text->image recall@1 and the contrastive loss); classifiers
:func:`top1_agreement` with the dense model's :func:`predictions`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import objectives, parallel, walk


@torch.no_grad()
def perplexity(
    model, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True, desc="perplexity", plan=None
) -> float:
    """exp(mean token cross-entropy) over equal-length token windows ``[n, seqlen]``: next-token for
    causal LMs, the decoder's labels for encoder-decoder models (first half in, second half out).
    ``plan`` of a streamed model: evaluated block by block, each block read once."""
    objective = objectives.for_model(model)
    if objective.kind not in ("causal-lm", "seq2seq"):
        raise ValueError(f"perplexity needs a language model; {type(model).__name__} is {objective.kind}")
    batches = [objective.from_ids(c) for c in windows.split(batch_size)]
    if parallel.active():  # every rank evaluates every world()-th batch; the sums are reduced
        batches, _ = parallel.shard(batches)
    if plan is not None and plan.loader is not None:
        outputs = blockwise_outputs(model, plan, batches, progress=progress, desc=desc)
    else:
        outputs = (walk.forward(model, b) for b in tqdm(batches, desc=desc, disable=not progress, leave=False))
    total, count = 0.0, 0
    for batch, out in zip(batches, outputs):
        per = objective.per_sample(out, walk.to_device(batch, out.logits.device))
        tokens = batch["labels"].shape[1] if objective.kind == "seq2seq" else batch["input_ids"].shape[1] - 1
        total += float(per.sum()) * tokens
        count += tokens * per.shape[0]
    total, count = parallel.all_reduce_floats(total, count)
    return math.exp(total / count)


@torch.no_grad()
def blockwise_outputs(
    model, plan, batches: list[dict], *, progress: bool = True, desc: str = "evaluation", **forward_kw
):
    """The model's outputs on every batch, computed block-major (a single-stack model): every block is
    held once for all batches, the last block runs inside the model's own forward for the remainder.
    ``forward_kw`` go to the model's forward."""
    if len(plan.stacks) != 1:
        with walk.on_demand(plan):
            return [walk.forward(model, b, **forward_kw) for b in batches]
    (stack,) = plan.stacks
    inputs = walk.capture(model, stack, batches)
    for block in tqdm(stack.blocks[:-1], desc=desc, disable=not progress, leave=False):
        with walk.holding(block):
            walk.advance(block, inputs)
    last = stack.blocks[-1]
    outs = []
    with walk.holding(last):
        for batch, inp in zip(batches, inputs):
            with walk.starting_at(last, inp.hidden):
                outs.append(walk.forward(model, batch, **forward_kw))
    return outs


@torch.no_grad()
def contrastive_loss(model, batches: list[dict], *, progress: bool = True) -> float:
    """Mean symmetric image-text contrastive loss of a CLIP-style model over held-out batches."""
    objective = objectives.for_model(model)
    losses = [
        float(objective.loss(model, b))
        for b in tqdm(batches, desc="contrastive loss", disable=not progress, leave=False)
    ]
    return sum(losses) / len(losses)


@torch.no_grad()
def sentence_embeddings(model, batches: list[dict], plan=None) -> list[torch.Tensor]:
    """Normalised mean-pooled last hidden states (padding excluded), fp32 [B, C] per batch. ``plan``
    of a streamed model: computed block by block, each block read once."""
    if plan is not None and plan.loader is not None:
        outputs = blockwise_outputs(model, plan, batches, progress=False, output_hidden_states=True)
    else:
        outputs = (walk.forward(model, b, output_hidden_states=True) for b in batches)
    embeddings = []
    for b, out in zip(batches, outputs):
        h = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]
        embeddings.append(objectives.sentence_embedding(h, b.get("attention_mask")))
    return embeddings


@torch.no_grad()
def embedding_cosine(model, batches: list[dict], dense: list[torch.Tensor], plan=None) -> float:
    """Mean cosine between the model's sentence embeddings and the dense model's (``dense``)."""
    mine = sentence_embeddings(model, batches, plan)
    cos = [F.cosine_similarity(e, d.to(e.device), dim=-1) for e, d in zip(mine, dense)]
    return float(torch.cat(cos).mean())


def _require(model, kind: str, what: str):
    objective = objectives.for_model(model)
    if objective.kind != kind:
        raise ValueError(f"{what} needs a {kind} model; {type(model).__name__} is {objective.kind}")
    return objective


@torch.no_grad()
def caption_loss(model, batches: list[dict], *, progress: bool = True) -> dict:
    """Caption loss of a generative VLM over held-out batches with caption ``labels``: the next-token
    cross-entropy averaged over every caption token of every pair (image placeholders, prompt and
    padding excluded, as in ``objectives``' caption-lm loss), its perplexity exp(loss), and the
    number of caption tokens."""
    objective = _require(model, "caption-lm", "the caption loss")
    total, count = 0.0, 0
    for b in tqdm(batches, desc="caption loss", disable=not progress, leave=False):
        out = walk.forward(model, b)
        per = objective.per_sample(out, walk.to_device(b, out.logits.device)).cpu()
        valid = b["labels"][:, 1:] != -100
        mask = b.get("attention_mask")
        if mask is not None:
            valid = valid & mask[:, 1:].bool() & mask[:, :-1].bool()
        n = valid.sum(1)
        total += float((per.double() * n).sum())
        count += int(n.sum())
    if not count:
        raise ValueError("the held-out batches hold no caption token")
    loss = total / count
    return {"caption_loss": loss, "caption_ppl": math.exp(loss), "caption_tokens": count}


@torch.no_grad()
def retrieval(model, batches: list[dict], *, progress: bool = True) -> dict:
    """Image-text retrieval of a dual encoder (CLIP, SigLIP) over every held-out pair at once: pair
    i's caption is the match of image i; recall@1 both ways on the cosine similarities of the model's
    own embeddings (``image_embeds``, ``text_embeds``; a tie counts as a miss unless the match is the
    first of the tied), and the model's own contrastive loss averaged over the batches."""
    _require(model, "contrastive", "retrieval")
    images, texts, losses = [], [], []
    for b in tqdm(batches, desc="retrieval", disable=not progress, leave=False):
        out = walk.forward(model, b, return_loss=True)
        images.append(F.normalize(out.image_embeds.float(), dim=-1).cpu())
        texts.append(F.normalize(out.text_embeds.float(), dim=-1).cpu())
        losses.append(float(out.loss))
    sim = torch.cat(images) @ torch.cat(texts).T
    match = torch.arange(sim.shape[0])
    return {
        "contrastive_loss": sum(losses) / len(losses),
        "image_to_text_r1": float((sim.argmax(1) == match).float().mean()),
        "text_to_image_r1": float((sim.argmax(0) == match).float().mean()),
        "pairs": int(sim.shape[0]),
    }


@torch.no_grad()
def predictions(model, batches: list[dict]) -> list[torch.Tensor]:
    """Top-1 classes ``[B]`` (int64, CPU) of a classifier per batch."""
    _require(model, "classifier", "classifier predictions")
    return [walk.forward(model, b).logits.argmax(-1).cpu() for b in batches]


@torch.no_grad()
def top1_agreement(model, batches: list[dict], dense: list[torch.Tensor]) -> float:
    """Fraction of held-out images whose top-1 class is the dense model's (``dense``: its
    :func:`predictions` on the same batches, taken before pruning)."""
    ours = torch.cat(predictions(model, batches))
    return float((ours == torch.cat(dense)).float().mean())
