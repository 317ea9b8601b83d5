"""GGUF: a llama.cpp model file, run by llama.cpp (``quantlab.engines.llamacpp``), never by transformers.

An artifact is a directory holding ``model.gguf`` (and quantlab's manifest). Its bytes are the file's tensors as
llama.cpp writes and loads them: each tensor at the type llama.cpp's quantizer chose for it (``gguf_types``: a
"Q4_K_M" file mixes Q4_K, Q6_K, Q5_0 and Q8_0 tensors, and falls back on tensors whose rows are not a multiple of
256), in ggml's blocks (Q4_K: 144 bytes per 256 values, Q6_K 210, Q8_0 34 per 32), norms and biases in F32. The
planner predicts them tensor by tensor; what llama.cpp holds once loaded (``llama_model_size``) is the sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantlab.engines.llamacpp import LlamaCppModel, held_terms
from quantlab.errors import RecipeError
from quantlab.gguf_file import gguf_reader
from quantlab.layouts import Layout
from quantlab.layouts.gguf_types import (BITS, EMBEDDING, allows_quantization, effective_type, gguf_name,
                                         tensor_bytes, tensor_types)
from quantlab.layouts.gptq_mixed import fused_name

FILE = "model.gguf"
#: the list of per-tensor types a mixed file was written with, in llama-quantize's ``--tensor-type-file`` form
TENSOR_TYPE_FILE = "tensor-types.txt"
#: a GGUF fit's formats: one ggml type each, given to every tensor of a unit (llama.cpp falls back per tensor where
#: the type's block does not divide the rows: ``gguf_types.effective_type``)
GGUF_FORMATS = {"gguf-q2_k": "Q2_K", "gguf-q3_k": "Q3_K", "gguf-q4_0": "Q4_0", "gguf-q4_1": "Q4_1",
                "gguf-q4_k": "Q4_K", "gguf-q5_0": "Q5_0", "gguf-q5_1": "Q5_1", "gguf-q5_k": "Q5_K",
                "gguf-q6_k": "Q6_K", "gguf-q8_0": "Q8_0", "gguf-f16": "F16", "gguf-f32": "F32"}


def gguf_format_type(name: str) -> str:
    """A GGUF fit format's ggml type (``gguf-q4_k`` -> ``Q4_K``); an unknown one refused in one line."""
    if name not in GGUF_FORMATS:
        raise RecipeError(f"Unknown GGUF fit format '{name}' — use one of {', '.join(GGUF_FORMATS)}")
    return GGUF_FORMATS[name]


