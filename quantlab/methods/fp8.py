"""FP8 weight-only (W8A16): e4m3 weights with one scale per output channel, no calibration.

Each linear's row absmax maps onto e4m3's largest value: ``weight_scale = rowabsmax / 448`` (float32, (out, 1)) and
``weight = (w / weight_scale).clamp(±448).to(float8_e4m3fn)``, written directly in torch as compressed-tensors'
W8A16 FP8 channel checkpoint, which vLLM reads (``quantlab.layouts.fp8``). GPTQModel's FP8Config was the other
route: it writes a per-row ``weight_scale_inv`` (448 / absmax, a quantize multiplier) under quant_method "fp8", a
form neither vLLM nor transformers reads. The output head and everything else stay at the source's dtype.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from quantlab.device import CPU
from quantlab.errors import RecipeError
from quantlab.fsutil import atomic_write_text
from quantlab.layerwise.quantize import save_companions, write_layer_by_layer
from quantlab.layouts.fp8 import E4M3_MAX, Fp8Layout, quantization_config
from quantlab.methods.base import Method, layer_by_layer_write_peak
from quantlab.models.load import load_causal_lm, save_with_tokenizer
from quantlab.models.shapes import meta_model

_COMPUTE = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Fp8Config:
    #: activations and unquantized parts once loaded: fp32 on CPU, bf16 on CUDA for ``auto``
    compute_dtype: str = "auto"

    def __post_init__(self):
        if self.compute_dtype not in _COMPUTE:
            raise RecipeError(f"fp8 compute_dtype '{self.compute_dtype}' — use one of {', '.join(_COMPUTE)}")

    @property
    def bits(self) -> int:
        return 8


class Fp8Method(Method):
    name = "fp8"
    config_cls = Fp8Config
    short_pattern = re.compile(r"fp8")
    example_names = ("fp8",)

    def config_from_match(self, match):
        return Fp8Config()

    def short_name(self, config):
        return "fp8"

    def layout(self, config):
        return Fp8Layout(config.compute_dtype)

    def quantize(self, config, source_dir: Path, out_dir: Path, device: str, *, data_dir=None,
                 trust_remote_code=False) -> dict:
        # Row absmax and a cast: cheap, so always on CPU; the source's dtype is kept for what stays unquantized.
        model = load_causal_lm(source_dir, device=CPU, trust_remote_code=trust_remote_code, dtype="auto")
        head = _head_name(model)
        count = quantize_linears(model, skip=head)
        save_with_tokenizer(model, source_dir, out_dir, trust_remote_code)
        path = Path(out_dir) / "config.json"
        data = json.loads(path.read_text())
        data["quantization_config"] = quantization_config(ignore=[head] if head else [])
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return {"library": "torch", "format": "compressed-tensors float-quantized (W8A16 FP8, channel)",
                "layout": "float8_e4m3fn weight + float32 weight_scale (out, 1) per linear", "linears": count}

    def quantize_layer_by_layer(self, config, source_dir: Path, out_dir: Path, device: str, *, data_dir=None,
                                trust_remote_code=False) -> dict:
        """``quantize`` one decoder layer at a time (``quantlab.layerwise.quantize.write_layer_by_layer``): every
        linear in a layer as e4m3 and its scale; the embedding, norms and head (outside the layers) as stored."""
        model_config = write_layer_by_layer(source_dir, out_dir, lambda layer: quantize_linears(layer, skip=None),
                                            trust_remote_code=trust_remote_code)
        model_config.quantization_config = quantization_config(ignore=_head_names(model_config, trust_remote_code))
        save_companions(source_dir, out_dir, model_config, trust_remote_code)
        return {"library": "torch", "format": "compressed-tensors float-quantized (W8A16 FP8, channel)",
                "layout": "float8_e4m3fn weight + float32 weight_scale (out, 1) per linear",
                "written": "layer by layer from the safetensors, one shard per layer"}

    def layer_by_layer_peak(self, config, sizes, device):
        """One fp layer and its e4m3 linears and scales; the tensors outside the layers copied in blocks first."""
        return layer_by_layer_write_peak(self.layout(config), sizes, device)

    def quantize_peak(self, config, sizes, device):
        """The source loaded whole (the pages of its mapped checkpoint stay resident as every linear is read), the
        e4m3 linears and float32 scales made beside it, and what saving holds, at most the artifact again. SmolLM2
        (fp32 source): planned 865 MB; the quantize step held 809 MB."""
        fp8 = sum(lin.weights + lin.count * lin.out_features * 4 for lin in sizes["shapes"].linears)
        return {"fp model": sizes["fp_weights"], "e4m3 linears and scales": fp8, "saving": sizes["quantized_weights"]}


def fp8_quantize(weight):
    """(float8_e4m3fn (out, in), float32 scale (out, 1)) of a weight: its row absmax onto 448, then e4m3's rounding."""
    import torch

    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def quantize_linears(model, skip: str | None) -> int:
    """Replace every ``nn.Linear`` weight but the head's by its e4m3 values and add its ``weight_scale``."""
    import torch

    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == skip:
            continue
        q, scale = fp8_quantize(module.weight)
        module.weight = torch.nn.Parameter(q, requires_grad=False)
        module.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        count += 1
    return count


def _head_names(config, trust_remote_code: bool) -> list[str]:
    """``ignore`` of the quantization config: the output head's module name, from the model class on meta."""
    head = _head_name(meta_model(config, trust_remote_code))
    return [head] if head else []


def _head_name(model) -> str | None:
    head = model.get_output_embeddings()
    return next((name for name, m in model.named_modules() if m is head), None)
