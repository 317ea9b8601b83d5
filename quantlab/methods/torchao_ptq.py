"""torchao post-training schemes that run on CPU: the PTQ twins of quantlab's QAT recipes.

``torchao-w4-g32`` is int4 weight-only, symmetric, per group (``IntxWeightOnlyConfig``);
``torchao-a8w4-g32`` adds dynamic per-token int8 activations (``Int8DynamicActivationIntxWeightConfig``).
``qat-<scheme>`` trains towards exactly these formats, so each QAT recipe has a PTQ twin of the
identical format to be compared against. Saved through transformers' ``TorchAoConfig``; on CPU torchao
keeps int4 one value per byte. ``torchao-w4-gN`` is numerically ``rtn-w4-gN`` under another name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from quantlab.device import CPU
from quantlab.errors import RecipeError
from quantlab.conv1d import CONV1D_AS_LINEAR, conv1d_note, conv1d_to_linear
from quantlab.layouts.intx import IntxLayout
from quantlab.methods.base import Method, check_group_size
from quantlab.models.load import load_causal_lm, save_with_tokenizer

SCHEMES = ("w4", "a8w4")


@dataclass(frozen=True)
class TorchaoConfig:
    scheme: str = "w4"
    group_size: int = 32

    def __post_init__(self):
        check_scheme(self.scheme, self.group_size, "torchao")

    @property
    def bits(self) -> int:
        return 4


def check_scheme(scheme: str, group_size: int, method: str) -> None:
    if scheme not in SCHEMES:
        raise RecipeError(f"{method} scheme '{scheme}' is not supported — use w4 (int4 weight-only) or a8w4 "
                          "(int8 dynamic activations + int4 weights)")
    if group_size != -1 and group_size < 2:
        raise RecipeError(f"{method} group_size must be -1 (per channel) or ≥ 2 (got {group_size})")


def scheme_name(prefix: str, scheme: str, group_size: int) -> str:
    """``torchao-w4-g32``, ``qat-a8w4`` (per channel): the short names of both methods."""
    return f"{prefix}-{scheme}" + (f"-g{group_size}" if group_size != -1 else "")


def base_config(scheme: str, group_size: int):
    """The torchao PTQ config of a scheme (also the base config QAT prepares and converts with)."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    granularity = PerAxis(0) if group_size == -1 else PerGroup(group_size)
    if scheme == "w4":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=granularity,
                                    mapping_type=MappingType.SYMMETRIC)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=granularity,
                                                 weight_mapping_type=MappingType.SYMMETRIC)


def save_quantized(fp_dir: Path, tokenizer_dir: Path, out_dir: Path, scheme: str, group_size: int,
                   trust_remote_code: bool = False) -> dict:
    """Load fp weights from ``fp_dir`` quantized with the scheme, and save them with the tokenizer."""
    return save_torchao(fp_dir, tokenizer_dir, out_dir, base_config(scheme, group_size), trust_remote_code)


def save_torchao(fp_dir: Path, tokenizer_dir: Path, out_dir: Path, torchao_config,
                 trust_remote_code: bool = False) -> dict:
    """Load fp weights from ``fp_dir`` quantized with ``torchao_config`` (transformers' ``TorchAoConfig``: every
    ``nn.Linear`` but the head), quantize GPT-2's Conv1D layers too as the equivalent ``nn.Linear``, and save the
    model with the tokenizer. Returns notes: the Conv1D layers stored as linears and how they reload."""
    from torchao.quantization import quantize_
    from transformers import TorchAoConfig

    model = load_causal_lm(fp_dir, device=CPU, quantization_config=TorchAoConfig(torchao_config),
                           trust_remote_code=trust_remote_code)
    converted = set(conv1d_to_linear(model))
    if converted:
        quantize_(model, torchao_config, filter_fn=lambda module, fqn: fqn in converted)
    save_with_tokenizer(model, tokenizer_dir, out_dir, trust_remote_code)
    return conv1d_note(len(converted), CONV1D_AS_LINEAR)


class TorchaoMethod(Method):
    name = "torchao"
    config_cls = TorchaoConfig
    short_pattern = re.compile(r"torchao-(w4|a8w4)(?:-g(\d+))?")
    example_names = ("torchao-w4-g32", "torchao-a8w4-g32")

    def config_from_match(self, match):
        return TorchaoConfig(scheme=match.group(1), group_size=int(match.group(2)) if match.group(2) else -1)

    def short_name(self, config):
        return scheme_name("torchao", config.scheme, config.group_size)

    def check_model(self, config, linear_shapes):
        check_group_size(config.group_size, linear_shapes)

    def layout(self, config):
        return IntxLayout(4, config.group_size)

    def quantize(self, config, source_dir: Path, out_dir: Path, device: str, *, data_dir=None,
                 trust_remote_code=False) -> dict:
        # Quantized on CPU, like RTN: cheap, and the saved layout is device-independent.
        notes = save_quantized(Path(source_dir), Path(source_dir), out_dir, config.scheme, config.group_size,
                               trust_remote_code)
        return {"library": "torchao", "scheme": config.scheme,
                "layout": "IntxUnpackedToInt8Tensor (one int4 value per int8 byte on CPU)", **notes}
