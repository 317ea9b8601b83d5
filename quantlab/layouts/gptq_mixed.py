"""A GPTQ checkpoint with one format per module (GPTQModel ``dynamic`` overrides), as ``GPTQModel.load`` holds it.

transformers' GPTQ integration (optimum) builds every linear at the checkpoint's base bits and group size and
fails on the others' tensor shapes ("ignore_mismatched_sizes"), so this layout loads with GPTQModel's own loader,
which reads the dynamic overrides. Its torch kernel (``BACKEND.TORCH``) is the one that takes 4- and 8-bit modules
in one model, and it runs in fp16/bf16 only: the model loads in the fit's dtype (fp16 by default, as vLLM runs
GPTQ; bf16 for a model whose activations overflow fp16) on every device, its unquantized modules (embeddings,
norms, head, any linear left fp) too: two bytes a value either way. A quantized module holds what
``GptqPackedLayout`` counts. The formats it mixes (``fp``, ``gptq-w8``, ``gptq-w4-g64``...) and the
projections vLLM fuses into one matmul (and so one format) are defined here; a fit chooses among them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantlab.errors import RecipeError
from quantlab.layouts import Layout
from quantlab.layouts.gptq import GPTQ_NOTE, GptqPackedLayout

FP = "fp"
# vLLM's fused projections (``packed_modules_mapping`` of its Llama, Qwen2 and Mistral models): the linears it loads
# into one matmul, which therefore take one quantization format together
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}
_GPTQ = re.compile(r"gptq-w(4|8)(?:-g(32|64|128))?")


@dataclass(frozen=True)
class Format:
    name: str
    bits: int | None  # None: unquantized
    group_size: int = -1
    ggml_type: str | None = None  # a GGUF format's ggml type (``quantlab.fit.units.parse_format``); None for GPTQ


def parse_format(name: str) -> Format:
    """``fp`` or a symmetric GPTQ format without act-order (what GPTQModel's dynamic overrides vary per module)."""
    if name == FP:
        return Format(FP, None)
    match = _GPTQ.fullmatch(name)
    if not match:
        raise RecipeError(f"Unknown fit format '{name}' — use fp or a GPTQ format: gptq-w8, gptq-w8-g128, "
                          "gptq-w4-g128, gptq-w4-g64, gptq-w4-g32")
    return Format(name, int(match.group(1)), int(match.group(2)) if match.group(2) else -1)


def fused_name(module: str) -> str:
    """The name vLLM gives the fused projection a linear is loaded into (``model.layers.3.self_attn.q_proj`` ->
    ``model.layers.3.self_attn.qkv_proj``), or the linear's own name when vLLM runs it alone."""
    parent, _, leaf = module.rpartition(".")
    return f"{parent}.{FUSED[leaf]}" if leaf in FUSED and parent else module


@dataclass(frozen=True)
class GptqMixedLayout(Layout):
    allocation: tuple[tuple[str, str], ...]  # (unit, format); empty until the fit is resolved
    units: str = "block"
    formats: tuple[str, ...] = ()
    dtype: str = "float16"  # held in: float16 or bfloat16, two bytes either way
    libraries = ("gptqmodel",)

    def _format_of(self, name: str):
        fused = fused_name(name)  # a fused unit (``...qkv_proj``) holds the linears vLLM loads into it
        for unit, fmt in self.allocation:
            if name == unit or name.startswith(unit + ".") or fused == unit:
                return parse_format(fmt)
        # unresolved (or a linear outside every unit): the largest candidate, an upper bound
        return max((parse_format(f) for f in self.formats or (FP,)), key=self._upper)

    def _upper(self, fmt) -> tuple:
        return (fmt.bits is None, fmt.bits or 0, -fmt.group_size if fmt.group_size > 0 else 0)

    def linear_bytes(self, out_features, in_features, device):
        raise NotImplementedError("a mixed layout's bytes depend on the linear: use named_linear_bytes")

    def named_linear_bytes(self, name: str, out_features: int, in_features: int, device: str) -> dict[str, int]:
        fmt = self._format_of(name)
        if fmt.bits is None:
            return {"data": out_features * in_features * self.unquantized_dtype_bytes(device), "scales": 0}
        return GptqPackedLayout(fmt.bits, fmt.group_size).linear_bytes(out_features, in_features, device)

    def head_bytes(self, head, elements: int, device: str) -> int:
        """An untied head allocated a GPTQ format is packed like any linear (its bias, if any, fp16); else the
        held dtype's bytes."""
        fmt = parse_format(dict(self.allocation).get(head.name, FP)) if head is not None else parse_format(FP)
        if fmt.bits is None:
            return elements * self.unquantized_dtype_bytes(device)
        packed = GptqPackedLayout(fmt.bits, fmt.group_size).linear_bytes(head.out_features, head.in_features, device)
        return sum(packed.values()) + (elements - head.weights) * self.bias_dtype_bytes(device)

    def named_bias_bytes(self, name: str, device: str) -> int:
        return 2  # fp16 in a quantized module, the held dtype in an unquantized one

    def note(self):
        return "GPTQ mixed (dynamic overrides): " + GPTQ_NOTE + f"; modules left fp and the rest at {self.dtype}"

    def unquantized_dtype_bytes(self, device):
        return 2

    def dequantize_bytes_per_value(self, device):
        return 10  # GPTQModel's torch kernel at 8 bits, the larger of its two (see GptqPackedLayout)

    def bias_dtype_bytes(self, device):
        return 2

    def load_kwargs(self, device):
        """The dtype it is held in (what ``load`` passes to ``GPTQModel.load``), on every device."""
        import torch

        return {"dtype": getattr(torch, self.dtype)}

    def load(self, path: str, device: str, trust_remote_code: bool = False):
        """The HF model inside ``GPTQModel.load`` (torch kernel, the fit's dtype): what the artifact's manifest names."""
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            from gptqmodel import BACKEND, GPTQModel

            wrapped = GPTQModel.load(str(path), device=device, **self.load_kwargs(device), backend=BACKEND.TORCH,
                                     trust_remote_code=trust_remote_code)
        return wrapped.model.eval()

    def latency_skipped(self, device):
        return None
