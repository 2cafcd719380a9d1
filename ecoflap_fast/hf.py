"""What transformers offers for a model config: the class to build it with, the dtype argument."""

from __future__ import annotations

import torch


def dtype_kw(dtype: torch.dtype) -> dict:
    """transformers >= 4.56 names the argument ``dtype``; older releases ``torch_dtype``."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def model_class(config):
    """The transformers class a folder was saved from (``config.architectures``), else the class of
    its kind: encoder-decoder LM, causal LM, or the bare model."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if config.model_type == "clip":
        return transformers.CLIPModel
    for auto in (
        transformers.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else None,
        transformers.AutoModelForCausalLM,
        transformers.AutoModel,
    ):
        if auto is not None and type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    raise ValueError(f"no transformers model class is known for a {type(config).__name__}")
