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


def renamed_checkpoint_names(model, names) -> dict[str, str]:
    """model tensor name -> checkpoint tensor name, for the tensors of a checkpoint saved under names
    transformers renames when it loads them (e.g. DINOv2's ``attention.attention.query`` that
    transformers 5 loads as ``attention.q_proj``): transformers' own renaming rules for the model
    (its conversion mapping) applied to every checkpoint name that is not a model name. Only pure
    renames are followed; a tensor transformers would split or merge on load is left out (it stays
    missing, and the caller says so). A model tensor stored twice (under its own name and a renamed
    one, or under two names renamed to it) is a ValueError. Empty where this transformers has no
    renaming rules."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers < 5: checkpoints load under their own names
        return {}
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # a model transformers has no mapping for
        return {}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    stored = set(names)
    out: dict[str, str] = {}
    for name in names:
        if name in state:
            continue
        new, converter = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
        if converter is not None or new not in state:
            continue
        other = new if new in stored else out.get(new)
        if other is not None:  # which one transformers would load depends on its loading order: refuse
            raise ValueError(
                f"the checkpoint stores {new} twice, as {other!r} and as {name!r} (renamed on load); keep one"
            )
        out[new] = name
    return out
