"""The ggml type llama.cpp writes for each tensor when it quantizes an F32/F16 GGUF, and the bytes that type takes.

A port of ``llama_model_quantize`` as shipped in llama-cpp-python 0.3.36 (vendor/llama.cpp/src/llama-quant.cpp):
``tensor_allows_quantization``, ``llama_tensor_get_type`` with its ``_impl`` and ``tensor_type_fallback``, for
dense llama and qwen2 models and the file types in ``FTYPES``, with the default quantize parameters (no
``--output-tensor-type``, ``--token-embedding-type`` or ``--tensor-type`` overrides, not ``--pure``, the output
tensor quantized). The planner reads it to price a GGUF before llama.cpp writes it: a Q4_K_M file is not all Q4_K
(SmolLM2's hidden size 576 is no multiple of 256, so most of its tensors fall back to Q5_0, its tied embedding to
Q8_0, and a third of its attn_v / ffn_down layers get Q6_K).

Rules of llama-quant.cpp that cannot fire here are left out: the IQ*, Q2_K, Q3_K, MXFP4 and TQ file types, Falcon
and GLM5 branches, and the ``n_gqa() >= 4`` / ``n_expert == 8`` conditions (they only change the IQ/Q2/Q3 types,
or need an MoE model, which ``tensor_types`` refuses).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from quantlab.errors import RecipeError

FTYPES = ("f32", "f16", "q4_0", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "q8_0")
ARCHS = ("llama", "qwen2")

#: llama_ftype_get_default_type: the type every quantizable tensor starts from before the per-tensor rules.
DEFAULT_TYPE = {"f32": "F32", "f16": "F16", "q4_0": "Q4_0", "q4_k_s": "Q4_K", "q4_k_m": "Q4_K", "q5_k_s": "Q5_K",
                "q5_k_m": "Q5_K", "q6_k": "Q6_K", "q8_0": "Q8_0"}

#: ggml type -> (values per block, bytes per block), as ggml.c's type_traits (gguf.constants.GGML_QUANT_SIZES):
#: every type a file type in FTYPES can write, and the K-quants' fallbacks.
BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
          "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
          "Q5_K": (256, 176), "Q6_K": (256, 210)}
FLOAT_TYPES = ("F32", "F16", "BF16")
#: bits per value of each type, scales included (a block's bytes x 8 / its values): how types are ordered
BITS = {name: size * 8 / block for name, (block, size) in BLOCKS.items()}

#: tensor_type_fallback: a 256-value K-quant whose row length (ne0) is no multiple of 256 becomes this 32-value type
#: of about the same precision; if ne0 is no multiple of 32 either, F16.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

#: Substrings of names tensor_allows_quantization keeps as they are (besides 1-D tensors, names not ending in
#: "weight" and norms): none of them is in a llama/qwen2 GGUF, kept so that a stray one is not priced as quantized.
KEEP_SUBSTRINGS = ("ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
                   "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
                   *(f"time_mix_{part}.weight" for part in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1",
                                                             "a2", "g1", "g2", "decay_w1", "decay_w2", "lerp_fused")),
                   "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_",
                   ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd")
KEEP_NAMES = ("position_embd.weight", "token_types.weight")

#: tensor_get_category: the first substring a name contains decides its category (exact names first).
CATEGORIES = (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
              ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
              ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"))

#: HF module suffix -> GGUF tensor stem (convert_hf_to_gguf's tensor map for llama and qwen2).
HF_TO_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down", "embed_tokens": "token_embd",
              "lm_head": "output"}
#: the token embedding's HF module name in llama and qwen2 (``token_embd.weight``)
EMBEDDING = "model.embed_tokens"
_LAYER = re.compile(r"blk\.(\d+)\.")
_HF_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class _State:
    """quantize_state_impl's part that our file types read: counters advance in llama.cpp's load order."""

    ftype: str
    n_layer: int
    imatrix: bool
    tied: bool
    big: bool  # LLM_TYPE_70B: attn_v gets one more bit
    n_attn_v: int
    i_attn_v: int = 0
    i_ffn_down: int = 0


def tensor_types(ftype: str, tensors: dict[str, tuple[int, ...]], arch: str, n_layer: int, n_head: int,
                 n_head_kv: int, imatrix: bool = False) -> dict[str, str]:
    """GGUF tensor name (e.g. 'blk.3.attn_v.weight', 'token_embd.weight', 'output.weight', 'output_norm.weight') and
    its GGUF shape (ne0 = row length first, as gguf.GGUFReader's tensor.shape gives) -> the ggml type name llama.cpp
    writes ('Q4_K', 'Q5_0', 'F32', ...), for an F32 (or converter-written F16) source GGUF.

    ``n_layer`` is ``<arch>.block_count``; ``n_head``/``n_head_kv`` decide llama's 70B rule; ``imatrix`` says whether
    an importance matrix is passed (it moves Q4_0's first ffn_down layers to Q4_1)."""
    _check(ftype, tensors, arch, n_layer)
    default = DEFAULT_TYPE[ftype]
    state = _State(ftype, n_layer, imatrix, tied="output.weight" not in tensors,
                   big=_is_70b(arch, n_layer, n_head, n_head_kv),
                   n_attn_v=sum(_category(name) == "attn_v" for name in tensors))
    out = {}
    # The counters (i_attention_wv, i_ffn_down) advance in the loader's order, so the order must be llama.cpp's.
    for name in sorted(tensors, key=_load_order):
        shape = tuple(tensors[name])
        if not allows_quantization(name, shape):
            out[name] = "F32"  # kept as in the source, where the converter writes 1-D tensors as F32
        elif default in FLOAT_TYPES:
            out[name] = default  # llama_tensor_get_type only refines quantized defaults
        else:
            out[name] = _fallback(shape[0], _pick_type(state, name, shape[0], default))
    return {name: out[name] for name in tensors}


def tensor_bytes(ggml_type: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` (ne0 first) stored as ``ggml_type``: whole blocks along ne0 (ggml_nbytes)."""
    if ggml_type not in BLOCKS:
        raise RecipeError(f"Unknown ggml type {ggml_type!r} — use one of {', '.join(BLOCKS)}")
    block, size = BLOCKS[ggml_type]
    if not shape or shape[0] % block:
        raise RecipeError(f"A {ggml_type} tensor needs rows of a multiple of {block} values, not shape {shape} — "
                          "ask tensor_types for the type llama.cpp falls back to")
    n = 1
    for dim in shape:
        n *= dim
    return n // block * size


def gguf_name(hf_name: str) -> str | None:
    """'model.layers.3.self_attn.v_proj' (or its '.weight' / '.bias') -> 'blk.3.attn_v.weight'; 'model.embed_tokens'
    -> 'token_embd.weight'; 'lm_head' -> 'output.weight'; None for a module llama/qwen2's converter does not map."""
    module, _, leaf = hf_name.rpartition(".")
    if leaf not in ("weight", "bias"):
        module, leaf = hf_name, "weight"
    stem = HF_TO_GGUF.get(module.rpartition(".")[2])
    layer = _HF_LAYER.search(module)
    if stem is None or (layer is None) != (stem in ("token_embd", "output")):
        return None
    return f"{stem}.{leaf}" if layer is None else f"blk.{layer.group(1)}.{stem}.{leaf}"


def _check(ftype: str, tensors: dict, arch: str, n_layer: int) -> None:
    """Refuse what the port does not cover, before any rule runs, so that no half-right answer comes back."""
    if ftype not in FTYPES:
        near = difflib.get_close_matches(ftype.lower(), FTYPES, n=1)
        hint = f"Did you mean {near[0]!r}? " if near else ""
        raise RecipeError(f"Unknown GGUF file type {ftype!r}. {hint}Available: {', '.join(FTYPES)}")
    if arch not in ARCHS:
        raise RecipeError(f"GGUF tensor types are ported for {', '.join(ARCHS)} only, not {arch!r} — quantize with "
                          "llama.cpp and read the types from the file")
    moe = [name for name in tensors if "_exps." in name or "_shexp." in name or "ffn_gate_inp" in name]
    if moe:
        raise RecipeError(f"{moe[0]} is a mixture-of-experts tensor; the port covers dense models only — quantize "
                          "with llama.cpp and read the types from the file")
    if n_layer < 1:
        raise RecipeError(f"n_layer must be the model's block count (at least 1), not {n_layer}")


def _is_70b(arch: str, n_layer: int, n_head: int, n_head_kv: int) -> bool:
    """llama.cpp's LLM_TYPE_70B, the one model size its quantize rules name (models/llama.cpp, models/qwen2.cpp)."""
    if n_layer != 80:
        return False
    return arch == "qwen2" or n_head != n_head_kv  # a llama with 80 layers and no GQA is the 65B


def _load_order(name: str) -> tuple[int, str]:
    """llama_model_loader's weight_name_comparer: layer number first (-1 outside blocks), then the name."""
    match = _LAYER.match(name)
    return (int(match.group(1)) if match else -1, name)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((category for key, category in CATEGORIES if key in name), "other")


def _n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of 1 do not count, so a (576, 1) tensor is 1-D."""
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return n


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """tensor_allows_quantization with default params: 2-D and 3-D weights, no norms, none of the small special
    tensors (biases, norms and 1-D tensors keep their type)."""
    if _n_dims(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name or name in KEEP_NAMES:
        return False
    return not any(part in name for part in KEEP_SUBSTRINGS)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The _M types' layers that get more bits: the first and last eighth, and every third layer between them."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _pick_type(state: _State, name: str, ncols: int, default: str) -> str:
    """llama_tensor_get_type_impl for our file types: the type a quantizable tensor wants before the shape check."""
    category = _category(name)
    if category == "output" or (state.tied and category == "token_embd"):
        # A tied token_embd is also the output matrix, so it takes the output's type.
        if ncols % BLOCKS[default][0]:
            return "Q8_0"
        return default if default == "Q8_0" else "Q6_K"
    if category == "attn_v":
        return _attn_v_type(state, default)
    if category == "ffn_down":
        return _ffn_down_type(state, default)
    return default  # token_embd (untied), attn_q/k/output, ffn_gate/up: only IQ/Q2/Q3 types or MoE change them


def _attn_v_type(state: _State, new_type: str) -> str:
    i, ftype = state.i_attn_v, state.ftype
    state.i_attn_v += 1
    if ftype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, state.n_attn_v):
        new_type = "Q6_K"
    elif ftype == "q4_k_s" and i < 4:
        new_type = "Q5_K"
    if state.big and new_type in ("Q3_K", "Q4_K"):
        # 70B: 8 query heads share each attn_v, which is 8x smaller than attn_q, so more bits cost little.
        new_type = "Q5_K"
    return new_type


def _ffn_down_type(state: _State, new_type: str) -> str:
    # A dense model's layer is the counter (layer_info parses the name only for MoE models).
    i, n, ftype = state.i_ffn_down, state.n_layer, state.ftype
    state.i_ffn_down += 1
    if ftype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
        return "Q6_K"
    if ftype == "q4_k_s" and i < n // 8:
        return "Q5_K"
    if ftype == "q4_0" and state.imatrix and i < n // 8:
        # Guards the first ffn_down layers only with an imatrix, so a file without one stays as it always was.
        return "Q4_1"
    return new_type


def effective_type(target: str, ncols: int) -> str:
    """The type llama.cpp writes when ``target`` is asked for a tensor whose rows hold ``ncols`` values (an override
    does not bypass the fallback: llama_tensor_get_type runs tensor_type_fallback after it)."""
    return _fallback(ncols, target)


def _fallback(ncols: int, target: str) -> str:
    """tensor_type_fallback: a row length the target's block does not divide takes a 32-value type, else F16."""
    block = BLOCKS[target][0]
    if ncols % block == 0:
        return target
    fallback = FALLBACK.get(target, target)
    return fallback if ncols % BLOCKS[fallback][0] == 0 else "F16"
