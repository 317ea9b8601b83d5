"""torchao's intx layout (``IntxUnpackedToInt8Tensor``): one int8 per value (int4 too, on CPU), a scale at the
unquantized dtype and an int8 zero point per group. Filled by RTN, torchao's PTQ and QAT."""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.layouts import Layout, groups_of
from quantlab.conv1d import conv1d_to_linear, load_conv1d_aware

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

    def load(self, path, device, trust_remote_code=False):
        """Plain ``from_pretrained``; a model with GPT-2's Conv1D layers gets them as ``nn.Linear``, as the artifact
        holds them (torchao quantizes ``nn.Linear`` only: ``quantlab.conv1d``)."""
        return load_conv1d_aware(path, device, trust_remote_code, conv1d_to_linear, **self.load_kwargs(device))
