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
LLAMA_70B = {  # LLaMA-2/3-70B: hidden 8192, 8 KV heads of 128, MLP 28672
    "q/o 8192x8192": (8192, 8192),
    "k/v 1024x8192": (1024, 8192),
    "gate/up 28672x8192": (28672, 8192),
    "down 8192x28672": (8192, 28672),
}


def _union(*sets: dict) -> dict:
    """Every distinct shape once, under the first name it has."""
    out, seen = {}, set()
    for s in sets:
        for name, shape in s.items():
            if shape not in seen:
                seen.add(shape)
                out[name] = shape
    return out


SHAPE_SETS = {
    "llama7b": LLAMA2_7B,
    "llama3-8b": LLAMA3_8B,
    "llama70b": LLAMA_70B,
    "all": _union(LLAMA2_7B, LLAMA3_8B, LLAMA_70B),
    "small": {"1024x1024": (1024, 1024), "1024x4096": (1024, 4096)},
}
# Calibration activations for the norm benchmarks: 128 samples x 2048 tokens, fed in chunks.
ACT_TOKENS = 128 * 2048
ACT_CHUNK_TOKENS = 8 * 2048