@dataclass(frozen=True)
class GgufLayout(Layout):
    qtype: str = "q4_k_m"
    imatrix: bool = False
    type_k: str = "f16"  # the KV cache's types llama.cpp runs it with (a GGUF fit's GPU plan chooses them)
    type_v: str = "f16"
    libraries = ("llama_cpp", "gguf")
    engines = ("llama.cpp",)

    @property
    def quantizes(self) -> bool:  # the F32 file is the engine's own fp floor
        return self.qtype not in ("f32", "f16")

    def tensors(self, shapes) -> dict[str, tuple[int, ...]]:
        """The GGUF tensors of a model of ``shapes`` (ggml order: row length first) that are not 1-D."""
        out = {}
        for lin in shapes.linears:
            name = gguf_name(lin.name)
            if name is None:
                raise ValueError(f"no GGUF name for {lin.name}")
            out[name] = (lin.in_features, lin.out_features)
        out["token_embd.weight"] = (shapes.hidden, shapes.vocab)
        if not shapes.tied:
            out["output.weight"] = (shapes.hidden, shapes.vocab)
        return out

    def types(self, shapes) -> dict[str, str]:
        return tensor_types(self.qtype, self.tensors(shapes), shapes.model_type, shapes.layers, shapes.heads,
                            shapes.kv_heads, imatrix=self.imatrix)

    def weight_terms(self, shapes, device: str) -> dict[str, int]:
        """The file's tensor bytes by component; 1-D tensors (norms, biases) stay F32, as llama.cpp keeps them."""
        sizes = self.tensors(shapes)
        types = self.types(shapes)
        by = {name: tensor_bytes(types[name], shape) for name, shape in sizes.items()}
        heads = ("token_embd.weight", "output.weight")
        linear = sum(v for k, v in by.items() if k not in heads)
        parts = shapes.unquantized
        return {"linear_data": linear, "linear_scales": 0, "embeddings": by["token_embd.weight"],
                "lm_head": by.get("output.weight", 0),
                "norms_biases_other": (parts["norms"] + parts["biases"] + parts["other"]) * 4, "buffers": 0}

    def linear_bytes(self, out_features, in_features, device):
        """One linear at the file type's default tensor type (the planner uses ``weight_terms``: per tensor)."""
        kind = tensor_types(self.qtype, {"blk.0.attn_output.weight": (in_features, out_features)}, "llama", 1, 1,
                            1)["blk.0.attn_output.weight"]
        return {"data": tensor_bytes(kind, (in_features, out_features)), "scales": 0}

    def note(self):
        return (f"llama.cpp {self.qtype.upper()}{' with an importance matrix' if self.imatrix else ''}: each tensor "
                "at the type llama.cpp's quantizer picks for it, in ggml blocks; norms and biases F32")

    def unquantized_dtype_bytes(self, device: str) -> int:
        return 4

    def load(self, path: str, device: str, trust_remote_code: bool = False):
        import torch

        return LlamaCppModel(Path(path) / FILE, threads=torch.get_num_threads(), type_k=self.type_k,
                             type_v=self.type_v)

    def engine_terms(self, shapes, windows: int, tokens: int) -> dict[str, int]:
        types, tensors = self.types(shapes), self.tensors(shapes)
        held = {name: (types[name], shape, tensor_bytes(types[name], shape)) for name, shape in tensors.items()}
        return held_terms(held, shapes, windows, tokens, self.type_k, self.type_v)

    def stored_types(self, artifact: Path) -> dict[str, str]:
        """Each tensor's ggml type in the artifact's file (what ``check_quantized`` reads for a GGUF)."""
        return {t.name: t.tensor_type.name for t in gguf_reader(Path(artifact) / FILE).tensors}


@dataclass(frozen=True)
class GgufMixedLayout(GgufLayout):
    """A GGUF whose quantizable tensors each take the type a fit chose, written by llama.cpp's quantize with one
    override per tensor (``requested``), each falling back where llama.cpp's does; 1-D tensors F32. ``allocation``
    gives a format (``gguf-q4_k``) per unit: a linear, a fused projection, a decoder block (``model.layers.3``), the
    token embedding (``EMBEDDING``) or the untied head (``lm_head``). Unresolved (no allocation), every tensor is
    priced at the largest of ``formats``: an upper bound."""

    allocation: tuple[tuple[str, str], ...] = ()
    formats: tuple[str, ...] = ()

    @property
    def quantizes(self) -> bool:
        return any(gguf_format_type(f) not in ("F32", "F16") for _, f in self.allocation)

    def requested(self, shapes) -> dict[str, str]:
        """GGUF tensor -> the ggml type the allocation asks for it (before llama.cpp's fallback), for every
        quantizable tensor, in the file's order."""
        modules = {gguf_name(lin.name): lin.name for lin in shapes.linears}
        modules.update({"token_embd.weight": EMBEDDING, "output.weight": "lm_head"})
        largest = max((gguf_format_type(f) for f in self.formats or ("gguf-f32",)), key=lambda t: BITS[t])
        return {name: gguf_format_type(self._format_of(modules[name])) if self.allocation else largest
                for name, shape in self.tensors(shapes).items() if allows_quantization(name, shape)}

    def _format_of(self, module: str) -> str:
        fused = fused_name(module)
        for unit, fmt in self.allocation:
            if module == unit or module.startswith(unit + ".") or fused == unit:
                return fmt
        raise RecipeError(f"The allocation gives {module} no format — resolve the fit again")

    def types(self, shapes) -> dict[str, str]:
        asked = self.requested(shapes)
        return {name: effective_type(asked[name], shape[0]) if name in asked else "F32"
                for name, shape in self.tensors(shapes).items()}

    def linear_bytes(self, out_features, in_features, device):
        raise NotImplementedError("a mixed GGUF's bytes depend on the tensor: use weight_terms")

    def note(self):
        return ("llama.cpp, one ggml type per tensor as a fit chose it (written with llama.cpp's tensor-type "
                "overrides; each falls back where its block does not divide the rows); norms and biases F32")
