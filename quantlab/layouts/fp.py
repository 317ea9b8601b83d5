"""Weights at a floating-point dtype: the unquantized baseline's layout (fp32 on CPU, bf16 on CUDA for ``auto``)."""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.device import as_device
from quantlab.layouts import Layout

DTYPE_BITS = {"auto": None, "float32": 32, "bfloat16": 16, "float16": 16}


@dataclass(frozen=True)
class FpLayout(Layout):
    layer_by_layer = True
    quantizes = False
    dtype: str = "auto"

    def _torch_dtype_name(self, device: str) -> str:
        return as_device(device).default_dtype_name if self.dtype == "auto" else self.dtype

    def unquantized_dtype_bytes(self, device: str) -> int:
        return DTYPE_BITS[self._torch_dtype_name(device)] // 8

    def linear_bytes(self, out_features, in_features, device):
        return {"data": out_features * in_features * self.unquantized_dtype_bytes(device), "scales": 0}

    def note(self):
        return "weights at the unquantized dtype"

    def load_kwargs(self, device):
        import torch

        return {"dtype": getattr(torch, self._torch_dtype_name(device))}
