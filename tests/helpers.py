"""Input generators with ties and exact-comparison helpers shared by the tests."""

from __future__ import annotations

import torch

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtype_id(dt) -> str:
    return str(dt).replace("torch.", "")


def tie_heavy_weight(rows: int, cols: int, dtype, *, gen: torch.Generator | None = None) -> torch.Tensor:
    """Dequantized-looking weights: few distinct values (4-bit levels × a per-row scale), zero
    weights, an all-equal row and a row of zeros, so the selection must resolve ties by index."""
    levels = torch.randint(-8, 8, (rows, cols), generator=gen).float()
    scale = torch.rand(rows, 1, generator=gen) * 0.05 + 0.01
    w = levels * scale
    if rows > 2:
        w[1] = 0.25  # all-equal row
        w[2] = 0.0  # all-zero row
    return w.to(dtype)


# 64 consecutive fp32 values: their square roots collide in runs, and torch's CPU sqrt rounds some of
# them one ulp away from the correctly rounded root, so which columns tie depends on the rounding.
SQRT_RUN = (torch.tensor(1.5249675512313843).view(torch.int32) + torch.arange(64, dtype=torch.int32)).view(
    torch.float32
)


def tie_heavy_scaler(cols: int, *, gen: torch.Generator | None = None) -> torch.Tensor:
    """Activation statistics with repeats, dead (zero) channels, and a run of adjacent floats whose
    square roots tie or not depending on how the root is rounded."""
    s = torch.randint(0, 4, (cols,), generator=gen).float() * 0.5
    pick = torch.randint(0, 2, (cols,), generator=gen).bool()
    s[pick] = SQRT_RUN[torch.randint(0, 64, (int(pick.sum()),), generator=gen)]
    return s


def assert_equal_exact(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    """Exact equality (bitwise for floats); on failure name the first mismatching indices."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.cpu(), expected.cpu()
    if a.is_floating_point():
        a = a.view(torch.int16 if a.element_size() == 2 else (torch.int32 if a.element_size() == 4 else torch.int8))
        e = e.view(a.dtype)
    diff = (a != e).nonzero()
    if len(diff):
        idx = [tuple(int(v) for v in d) for d in diff[:5]]
        raise AssertionError(
            f"{what}: {len(diff)} of {a.numel()} elements differ; first at {idx}: "
            f"actual {[actual.cpu()[i].item() for i in idx]} expected {[expected.cpu()[i].item() for i in idx]}"
        )


def block_linears(model, paths) -> dict:
    """Every nn.Linear inside the block lists at ``paths`` (attribute paths written by the test, not
    found by the engine), by full module name, in module order."""
    out = {}
    for path in paths:
        for name, m in model.get_submodule(path).named_modules():
            if isinstance(m, torch.nn.Linear):
                out[f"{path}.{name}"] = m
    return out
