"""``Fp8Linear``: a linear held as float8 e4m3 with a per-row scale, dequantized per forward; what an fp8 artifact's
linears load into (``quantlab.layouts.fp8``), whole or one layer at a time (``quantlab.layerwise.linears``)."""

from __future__ import annotations

from functools import lru_cache


def hold_fp8(model) -> int:
    """Replace every linear that holds a float8 weight by an ``Fp8Linear`` over the same tensors, before the first
    forward decompresses them; returns how many. compressed-tensors' decompression hook then finds no quantized
    module left and only removes itself."""
    import torch

    holders = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float8_e4m3fn]
    for name, m in holders:
        parent, _, child = name.rpartition(".")
        bias = None if m.bias is None else m.bias.data
        setattr(model.get_submodule(parent), child, fp8_linear_class()(m.weight.data, m.weight_scale.data, bias))
    return len(holders)


@lru_cache(maxsize=1)
def fp8_linear_class():
    """``Fp8Linear``, defined on first use so that importing this module loads no torch."""
    import torch

    class Fp8Linear(torch.nn.Module):
        """A linear held as float8 e4m3 (out, in) and a scale (out, 1); each forward dequantizes in the input's
        dtype, as compressed-tensors' decompression does once."""

        def __init__(self, weight, weight_scale, bias=None):
            super().__init__()
            self.out_features, self.in_features = weight.shape
            self.register_buffer("weight", weight)
            self.register_buffer("weight_scale", weight_scale)
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

        def forward(self, x):
            w = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)  # (out, in)
            return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

        def extra_repr(self):
            return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn"

    return Fp8Linear
