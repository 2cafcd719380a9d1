"""Shared Triton helpers: fp32 scores and their order-preserving integer keys."""

import triton
import triton.language as tl


@triton.jit
def score_of(w, sqrt_s, ABS: tl.constexpr, SCALED: tl.constexpr):
    """fp32 score exactly like the reference: fp32(|w|) * sqrt(scaler) (sqrt precomputed, correctly
    rounded, by the launcher), or the raw value for caller-provided scores."""
    v = w.to(tl.float32)
    if ABS:
        v = tl.abs(v)
    if SCALED:
        v = v * sqrt_s
    return v


@triton.jit
def order_key(score):
    """int64 in [0, 2**32) whose order is the float order; -0.0 folds onto +0.0 so they tie."""
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648
