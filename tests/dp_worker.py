"""Run under torchrun by tests/test_parallel.py: prune a zoo model data-parallel; rank 0 saves the
pruned matrices and the report to the path given."""

import sys

import torch
from arch_zoo import B, build

from ecoflap_fast import PruneConfig, parallel, prune_


def main():
    name, allocator, out = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    assert parallel.init_from_env("cpu") and parallel.world() == 2
    model, batches = build(name)
    batches = batches + build(name, seed=1)[1]  # 6 batches: 3 per rank
    rep = prune_(
        model,
        batches,
        PruneConfig(sparsity=0.5, allocator=allocator, batch_size=B, progress=False),
        stage1_calibration=batches[:4],
    )
    if parallel.is_main():
        half = rep["stage1"].get("split_half_spearman")
        torch.save(
            {
                "state": model.state_dict(),
                "map": rep["sparsity_map"],
                "tokens": rep["expert_tokens"],
                "half": half,
                "decision": rep["stage1"].get("decision"),
            },
            out,
        )


if __name__ == "__main__":
    main()
