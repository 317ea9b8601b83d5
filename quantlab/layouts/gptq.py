"""The GPTQ checkpoint layout as GPTQModel's torch kernels hold it. Filled by GPTQ, and by RTN with
``format: gptq`` (GPTQModel's own RTN), so the two compare like for like in memory and latency."""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.device import as_device
from quantlab.layouts import Layout, groups_of
from quantlab.conv1d import load_conv1d_aware, mark_conv1d_parents_initialized

GPTQ_NOTE = ("GPTQ packed: 32/bits values per int32 + fp16 scale and packed zero per group + int32 g_idx per "
             "input feature")


@dataclass(frozen=True)
class GptqPackedLayout(Layout):
    layer_by_layer = True
    # Loaded whole through optimum, every tensor is copied out of the mapped checkpoint, whose pages stay resident:
    # gptq-w8 on Qwen2.5-Coder-1.5B held 5.5 GB anonymous and 2.8 GB of file pages at its fidelity step's peak.
    load_copies_linears = True
    load_copies_everything = True
    bits: int
    group_size: int
    libraries = ("gptqmodel", "optimum")

    def linear_bytes(self, out_features, in_features, device):
        """qweight packs 32/bits values per int32 along the input, fp16 scales and int32-packed zeros (packed along
        the output, the last word padded) per group, an int32 group index per input feature, and two (1, 32/bits)
        int32 shift tables. CUDA kernels (Marlin, ExLlama) may repack; predicted as loaded."""
        groups = groups_of(self.group_size, in_features)
        per_int32 = 32 // self.bits
        data = -(-in_features // per_int32) * 4 * out_features
        scales = (groups * out_features * 2 + groups * -(-out_features // per_int32) * 4 + in_features * 4
                  + 2 * per_int32 * 4)
        return {"data": data, "scales": scales}

    def note(self):
        return GPTQ_NOTE

    def dequantize_bytes_per_value(self, device):
        """GPTQModel's CPU kernels, read from their code: at 8 bits (torch kernel) the shifted int32 words and their
        int16 codes, the gathered zeros and scales, their fp16 product and its fp32 copy (10 bytes per value at the
        most at once); at 4 bits (aten int4 kernel, converted on first use) the uint8 codes, their transposed copy
        and its int32 copy (6). On CUDA the kernels repack on load: one copy at the unquantized dtype."""
        if not as_device(device).is_cpu:
            return self.unquantized_dtype_bytes(device)
        return 10 if self.bits == 8 else 6

    def bias_dtype_bytes(self, device):
        return 2  # GPTQ checkpoints keep biases in fp16

    def load(self, path, device, trust_remote_code=False):
        """Plain ``from_pretrained`` (transformers' GPTQ integration); a model with GPT-2's Conv1D layers has the
        blocks holding them marked initialised first, as transformers 5.23's GPT-2 weight init fails on a packed
        linear (``quantlab.conv1d``)."""
        return load_conv1d_aware(path, device, trust_remote_code, mark_conv1d_parents_initialized,
                                 **self.load_kwargs(device))

    def latency_skipped(self, device):
        if as_device(device).is_cpu and self.bits == 8:
            return ("GPTQModel's 8-bit CPU kernel runs only in bf16, too slow to time beside the others: "
                    "accuracy-only on CPU")
        return None


def unpack_weight(qweight, qzeros, scales, g_idx, bits: int):
    """The (out, in) fp32 weight a GPTQ (v1 checkpoint format) linear stands for: ``scales[g] * (q - (z + 1))``, where
    q packs ``32 / bits`` input rows per int32 of ``qweight`` (in * bits / 32, out), z packs as many output columns
    per int32 of ``qzeros`` (groups, out * bits / 32), v1 storing each zero point minus one, and g = ``g_idx[i]``."""
    import torch

    per, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    q = (qweight.unsqueeze(1) >> shifts.view(1, per, 1)) & mask  # (in / per, per, out)
    q = q.reshape(-1, qweight.shape[-1])  # (in, out)
    z = (qzeros.unsqueeze(-1) >> shifts.view(1, 1, per)) & mask  # (groups, out / per, per)
    z = z.reshape(qzeros.shape[0], -1)[:, :scales.shape[1]] + 1  # (groups, out)
    g = g_idx.long()
    return (scales.float()[g] * (q - z[g]).float()).T.contiguous()
