"""bitsandbytes int8 (LLM.int8()) and 4-bit nf4/fp4 through transformers' BitsAndBytesConfig."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import RecipeError
from quantlab.methods.base import Method
from quantlab.models import load_causal_lm, save_with_tokenizer

_TYPES = {"int8": 8, "nf4": 4, "fp4": 4}
_COMPUTE = ("auto", "float32", "bfloat16", "float16")
_BLOCKSIZE = 64  # bitsandbytes' 4-bit blocksize, CPU and CUDA
_NESTED_BLOCKSIZE = 256  # double quant: blocks of absmax values


@dataclass(frozen=True)
class BnbConfig:
    quant_type: str = "nf4"
    double_quant: bool = False
    compute_dtype: str = "auto"

    def __post_init__(self):
        if self.quant_type not in _TYPES:
            raise RecipeError(f"bnb quant_type '{self.quant_type}' is not supported — use int8, nf4 or fp4")
        if self.double_quant and self.quant_type == "int8":
            raise RecipeError("bnb double_quant applies to 4-bit only — drop it or use nf4/fp4")
        if self.compute_dtype not in _COMPUTE:
            raise RecipeError(f"bnb compute_dtype '{self.compute_dtype}' — use one of {', '.join(_COMPUTE)}")

    @property
    def bits(self) -> int:
        return _TYPES[self.quant_type]


class BnbMethod(Method):
    name = "bnb"
    config_cls = BnbConfig
    short_pattern = re.compile(r"bnb-(int8|nf4|fp4)(-dq)?")
    example_names = ("bnb-int8", "bnb-nf4", "bnb-fp4", "bnb-nf4-dq")
    libraries = ("bitsandbytes",)

    def config_from_match(self, match):
        return BnbConfig(quant_type=match.group(1), double_quant=bool(match.group(2)))

    def short_name(self, config):
        return f"bnb-{config.quant_type}" + ("-dq" if config.double_quant else "")

    def explain_short_name(self, text):
        if text.endswith("-dq") and text.startswith("bnb-int8"):
            return "double quantization applies to 4-bit only — use bnb-nf4-dq or bnb-fp4-dq"
        return None

    def hf_config(self, config, device: str):
        """The transformers BitsAndBytesConfig; 4-bit names its quant type (transformers 5 defaults to fp4)."""
        from transformers import BitsAndBytesConfig

        if config.quant_type == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.quant_type,
            bnb_4bit_use_double_quant=config.double_quant,
            bnb_4bit_compute_dtype=self.load_kwargs(config, device)["dtype"],
        )

    def quantize(self, config, source_dir: Path, out_dir: Path, device: str, *, data_dir=None,
                 trust_remote_code=False) -> dict:
        # bitsandbytes quantizes as the weights move to the device: on CUDA, load straight onto it.
        model = load_causal_lm(source_dir, device=device, quantization_config=self.hf_config(config, device),
                               trust_remote_code=trust_remote_code, **self.load_kwargs(config, device))
        save_with_tokenizer(model, source_dir, out_dir, trust_remote_code)
        return {"library": "bitsandbytes", "hf_quant_method": "bitsandbytes"}

    def unquantized_dtype_bytes(self, config, device):
        return {"float32": 4}.get(self.load_kwargs_name(config, device), 2)

    def linear_bytes(self, config, out_features, in_features, device):
        """int8: int8 values + one fp32 row scale (SCB) per output row. 4-bit: two values per byte, one
        absmax per block of 64 (fp32; with double quant uint8, plus an fp32 absmax per 256 blocks, a
        256-entry fp32 code and an fp32 offset) and the 16-entry fp32 code of nf4/fp4."""
        n = out_features * in_features
        if config.quant_type == "int8":
            return {"data": n, "scales": out_features * 4}
        blocks = -(-n // _BLOCKSIZE)
        absmax = blocks + -(-blocks // _NESTED_BLOCKSIZE) * 4 + 256 * 4 + 4 if config.double_quant else blocks * 4
        return {"data": -(-n // 2), "scales": absmax + 16 * 4}

    def layout_note(self, config):
        if config.quant_type == "int8":
            return "int8 values + fp32 row scale (SCB) per output row"
        dq = ("uint8 absmax per 64 weights + fp32 absmax per 256 blocks + 1 KiB code" if config.double_quant
              else "fp32 absmax per 64 weights")
        return f"{config.quant_type}: 2 values per byte + {dq} + 64 B code per layer"

    def load_kwargs_name(self, config, device) -> str:
        if config.compute_dtype != "auto":
            return config.compute_dtype
        return "float32" if device == "cpu" else "bfloat16"

    def load_kwargs(self, config, device):
        """Unquantized parts (embeddings, norms) in fp32 on CPU, bf16 on CUDA unless a compute dtype is named."""
        import torch

        return {"dtype": getattr(torch, self.load_kwargs_name(config, device))}
