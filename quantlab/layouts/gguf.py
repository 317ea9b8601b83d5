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
from quantlab.gguf_file import gguf_reader
from quantlab.layouts import Layout
from quantlab.layouts.gguf_types import gguf_name, tensor_bytes, tensor_types

FILE = "model.gguf"


@dataclass(frozen=True)
class GgufLayout(Layout):
    qtype: str = "q4_k_m"
    imatrix: bool = False
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

        return LlamaCppModel(Path(path) / FILE, threads=torch.get_num_threads())

    def engine_terms(self, shapes, windows: int, tokens: int) -> dict[str, int]:
        types, tensors = self.types(shapes), self.tensors(shapes)
        held = {name: (types[name], shape, tensor_bytes(types[name], shape)) for name, shape in tensors.items()}
        return held_terms(held, shapes, windows, tokens)

    def stored_types(self, artifact: Path) -> dict[str, str]:
        """Each tensor's ggml type in the artifact's file (what ``check_quantized`` reads for a GGUF)."""
        return {t.name: t.tensor_type.name for t in gguf_reader(Path(artifact) / FILE).tensors}
