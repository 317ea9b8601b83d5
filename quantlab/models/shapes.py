"""A config's model built on the meta device (every module and shape, no weights), and its linear layers."""

from __future__ import annotations


def meta_model(config, trust_remote_code: bool = False):
    """The config's model class built on the meta device: every module and shape, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def linear_dims(module) -> tuple[int, int] | None:
    """(out, in) of a linear layer a method quantizes: an ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's
    projections: the same product with the weight stored transposed, (in, out)); None for any other module."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0]
    return None


def linear_shapes(config, trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer a method would quantize (``linear_dims``), built on the meta device."""
    model = meta_model(config, trust_remote_code)
    out_embed = model.get_output_embeddings()
    return {name: dims for name, m in model.named_modules()
            if m is not out_embed and (dims := linear_dims(m)) is not None}


def count_params(config, trust_remote_code: bool = False) -> int:
    return sum(p.numel() for p in meta_model(config, trust_remote_code).parameters())
