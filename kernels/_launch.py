"""One launch description per kernel call: the function that builds it is the only place a launch
configuration (grid, compile-time block sizes, warps, stages) is chosen.

The launchers in this package build a :class:`Launch` and call it; ``ecoflap_fast.bench.aot``
(``benchmarks/aot_report.py``) builds the same object from meta tensors of the benchmark shapes
and compiles it ahead of time for a GPU target, so the report sees exactly what would run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Triton's default software-pipelining depth on CUDA, passed explicitly so the ahead-of-time report
# compiles with the value the launch uses.
DEFAULT_STAGES = 3


@dataclass(frozen=True)
class Launch:
    """A kernel with its runtime arguments and compile-time configuration.

    kernel:     the ``@triton.jit`` function
    grid:       program counts per axis
    args:       runtime arguments in the kernel's order (tensors, ints)
    constexprs: compile-time constants by name (CAPS)
    num_warps, num_stages: Triton compile options
    bytes_per_element: global-memory bytes moved per element of the main operand (weight, or
        activation for the norm kernel), counted as SPEC §5 counts them (see each builder)
    tile_bytes: bytes of the main operand one program loads at once (the whole row for the per-row
        select, one tile otherwise): with the CTAs resident per SM, the bytes each SM has in flight
    passes: sequential block-wide operations (reductions, scans, histograms) over one program's
        row or tile after it is loaded (see each builder)
    variant: which algorithm of the op this launch runs ("" when the op has one)
    """

    kernel: Any
    grid: tuple
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = DEFAULT_STAGES
    bytes_per_element: float = 0.0
    tile_bytes: int = 0
    passes: int = 0
    variant: str = ""

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))
