"""Stage 2: the sequential layer-wise pass over the walk's blocks (SPEC §3.3).

For every stack in forward order, every block's inputs are captured from the model's own forward
(the stacks before it already pruned); then block by block: each matrix's input statistic is
accumulated on the block's captured inputs (unpruned weights; expert matrices from their routed
tokens only), ``on_block`` prunes (or measures), and the inputs run through the block as it is now
become the next block's inputs. One block's activations live at a time.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import ops, parallel, walk
from .sparsegpt import HessianAccumulator, sparsegpt_prune_

PATTERNS = {"unstructured": None, "2:4": (2, 4), "4:8": (4, 8)}
PRUNERS = ("wanda", "magnitude", "sparsegpt")


@torch.no_grad()
def sequential(
    model,
    plan: walk.Plan,
    batches: list[dict],
    on_block,
    *,
    stat=ops.ActNormAccumulator,
    desc: str = "stage 2",
    progress: bool = True,
    after_block=None,
    keep_changes: bool = False,
) -> None:
    """``on_block(block, stats, tokens)`` for every block of every stack, in forward order; then
    ``after_block(block)`` (e.g. writing a streamed block's pruned tensors) while it is still held.
    With ``keep_changes`` (``on_block`` prunes) a streamed model's blocks of every tower but the last are
    spilled once done (``BlockLoader.spill``): the later towers' inputs then come from the pruned
    upstream blocks, not from the checkpoint."""
    was_training = model.training
    model.eval()
    try:
        for stack in plan.stacks:
            inputs = walk.capture(model, stack, batches)
            for block in tqdm(stack.blocks, desc=f"{desc} ({stack.name})", disable=not progress):
                with walk.holding(block):
                    stats, tokens = walk.block_statistics(model, block, inputs, stat)
                    parallel.all_reduce_stats(stats, tokens, block.matrices, stat, walk.model_device(block.module))
                    on_block(block, stats, tokens)
                    walk.advance(block, inputs)
                    if after_block is not None:
                        after_block(block)
                    if keep_changes and plan.loader is not None and stack is not plan.stacks[-1]:
                        plan.loader.spill(block.path)  # a later tower is calibrated on it as pruned
    finally:
        model.train(was_training)


def prune_matrix(m: walk.Matrix, stat, sparsity: float, pattern: str, pruner: str) -> int:
    """Prune one matrix in place with the local pruner; ``stat`` None (no calibration input reached
    it, e.g. an expert no token was routed to) falls back to magnitude. Returns the number zeroed."""
    nm = PATTERNS[pattern]
    w = m.weight()
    kw = {"nm": nm} if nm is not None else {"sparsity": sparsity}
    if stat is None or pruner == "magnitude":
        return ops.prune_by_scores_(w, w.abs(), **kw)
    if pruner == "wanda":
        return ops.wanda_prune_(w, stat.scaler_row, **kw)
    return sparsegpt_prune_(w, stat.H, **kw)


def statistic(pruner: str):
    """The input statistic a local pruner needs: SparseGPT the Hessian, the others column norms."""
    return HessianAccumulator if pruner == "sparsegpt" else ops.ActNormAccumulator
