"""Round-to-nearest weight-only quantization: the reference every smarter method must beat.

The arithmetic is plain affine RTN (``fake_quantize`` below spells it out in torch). Two storage
layouts (``quantlab.layouts``), chosen by ``format``:

- ``torchao`` (default): integers, scales and zero points in torchao's intx layout
  (IntxUnpackedToInt8Tensor) through transformers' TorchAoConfig. On CPU torchao keeps int4 one value
  per byte; memory is measured on what loads.
- ``gptq``: GPTQModel's own RTN written in the packed GPTQ format (eight int4 values per int32), so RTN
  and GPTQ compare like for like in memory and latency. Its grid is GPTQ's symmetric grid (scale
  max|w|/7.5, zero point 8), which matches torchao's symmetric int4 grid up to rounding ties.

Either way ``from_pretrained`` reloads real quantized weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import RecipeError
from quantlab.layerwise.quantize import BLOCK_BYTES as LAYERWISE_BLOCK_BYTES
from quantlab.layerwise.quantize import quantize_torchao_layer_by_layer
from quantlab.conv1d import CONV1D_AS_LINEAR, CONV1D_PACKED, conv1d_note, count_conv1d
from quantlab.layouts.gptq import GptqPackedLayout
from quantlab.layouts.intx import IntxLayout
from quantlab.methods.base import Method, check_group_size
from quantlab.methods.gptqmodel_runner import import_gptqmodel, run_gptqmodel
from quantlab.methods.torchao_ptq import save_torchao

_BITS = (8, 4)
_FORMATS = ("torchao", "gptq")
_GPTQ_SUFFIX = "-gptqfmt"


@dataclass(frozen=True)
class RtnConfig:
    bits: int = 4
    group_size: int = 64
    symmetric: bool = True
    format: str = "torchao"

    def __post_init__(self):
        if self.format not in _FORMATS:
            raise RecipeError(f"rtn format must be one of {', '.join(_FORMATS)} (got {self.format!r})")
        if self.bits not in _BITS:
            raise RecipeError(f"rtn bits must be 8 or 4 (got {self.bits}) — use rtn-w8 or rtn-w4-g64")
        if self.group_size != -1 and self.group_size < 2:
            raise RecipeError(f"rtn group_size must be -1 (per channel) or ≥ 2 (got {self.group_size})")


class RtnMethod(Method):
    name = "rtn"
    config_cls = RtnConfig
    short_pattern = re.compile(r"rtn-w(\d+)(?:-g(\d+))?(-asym)?(-gptqfmt)?")
    example_names = ("rtn-w8", "rtn-w4-g128", "rtn-w4-g64", "rtn-w4-g32", "rtn-w4-g64-gptqfmt")

    def config_from_match(self, match):
        group = int(match.group(2)) if match.group(2) else -1
        return RtnConfig(bits=int(match.group(1)), group_size=group, symmetric=not match.group(3),
                         format="gptq" if match.group(4) else "torchao")

    def short_name(self, config):
        group = f"-g{config.group_size}" if config.group_size != -1 else ""
        return (f"rtn-w{config.bits}{group}" + ("" if config.symmetric else "-asym")
                + (_GPTQ_SUFFIX if config.format == "gptq" else ""))

    def check_model(self, config, linear_shapes):
        check_group_size(config.group_size, linear_shapes)

    def layout(self, config):
        layout = GptqPackedLayout if config.format == "gptq" else IntxLayout
        return layout(config.bits, config.group_size)

    def torchao_config(self, config):
        import torch
        from torchao.quantization import IntxWeightOnlyConfig, PerAxis, PerGroup
        from torchao.quantization.quant_primitives import MappingType

        granularity = PerAxis(0) if config.group_size == -1 else PerGroup(config.group_size)
        return IntxWeightOnlyConfig(
            weight_dtype=torch.int4 if config.bits == 4 else torch.int8,
            granularity=granularity,
            mapping_type=MappingType.SYMMETRIC if config.symmetric else MappingType.ASYMMETRIC,
        )

    def quantize(self, config, source_dir: Path, out_dir: Path, device: str, *, data_dir=None,
                 trust_remote_code=False) -> dict:
        write = self._write_gptq if config.format == "gptq" else self._write_intx
        return write(config, source_dir, out_dir, device, trust_remote_code)

    def layer_by_layer_peak(self, config, sizes, device):
        """torchao's layout only, in phases that never overlap (``quantlab.layerwise.quantize``): a layer read in fp
        and torchao's temporaries while it quantizes the largest linear (two of its size: measured 100-118 MB for
        qwen2.5-coder-1.5b's 55 MB gate projection); then the quantized layer and the copy torchao's safetensors
        flattening makes of it, the fp layer gone; while the tensors outside the layers are streamed, layer 0
        quantized beside two copy blocks (the one written and the one read)."""
        if config.format != "torchao":
            return None
        quantized = sizes["layer"] // 4  # int8 values, one per weight (int4 too, on CPU); scales are < 2 % more
        block = min(LAYERWISE_BLOCK_BYTES, sizes["largest_tensor"])
        return {"layers: one fp layer": sizes["layer"],
                "layers: largest linear's temporaries": 2 * sizes["largest_linear"],
                "save: the quantized layer and its flattened copy": 2 * quantized,
                "head: layer 0 quantized, two copy blocks of an unquantized tensor": quantized + 2 * block}

    def quantize_layer_by_layer(self, config, source_dir: Path, out_dir: Path, device: str, *, data_dir=None,
                                trust_remote_code=False) -> dict:
        quantize_torchao_layer_by_layer(source_dir, out_dir, self.torchao_config(config), trust_remote_code)
        return {"library": "torchao", "layout": "IntxUnpackedToInt8Tensor (one value per int8 byte)",
                "written": "layer by layer from the safetensors, one shard per decoder layer",
                **conv1d_note(count_conv1d(source_dir, trust_remote_code), CONV1D_AS_LINEAR)}

    def _write_intx(self, config, source_dir: Path, out_dir: Path, device: str, trust_remote_code: bool) -> dict:
        # Quantized on CPU: RTN is cheap, and the saved layout is device-independent.
        notes = save_torchao(Path(source_dir), Path(source_dir), out_dir, self.torchao_config(config),
                             trust_remote_code)
        return {"library": "torchao", "layout": "IntxUnpackedToInt8Tensor (one value per int8 byte)", **notes}

    def _write_gptq(self, config, source_dir: Path, out_dir: Path, device: str, trust_remote_code: bool) -> dict:
        gptqmodel = import_gptqmodel()
        settings = dict(bits=config.bits, group_size=config.group_size, sym=config.symmetric)
        run_gptqmodel(gptqmodel.quantization.config.RTNConfig, settings, source_dir, out_dir, device, windows=None,
                      trust_remote_code=trust_remote_code)
        return {"library": "gptqmodel", "format": "gptq", "layout": "GPTQ packed int32 (RTN, no calibration)",
                **conv1d_note(count_conv1d(source_dir, trust_remote_code), CONV1D_PACKED)}


def fake_quantize(weight, bits: int, group_size: int, symmetric: bool):
    """Quantize then dequantize ``weight`` (out, in) with affine RTN, in plain torch.

    Same convention as torchao's intx: int range [-2^(b-1), 2^(b-1)-1]; symmetric scale is
    max|w| / ((qmax - qmin) / 2) with zero point 0; asymmetric maps [min(w,0), max(w,0)] onto the range;
    q = round(w * (1/scale)) + zero, rounding half to even.
    """
    import torch

    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    w = weight.float().reshape(out_features, in_features // group, group)  # (out, groups, group)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    eps = torch.finfo(torch.float32).smallest_normal
    lo = w.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = w.amax(dim=-1, keepdim=True).clamp(min=0)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp(min=eps)
        zero = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=eps)
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    q = torch.clamp(torch.round(w * (1.0 / scale)) + zero, qmin, qmax)  # torchao multiplies by 1/scale
    return ((q - zero) * scale).reshape(out_features, in_features).to(weight.dtype)
