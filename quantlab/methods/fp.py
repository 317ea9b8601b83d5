"""The unquantized baseline: fp32 on CPU, bf16 on CUDA unless a dtype is named."""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantlab.errors import RecipeError
from quantlab.layouts.fp import DTYPE_BITS, FpLayout
from quantlab.methods.base import Method

_SHORT = {"fp": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class FpConfig:
    dtype: str = "auto"

    def __post_init__(self):
        if self.dtype not in DTYPE_BITS:
            raise RecipeError(f"fp dtype '{self.dtype}' is not supported — use one of {', '.join(DTYPE_BITS)}")

    @property
    def bits(self) -> int:
        return DTYPE_BITS[self.dtype] or 32


class FpMethod(Method):
    name = "fp"
    config_cls = FpConfig
    short_pattern = re.compile(r"fp|fp32|bf16|fp16")
    example_names = ("fp", "bf16")
    writes_artifact = False

    def config_from_match(self, match):
        return FpConfig(dtype=_SHORT[match.group(0)])

    def short_name(self, config):
        return {v: k for k, v in _SHORT.items()}[config.dtype]

    def layout(self, config):
        return FpLayout(config.dtype)

    def quantize(self, config, source_dir, out_dir, device, *, data_dir=None, trust_remote_code=False):
        raise RecipeError("The fp baseline is not quantized — its artifact is the source model directory")
