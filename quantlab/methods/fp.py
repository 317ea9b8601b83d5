"""The unquantized baseline: fp32 on CPU, bf16 on CUDA unless a dtype is named."""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantlab.errors import RecipeError
from quantlab.methods.base import Method

_DTYPES = {"auto": None, "float32": 32, "bfloat16": 16, "float16": 16}
_SHORT = {"fp": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class FpConfig:
    dtype: str = "auto"

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise RecipeError(f"fp dtype '{self.dtype}' is not supported — use one of {', '.join(_DTYPES)}")

    @property
    def bits(self) -> int:
        return _DTYPES[self.dtype] or 32


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

    def unquantized_dtype_bytes(self, config, device):
        bits = config.bits if config.dtype != "auto" else (32 if device == "cpu" else 16)
        return bits // 8

    def layout_note(self, config):
        return "weights at the unquantized dtype"

    def linear_bytes(self, config, out_features, in_features, device):
        return {"data": out_features * in_features * self.unquantized_dtype_bytes(config, device), "scales": 0}

    def load_kwargs(self, config, device):
        import torch

        if config.dtype == "auto":
            dtype = torch.float32 if device == "cpu" else torch.bfloat16
        else:
            dtype = getattr(torch, config.dtype)
        return {"dtype": dtype}

    def quantize(self, config, source_dir, out_dir, device, *, data_dir=None, trust_remote_code=False):
        raise RecipeError("The fp baseline is not quantized — its artifact is the source model directory")
