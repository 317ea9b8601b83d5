"""Quantized linears of a decoder layer built, when the layer runs, as the modules its artifact loads whole into.

A float8 (compressed-tensors W8A16) artifact's linears load whole as ``Fp8Linear`` (``quantlab.layouts.fp8``), a
bitsandbytes 4-bit artifact's as ``bnb.nn.Linear4bit`` over prequantized ``Params4bit`` (what transformers' loader
makes). Layer by layer, each layer's meta ``nn.Linear`` skeletons are swapped for fresh modules of that class filled
from the checkpoint in the layer's forward pre-hook, and swapped back in its forward hook: the same module class and
forward as the whole load, so the same arithmetic; between forwards only the packed tensors' layer is held.
"""

from __future__ import annotations

from quantlab.errors import ModelLoadError
from quantlab.fp8_linear import fp8_linear_class


def swapped_linears(config, reader, layers, layers_prefix: str, device: str):
    """The ``SwappedLinears`` of an artifact whose linears are float8 or bitsandbytes 4-bit, else None."""
    quantization = getattr(config, "quantization_config", None)
    if not isinstance(quantization, dict):
        quantization = getattr(quantization, "to_dict", lambda: {})()
    method = quantization.get("quant_method")
    if method == "compressed-tensors":
        return SwappedLinears(layers, layers_prefix, reader, device, _fp8_linear, "weight_scale")
    if method == "bitsandbytes" and quantization.get("load_in_4bit"):
        dtype = quantization.get("bnb_4bit_compute_dtype") or "float32"
        return SwappedLinears(layers, layers_prefix, reader, device, _bnb4_linear(dtype), "weight.absmax")
    if method == "bitsandbytes":
        raise ModelLoadError("A bitsandbytes int8 artifact is not run layer by layer — raise --max-memory so it "
                             "loads whole")
    return None


class SwappedLinears:
    """The linears of each layer whose checkpoint holds ``<name>.<marker>``, built by ``build(reader, name, linear,
    device)`` at each load."""

    def __init__(self, layers, layers_prefix: str, reader, device: str, build, marker: str):
        import torch

        self.build, self.device = build, device
        self.templates: dict[int, dict[str, object]] = {}  # layer index -> {linear name: its meta nn.Linear}
        for i, layer in enumerate(layers):
            self.templates[i] = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)
                                 and f"{layers_prefix}.{i}.{name}.{marker}" in reader}
        self.names = {id(layer): set(self.templates[i]) for i, layer in enumerate(layers)}
        if not any(self.templates.values()):
            raise ModelLoadError(f"The checkpoint's config names a quantized format but no layer holds its "
                                 f"{marker} tensors — raise --max-memory so it loads whole")

    def owns(self, layer, param_name: str) -> bool:
        """Whether ``param_name`` of ``layer`` belongs to one of its swapped linears (filled by ``load``)."""
        return param_name.rpartition(".")[0] in self.names.get(id(layer), ())

    def load(self, layer, i: int, prefix: str, reader) -> None:
        for name, template in self.templates.get(i, {}).items():
            module = self.build(reader, f"{prefix}.{name}", template, self.device)
            layer.set_submodule(name, module.train(template.training))  # eval, as the model: bnb's CPU path checks

    def release(self, layer, i: int) -> None:
        for name, template in self.templates.get(i, {}).items():
            layer.set_submodule(name, template)


def _fp8_linear(reader, name: str, template, device: str):
    bias = reader.read(f"{name}.bias").to(device) if f"{name}.bias" in reader else None
    return fp8_linear_class()(reader.read(f"{name}.weight").to(device), reader.read(f"{name}.weight_scale").to(device),
                              bias)


def _bnb4_linear(compute_dtype: str):
    def build(reader, name: str, template, device: str):
        import bitsandbytes as bnb
        import torch

        stats = {key[len(name) + len(".weight."):]: reader.read(key) for key in reader.entries
                 if key.startswith(f"{name}.weight.")}
        module = bnb.nn.Linear4bit(template.in_features, template.out_features, bias=template.bias is not None,
                                   compute_dtype=getattr(torch, compute_dtype), device="meta")
        module.weight = bnb.nn.Params4bit.from_prequantized(reader.read(f"{name}.weight"), stats, device=device,
                                                            module=module)
        if template.bias is not None:
            module.bias = torch.nn.Parameter(reader.read(f"{name}.bias").to(device, getattr(torch, compute_dtype)),
                                             requires_grad=False)
        return module

    return build

