"""torchao's intx layout (``IntxUnpackedToInt8Tensor``): one int8 per value (int4 too, on CPU), a scale at the
unquantized dtype and an int8 zero point per group. Filled by RTN, torchao's PTQ and QAT."""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.layouts import Layout, groups_of

INTX_NOTE = "torchao intx: one int8 per value (int4 too) + a scale (unquantized dtype) and an int8 zero per group"


@dataclass(frozen=True)
class IntxLayout(Layout):
    layer_by_layer = True
    bits: int
    group_size: int
    libraries = ("torchao",)

    def linear_bytes(self, out_features, in_features, device):
        groups = groups_of(self.group_size, in_features)
        scale_bytes = self.unquantized_dtype_bytes(device)
        return {"data": out_features * in_features, "scales": out_features * groups * (scale_bytes + 1)}

    def note(self):
        return INTX_NOTE
