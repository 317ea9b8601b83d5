"""The AWQ GEMM checkpoint layout (AutoAWQ's, the one vLLM's ``awq`` and ``awq_marlin`` read), as GPTQModel's CPU
kernel holds it once transformers has loaded it.

transformers 5.23 loads an AWQ directory through GPTQModel (its AwqQuantizer requires gptqmodel, not autoawq), which
picks ``TorchAtenAwqLinear`` on CPU. Loaded, each linear holds the checkpoint's three tensors as buffers. On its first
forward the kernel repacks itself for ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (qweight to uint8 [out, in/2],
zeros and scales to bf16 [in/g, out], plus an unregistered bf16 ``scales_and_zeros`` [in/g, out, 2]) and runs the int4
matmul with bf16 activations. The planner, like ``weight_bytes``, counts the layout as loaded (before that first
forward), which is what every other layout's count means too.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.device import as_device
from quantlab.layouts import Layout, groups_of

AWQ_NOTE = ("AWQ GEMM: 8 int4 values per int32 (qweight [in, out/8]) + per group fp16 scales [in/g, out] and int32-packed "
            "zero points [in/g, out/8]")


@dataclass(frozen=True)
class AwqGemmLayout(Layout):
    bits: int
    group_size: int
    libraries = ("gptqmodel",)

    def linear_bytes(self, out_features, in_features, device):
        """qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales fp16 [in/g, out]: the checkpoint's tensors,
        kept as they are by the load (the scales stay fp16 whatever the load dtype)."""
        groups = groups_of(self.group_size, in_features)
        per_int32 = 32 // self.bits
        data = in_features * (out_features // per_int32) * 4
        scales = groups * (out_features // per_int32) * 4 + groups * out_features * 2
        return {"data": data, "scales": scales}

    def note(self):
        return AWQ_NOTE

    def bias_dtype_bytes(self, device):
        return 2  # AWQ checkpoints keep biases in fp16, as GPTQ's do

    def dequantize_bytes_per_value(self, device):
        """On CPU the kernel's one-time repack at the first forward (``transform_cpu``, read from GPTQModel 7.6's code,
        not measured) unpacks the int32 words into int64 codes, masks them into a second int64 tensor, reorders them
        into a third and masks that to uint8: 17 bytes per value at the most at once; afterwards the int4 matmul
        dequantizes nothing. On CUDA one copy at the unquantized dtype."""
        return 17 if as_device(device).is_cpu else self.unquantized_dtype_bytes(device)
