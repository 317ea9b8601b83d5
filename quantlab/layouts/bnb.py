"""bitsandbytes' layouts: LLM.int8() (int8 values + an fp32 row scale) and 4-bit nf4/fp4 (two values per byte +
absmax per block of 64, optionally double-quantized). Unquantized parts load at the compute dtype."""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.device import as_device
from quantlab.layouts import Layout

BLOCKSIZE = 64  # bitsandbytes' 4-bit blocksize, CPU and CUDA
NESTED_BLOCKSIZE = 256  # double quant: blocks of absmax values


@dataclass(frozen=True)
class _Bnb(Layout):
    compute_dtype: str = "auto"
    libraries = ("bitsandbytes",)

    def dtype_name(self, device: str) -> str:
        if self.compute_dtype != "auto":
            return self.compute_dtype
        return as_device(device).default_dtype_name

    def unquantized_dtype_bytes(self, device):
        return {"float32": 4}.get(self.dtype_name(device), 2)

    def load_kwargs(self, device):
        """Unquantized parts (embeddings, norms) in fp32 on CPU, bf16 on CUDA unless a compute dtype is named."""
        import torch

        return {"dtype": getattr(torch, self.dtype_name(device))}


@dataclass(frozen=True)
class Bnb8Layout(_Bnb):
    def linear_bytes(self, out_features, in_features, device):
        """int8 values + one fp32 row scale (SCB) per output row."""
        return {"data": out_features * in_features, "scales": out_features * 4}

    def note(self):
        return "int8 values + fp32 row scale (SCB) per output row"


@dataclass(frozen=True)
class Bnb4Layout(_Bnb):
    # Qwen2.5-Coder-1.5B nf4 on CPU: the bench held 3.56 GB, 2.81 of weights + 0.74 of packed linears
    # (reports/qwen2.5-coder-1.5b/unbudgeted/)
    load_copies_linears = True
    layer_by_layer = True  # each layer's Linear4bit built from the checkpoint (quantlab.layerwise.linears)
    quant_type: str = "nf4"
    double_quant: bool = False

    def linear_bytes(self, out_features, in_features, device):
        """Two values per byte, one absmax per block of 64 (fp32; with double quant uint8, plus an fp32 absmax per
        256 blocks, a 256-entry fp32 code and an fp32 offset) and the 16-entry fp32 code of nf4/fp4."""
        n = out_features * in_features
        blocks = -(-n // BLOCKSIZE)
        absmax = (blocks + -(-blocks // NESTED_BLOCKSIZE) * 4 + 256 * 4 + 4) if self.double_quant else blocks * 4
        return {"data": -(-n // 2), "scales": absmax + 16 * 4}

    def note(self):
        dq = ("uint8 absmax per 64 weights + fp32 absmax per 256 blocks + 1 KiB code" if self.double_quant
              else "fp32 absmax per 64 weights")
        return f"{self.quant_type}: 2 values per byte + {dq} + 64 B code per layer"
