"""HQQ's layout (hqq 0.2.8, ``HQQLinear``): codes in uint8, an asymmetric scale and zero per group along the input.

Per quantized linear with weight (out, in), n = out x in values in groups of g consecutive inputs (axis 1):

- ``W_q``: uint8, the n codes reshaped to (n/g, g); at 4 bits two codes per byte (the first half of the rows in the
  high nibbles, the second half in the low ones), so (n/g/2, g); at 8 bits one per byte;
- ``meta["scale"]``, ``meta["zero"]``: (n/g, 1) each at the compute dtype (the zero is rounded at 4 bits but held as
  a float), in a plain dict: neither parameters nor buffers (``quantlab.measure.memory`` counts them);
- ``bias``: at the compute dtype, a plain attribute too.

hqq casts everything it leaves unquantized (embeddings, norms, the head) to the compute dtype: fp32 on CPU, bf16 on
CUDA. The artifact is transformers' ``save_pretrained`` of the quantized model: model.safetensors with each linear's
state (W_q, scale, zero and its settings encoded as small integer tensors) and a config.json without any
``quantization_config``. transformers 5.23 cannot reload it: its HQQ integration quantizes nothing on load and fills
the missing ``weight`` tensors with random values, silently. It reloads through hqq's own ``from_quantized``, taught
to read safetensors: ``load_hqq_safetensors`` below, which is also the standalone route a user copies.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from quantlab.device import as_device
from quantlab.layouts import Layout, groups_of


def load_hqq_safetensors(path, device="cpu"):
    """An HQQ artifact (``save_pretrained`` of an hqq-quantized model) loaded through hqq's ``from_quantized``, whose
    own reader expects a pickled ``qmodel.pt``: weights are read from the safetensors instead (sharded or not), and a
    tied head that ``save_pretrained`` dropped is tied again. Uses hqq, transformers and safetensors only."""
    import json
    import os

    import torch
    from hqq.models.hf.base import AutoHQQHFModel
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as fh:
        dtype = getattr(torch, json.load(fh)["dtype"])  # the compute dtype hqq cast the model to
    index = os.path.join(path, "model.safetensors.index.json")
    files = ["model.safetensors"]
    if os.path.exists(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    tied = {}

    class FromSafetensors(AutoHQQHFModel):
        @classmethod
        def create_model(cls, save_dir, kwargs):
            model = super().create_model(save_dir, kwargs)
            tied.update(getattr(model, "all_tied_weights_keys", None) or {})  # {head weight: embedding weight}
            return model

        @classmethod
        def get_weight_file(cls, save_dir):
            return os.path.join(save_dir, files[0])

        @classmethod
        def load_weights(cls, save_dir, map_location=None):
            flat = {}
            for name in files:
                flat.update(load_file(os.path.join(save_dir, name), device=str(map_location or device)))
            for target, source in tied.items():
                flat.setdefault(target, flat[source])
            by_module = {}
            for key, tensor in flat.items():
                module, _, leaf = key.rpartition(".")
                by_module.setdefault(module, {})[leaf] = tensor
            return by_module

    model = FromSafetensors.from_quantized(path, device=str(device), compute_dtype=dtype)
    model.tie_weights()  # from_quantized gives the head its own Parameter over the embedding's storage
    return model.eval()


#: how a user loads an HQQ artifact without quantlab (``Layout.standalone_load``): the function quantlab runs
HQQ_STANDALONE_LOAD = inspect.getsource(load_hqq_safetensors) + """

def load(path):
    return load_hqq_safetensors(path)
"""


@dataclass(frozen=True)
class HqqLayout(Layout):
    bits: int
    group_size: int
    libraries = ("hqq",)
    standalone_load = HQQ_STANDALONE_LOAD

    def linear_bytes(self, out_features, in_features, device):
        """The codes (bits/8 bytes per value) and a scale and a zero per group at the compute dtype."""
        n = out_features * in_features
        groups = out_features * groups_of(self.group_size, in_features)
        return {"data": n * self.bits // 8, "scales": 2 * groups * self.unquantized_dtype_bytes(device)}

    def note(self):
        packing = "two codes per byte" if self.bits == 4 else "one code per byte"
        return f"HQQ: uint8 codes, {packing} + scale and zero per {self.group_size} weights at the compute dtype"

    def dequantize_bytes_per_value(self, device):
        """hqq's PyTorch backend unpacks the codes to the compute dtype, then holds them, their difference with the
        zero and its product with the scale at once: three values at the compute dtype."""
        return 3 * self.unquantized_dtype_bytes(device)

    def load_kwargs(self, device):
        """hqq's compute dtype: fp32 on CPU (bf16 matmuls are slow there), bf16 on CUDA."""
        return {"dtype": as_device(device).default_dtype}

    def load(self, path, device, trust_remote_code=False):
        return load_hqq_safetensors(path, str(as_device(device)))
