"""The one table of layer shapes every benchmark draws from: (out_features, in_features)."""

LLAMA2_7B = {
    "q/k/v/o 4096x4096": (4096, 4096),
    "gate/up 11008x4096": (11008, 4096),
    "down 4096x11008": (4096, 11008),
}
LLAMA3_8B = {
    "q/o 4096x4096": (4096, 4096),
    "k/v 1024x4096": (1024, 4096),
    "gate/up 14336x4096": (14336, 4096),
    "down 4096x14336": (4096, 14336),
}
SHAPE_SETS = {
    "llama7b": LLAMA2_7B,
    "llama3-8b": LLAMA3_8B,
    "all": {**LLAMA2_7B, **{k: v for k, v in LLAMA3_8B.items() if v not in LLAMA2_7B.values()}},
    "small": {"1024x1024": (1024, 1024), "1024x4096": (1024, 4096)},
}
# Calibration activations for the norm benchmarks: 128 samples x 2048 tokens, fed in chunks.
ACT_TOKENS = 128 * 2048
ACT_CHUNK_TOKENS = 8 * 2048
