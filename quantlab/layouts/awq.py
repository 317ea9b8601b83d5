"""The AWQ GEMM checkpoint layout (AutoAWQ's, the one vLLM's ``awq`` and ``awq_marlin`` read), as GPTQModel's CPU
kernel holds it once transformers has loaded it.

transformers 5.23 loads an AWQ directory through GPTQModel (its AwqQuantizer requires gptqmodel, not autoawq), which
picks ``TorchAtenAwqLinear`` on CPU. Loaded, each linear holds the checkpoint's three tensors as buffers. On its first
forward the kernel repacks itself for ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (qweight to uint8 [out, in/2],
zeros and scales to bf16 [in/g, out], plus an unregistered bf16 ``scales_and_zeros`` [in/g, out, 2]) and runs the int4
matmul with bf16 activations. The planner, like ``weight_bytes``, counts the layout as loaded (before that first
forward), which is what every other layout's count means too; what the repack adds is a term of its own.

quantlab loads an AWQ artifact whole on CPU the same way, weighs it, then runs that repack itself, one linear at a
time, before the first forward (``AwqGemmLayout.prepare``): the same tensors the first forward would make, without
the heap that repack leaves behind when it runs inside a forward (on SmolLM2, 0.65 GB of freed but unreturned memory
beside 0.17 GB of weights), and with the checkpoint's mapping released, which each linear's fp16 bias would
otherwise keep resident (the whole file, read by the load and the repack).
"""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.device import as_device
from quantlab.layouts import Layout, groups_of
from quantlab.measure.memory import trim_heap

#: bytes per element of what an AWQ checkpoint keeps unquantized (GPTQModel saves AWQ in fp16)
CHECKPOINT_ELEM = 2
#: bytes per value the CPU repack holds in flight (``AwqGemmLayout.dequantize_bytes_per_value``)
REPACK_IN_FLIGHT = 17

AWQ_NOTE = ("AWQ GEMM: 8 int4 values per int32 (qweight [in, out/8]) + per group fp16 scales [in/g, out] and int32-packed "
            "zero points [in/g, out/8]")


@dataclass(frozen=True)
class AwqGemmLayout(Layout):
    bits: int
    group_size: int
    libraries = ("gptqmodel",)
    layer_by_layer = True  # each layer's linears the kernel the whole load makes (quantlab.layerwise.packed)

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
        return REPACK_IN_FLIGHT if as_device(device).is_cpu else self.unquantized_dtype_bytes(device)

    def repack_bytes(self, out_features: int, in_features: int) -> int:
        """What the CPU repack adds to one linear: its zero points become bf16 [in/g, out] (from int32 words
        [in/g, out/8]) and a bf16 ``scales_and_zeros`` [in/g, out, 2] is built beside them; the codes keep their
        bytes (uint8 [out, in/2]) and the scales theirs (fp16 to bf16)."""
        groups = groups_of(self.group_size, in_features)
        return groups * out_features * (2 + 4) - groups * (out_features // (32 // self.bits)) * 4

    def load_terms(self, shapes, device):
        """On CPU (``prepare``): the repacked linears' extra bytes, held throughout; while the model loads,
        the checkpoint's pages (the whole file: the load reads the unquantized tensors to convert them, the repack
        the packed ones) and the repack of the largest linear in flight."""
        if not as_device(device).is_cpu:
            return {}
        stored = CHECKPOINT_ELEM * sum(shapes.unquantized.values()) + sum(
            lin.count * sum(self.linear_bytes(lin.out_features, lin.in_features, device).values())
            for lin in shapes.linears)
        largest = max((lin.out_features * lin.in_features for lin in shapes.linears), default=0)
        return {"kernel repack: the int4 matmul's zero points and scales": sum(
                    lin.count * self.repack_bytes(lin.out_features, lin.in_features) for lin in shapes.linears),
                "load: checkpoint pages, mapped": stored,
                "load: kernel repack of the largest linear in flight": REPACK_IN_FLIGHT * largest}

    def prepare(self, model, device):
        if as_device(device).is_cpu:
            repack_for_cpu(model)


def repack_for_cpu(model) -> None:
    """Each ``TorchAtenAwqLinear``'s one-time repack for torch's int4 matmul (its ``transform``, what its first
    forward runs when torch has the int4 CPU ops), one linear at a time with freed memory returned to the system
    after each; then the fp16 biases, views of the checkpoint's mapping, copied out so the mapping is released."""
    from gptqmodel.nn_modules.qlinear.torch_aten_kernel import _has_local_int4pack_cpu_ops
    from gptqmodel.nn_modules.qlinear.torch_aten_kernel_awq import TorchAtenAwqLinear

    if not _has_local_int4pack_cpu_ops():
        return  # the kernel then dequantizes at each forward, as it would loaded any other way
    for module in model.modules():
        if isinstance(module, TorchAtenAwqLinear) and module.linear_mode is None and not module.training:
            module.transform(module.qweight.device.type)  # what its forward passes: the input's device, here CPU
            module.linear_mode = "inference"
            if module.bias is not None:
                module.bias = module.bias.clone()
            trim_heap()
