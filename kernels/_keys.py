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
    """uint32 whose unsigned order is the float order of the fp32 ``score`` (one register per
    element); -0.0 folds onto +0.0 so they tie. Scores other than NaN map into [0x007FFFFF, 0xFF800000]
    (the keys of -inf and +inf), so 0 and 0xFFFFFFFF (:data:`PAD_KEY32`) are never a score's key."""
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    signed = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # two's-complement order = float order
    return (signed ^ -2147483648).to(tl.uint32, bitcast=True)  # flip the sign bit: unsigned order


# Key of the padding lanes of a row block: after every finite score's key.
PAD_KEY32 = tl.constexpr(0xFFFFFFFF)
