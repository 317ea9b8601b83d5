"""GPT-2's ``Conv1D`` layers: the product of ``nn.Linear`` with the weight stored transposed, (in, out).

Libraries handle them unevenly. transformers' bitsandbytes integration transposes them itself, and GPTQModel
quantizes them (the packed format is the linear's either way). torchao's ``quantize_`` and transformers'
``TorchAoConfig`` touch ``nn.Linear`` only, and torchao's tensors implement ``linear`` but not the ``addmm``
Conv1D computes with: a torchao artifact holds each Conv1D as the equivalent ``nn.Linear`` (weight (out, in)),
and is loaded into the model's class with those layers built as ``nn.Linear`` (``conv1d_to_linear``) before the
weights load. transformers 5.23's GPT-2 weight init reads ``c_proj.weight`` of every attention and MLP block,
which a packed GPTQ linear does not have, so plain ``from_pretrained`` of a GPTQ GPT-2 fails: it is loaded with
those blocks marked as initialised (``mark_conv1d_parents_initialized``; every weight comes from the checkpoint).
"""

from __future__ import annotations

from pathlib import Path

from quantlab.models.load import load_causal_lm, load_config
from quantlab.models.shapes import meta_model

CONV1D_AS_LINEAR = ("stored as nn.Linear, weight (out, in): IntxLayout.load builds them as nn.Linear before the "
                    "weights load (plain from_pretrained refuses the shapes)")
CONV1D_PACKED = ("packed by GPTQModel like linears: GptqPackedLayout.load marks the blocks holding them initialised "
                 "before the weights load (plain from_pretrained fails in transformers 5.23's GPT-2 weight init)")


def is_conv1d(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def conv1d_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if is_conv1d(module)]


def conv1d_to_linear(model) -> list[str]:
    """Replace every Conv1D of ``model`` by the equivalent ``nn.Linear`` (weight transposed to (out, in), same bias,
    device and dtype; on the meta device, shapes only). Returns the names replaced."""
    import torch

    names = conv1d_names(model)
    for name in names:
        conv = model.get_submodule(name)
        nx, nf = conv.weight.shape  # (in, out)
        linear = torch.nn.Linear(nx, nf, bias=conv.bias is not None, device=conv.weight.device,
                                 dtype=conv.weight.dtype)
        if not conv.weight.is_meta:
            with torch.no_grad():
                linear.weight.copy_(conv.weight.T)
                if conv.bias is not None:
                    linear.bias.copy_(conv.bias)
        _replace(model, name, linear)
    return names


def linear_to_conv1d(model, names: list[str]) -> None:
    """Undo ``conv1d_to_linear`` on the modules ``names`` (plain ``nn.Linear`` again by then): Conv1D layers holding
    their weights, so that the model saves as its own class's checkpoint."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for name in names:
        linear = model.get_submodule(name)
        conv = Conv1D(linear.out_features, linear.in_features).to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.T)
            if linear.bias is not None:
                conv.bias.copy_(linear.bias)
        conv.weight.requires_grad_(linear.weight.requires_grad)
        conv.bias.requires_grad_(linear.bias is not None and linear.bias.requires_grad)
        _replace(model, name, conv)


def mark_conv1d_parents_initialized(model) -> list[str]:
    """Mark each module holding a Conv1D as initialised, so transformers' weight init skips it (GPT-2's reads
    ``c_proj.weight``, which the packed linear that replaces the Conv1D on load lacks)."""
    parents = {name.rpartition(".")[0] for name in conv1d_names(model)}
    for name in parents:
        model.get_submodule(name)._is_hf_initialized = True
    return sorted(parents)


def conv1d_note(count: int, how: str) -> dict:
    """``{"conv1d": ...}`` for an artifact's notes (its manifest) when the model has ``count`` > 0 Conv1D layers."""
    return {"conv1d": f"{count} Conv1D layers (GPT-2's transposed linears) {how}"} if count else {}


def count_conv1d(path: str | Path, trust_remote_code: bool = False) -> int:
    """Conv1D layers of the model at ``path``, counted on the meta device."""
    return len(conv1d_names(meta_model(load_config(path, trust_remote_code), trust_remote_code)))


def load_conv1d_aware(path: str | Path, device: str, trust_remote_code: bool, prepare, **kwargs):
    """``load_causal_lm`` of ``path``; a model with Conv1D layers is loaded into its own class with ``prepare(model)``
    applied once the model is built and before its weights load, and comes back as an instance of that class."""
    skeleton = meta_model(load_config(path, trust_remote_code), trust_remote_code)
    if not conv1d_names(skeleton):
        return load_causal_lm(path, device=device, trust_remote_code=trust_remote_code, **kwargs)
    cls = type(skeleton)

    class Prepared(cls):
        def __init__(self, config, *args, **init_kwargs):
            super().__init__(config, *args, **init_kwargs)
            prepare(self)

    # the same class to transformers in all but the hook: its name, module (custom-code checks) and defaults
    Prepared.__name__, Prepared.__qualname__, Prepared.__module__ = cls.__name__, cls.__qualname__, cls.__module__
    model = load_causal_lm(path, device=device, trust_remote_code=trust_remote_code, model_class=Prepared, **kwargs)
    model.__class__ = cls  # no quantlab code left in the model
    return model


def _replace(root, name: str, module) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, leaf, module)
