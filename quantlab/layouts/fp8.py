"""FP8 weights (e4m3, one scale per output channel), 16-bit activations: compressed-tensors' W8A16 FP8 checkpoint.

On disk each quantized linear holds ``weight`` float8_e4m3fn (out, in) and ``weight_scale`` float32 (out, 1), the
dequantization multiplier (w ≈ weight * weight_scale); config.json names quant_method "compressed-tensors", format
"float-quantized", a channel-strategy float weight scheme and no activation scheme. That is the form vLLM's
CompressedTensorsW8A16Fp8 reads. A user loads it with plain ``from_pretrained`` once compressed-tensors is installed;
on CPU compressed-tensors then decompresses every weight to the load dtype on the first forward, so the model holds
dense weights. quantlab's ``load`` takes the same route but, before any forward, puts each linear's fp8 weight and
scale into an ``Fp8Linear`` that dequantizes per forward: the same logits (fp8 -> load dtype is exact, one product
per value), with the bytes of fp8 held.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.device import as_device
from quantlab.fp8_linear import hold_fp8
from quantlab.layouts import Layout
from quantlab.models.load import load_causal_lm

#: largest finite float8_e4m3fn value: a row's absmax maps onto it
E4M3_MAX = 448.0


def quantization_config(ignore: list[str]) -> dict:
    """config.json's ``quantization_config``: compressed-tensors W8A16 FP8, per output channel, the output head
    (``ignore``) left alone."""
    weights = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
               "group_size": None, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "float-quantized"}},
            "ignore": ignore, "kv_cache_scheme": None}


@dataclass(frozen=True)
class Fp8Layout(Layout):
    compute_dtype: str = "auto"
    # transformers reads the checkpoint through compressed-tensors (plain ``from_pretrained``: the standalone load)
    libraries = ("compressed_tensors",)
    layer_by_layer = True  # each layer's Fp8Linear built from the checkpoint (quantlab.layerwise.linears)

    def dtype_name(self, device: str) -> str:
        return as_device(device).default_dtype_name if self.compute_dtype == "auto" else self.compute_dtype

    def unquantized_dtype_bytes(self, device):
        return {"float32": 4}.get(self.dtype_name(device), 2)

    def linear_bytes(self, out_features, in_features, device):
        """One e4m3 byte per weight and one scale per output row; transformers loads the scale at the load dtype."""
        return {"data": out_features * in_features, "scales": out_features * self.unquantized_dtype_bytes(device)}

    def note(self):
        return "float8 e4m3 weight + one scale per output row (at the compute dtype)"

    def dequantize_bytes_per_value(self, device):
        """``Fp8Linear.forward`` holds the weight cast to the compute dtype and its product with the scale."""
        return 2 * self.unquantized_dtype_bytes(device)

    def load_kwargs(self, device):
        """Activations and unquantized parts at fp32 on CPU, bf16 on CUDA, unless a compute dtype is named."""
        import torch

        return {"dtype": getattr(torch, self.dtype_name(device))}

    def load(self, path, device, trust_remote_code=False):
        model = load_causal_lm(path, device=device, trust_remote_code=trust_remote_code, **self.load_kwargs(device))
        hold_fp8(model)
        return model
