"""Units and formats of a fit: what gets one format each, which formats it may take, and the bytes of each choice.

A unit is a decoder block's quantizable linears together (``block``), the linears vLLM runs as one matmul together
(``fused``: q, k and v; gate and up; every other linear alone, as vLLM's Llama and Qwen2 ``packed_modules_mapping``
fuse them), or one linear (``linear``, the default), and an untied output head (``lm_head``) is a unit of its own
at every granularity: GPTQModel quantizes it (``lm_head=True``) but refuses a head tied to the input embedding,
and a tied head could only be quantized by untying it, which adds bytes, since the embedding stays unquantized.

A fit's formats are of one family. GPTQ: ``fp`` (left unquantized, at the dtype the model is held in) or a GPTQ
short name (``gptq-w8``, ``gptq-w4-g64``), the formats GPTQModel's ``dynamic`` per-module overrides can mix in one
checkpoint (``quantlab.layouts.gptq_mixed``, which also names the projections vLLM fuses). GGUF: ``gguf-<type>``
(``gguf-q4_k``, ``gguf-q8_0``, ``gguf-f16``), a ggml type per tensor, as llama.cpp's quantize writes any mix of them
(``quantlab.layouts.gguf``); there the token embedding is a unit of its own too (``EMBEDDING``, before the first
block: llama.cpp quantizes it, and when the head is tied to it, it is the head as well). The bytes of a unit in a
format are the planner's terms of the mixed layout (``unit_bytes``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantlab.errors import RecipeError
from quantlab.layouts import gptq_mixed
from quantlab.layouts.gguf import GgufMixedLayout, gguf_format_type
from quantlab.layouts.gguf_types import EMBEDDING, effective_type, tensor_bytes
from quantlab.layouts.gptq_mixed import FP, Format, GptqMixedLayout, fused_name
from quantlab.plan.shapes import ModelShapes
from quantlab.plan.terms import weight_terms

GRANULARITIES = ("block", "fused", "linear")
HEAD = "lm_head"  # the output head's module name, as GPTQModel's model definitions name it
DEFAULT_FORMATS = ("fp", "gptq-w8", "gptq-w4-g64", "gptq-w4-g32")  # each divides SmolLM2's 576 and 1536
GGUF_DEFAULT_FORMATS = ("gguf-q4_k", "gguf-q5_k", "gguf-q6_k", "gguf-q8_0")  # the k-quants and Q8_0 people deploy
FAMILIES = ("gptq", "gguf")


def parse_format(name: str) -> Format:
    """A fit format: ``fp`` or a GPTQ one (``gptq_mixed.parse_format``), or a GGUF one (``gguf-q4_k``: its ggml type
    and its nominal bits, 4; no bits for ``gguf-f32``, the source's own values)."""
    if name.startswith("gguf-"):
        kind = gguf_format_type(name)
        return Format(name, None if kind == "F32" else int(re.search(r"\d+", kind).group()), ggml_type=kind)
    return gptq_mixed.parse_format(name)


def family(formats) -> str:
    """``gguf`` when the formats are GGUF ones, else ``gptq``."""
    return "gguf" if any(f.ggml_type for f in formats) else "gptq"


def parse_formats(names) -> tuple[Format, ...]:
    formats = tuple(parse_format(str(n).strip()) for n in names)
    if len({f.name for f in formats}) != len(formats) or len(formats) < 2:
        raise RecipeError("A fit needs at least two distinct formats — e.g. fp,gptq-w8,gptq-w4-g64 or "
                          "gguf-q4_k,gguf-q6_k,gguf-q8_0")
    if len({bool(f.ggml_type) for f in formats}) > 1:
        raise RecipeError("A fit's formats are all GPTQ (fp, gptq-...) or all GGUF (gguf-...), one checkpoint of one "
                          "engine — drop the others")
    return formats


@dataclass(frozen=True)
class UnitSpec:
    name: str  # the block's module path (``model.layers.3``) or the linear's
    modules: tuple[tuple[str, int, int], ...]  # (linear name, out, in) of each linear in the unit
    block: int  # the decoder block it lies in (the prefix a forward can start after)


def model_units(shapes: ModelShapes, granularity: str = "block", embedding: bool = False) -> list[UnitSpec]:
    """The quantizable units in model order, the token embedding first with ``embedding`` (a GGUF fit's). Fused
    expert stacks are not GPTQ linears and are refused."""
    if granularity not in GRANULARITIES:
        raise RecipeError(f"fit units must be one of {', '.join(GRANULARITIES)} (got {granularity!r})")
    if any(lin.count > 1 for lin in shapes.linears):
        raise RecipeError("This model's experts are fused tensors, which GPTQModel's per-module formats do not "
                          "cover — fit a dense model")
    groups: dict[str, list] = {}
    blocks: dict[str, int] = {}
    for lin in shapes.linears:
        match = re.match(r"^(.*?\.(\d+))\.", lin.name)
        if not match:
            raise RecipeError(f"{lin.name} lies in no numbered decoder block — fit cannot place it")
        key = {"block": match.group(1), "fused": fused_name(lin.name)}.get(granularity, lin.name)
        groups.setdefault(key, []).append((lin.name, lin.out_features, lin.in_features))
        blocks[key] = int(match.group(2))
    units = [UnitSpec(k, tuple(v), blocks[k]) for k, v in groups.items()]
    if embedding:  # (vocab, hidden) as (out, in): ggml's rows are the hidden size, as a linear's are its inputs
        units.insert(0, UnitSpec(EMBEDDING, ((EMBEDDING, shapes.vocab, shapes.hidden),), 0))
    if shapes.head is not None and shapes.head.name == HEAD:  # the forward reaches it after every block
        units.append(UnitSpec(HEAD, ((HEAD, shapes.head.out_features, shapes.head.in_features),), shapes.layers))
    return units


def split_fused(per_module: dict[str, str]) -> list[str]:
    """The fused projections whose linears were given different formats: a checkpoint with any loads with
    GPTQModel.load but not in vLLM, which builds each fused projection in one format."""
    seen: dict[str, set] = {}
    for name, fmt in per_module.items():
        seen.setdefault(fused_name(name), set()).add(fmt)
    return [name for name, fmts in seen.items() if len(fmts) > 1]


def check_formats(formats, units: list[UnitSpec]) -> None:
    """Every GPTQ format's group size must divide each unit's in-features (a GGUF type that does not falls back,
    as llama.cpp's quantize does)."""
    for f in formats:
        if f.bits is not None and f.group_size > 0 and not f.ggml_type:
            bad = sorted({k for u in units for _, _, k in u.modules if k % f.group_size})
            if bad:
                raise RecipeError(f"fit format {f.name}: group size {f.group_size} does not divide in-features "
                                  f"{bad} of this model — drop it or use another group size")


def unit_bytes(unit: UnitSpec, fmt: str, shapes: ModelShapes, device: str) -> int:
    """Bytes the unit's linears (weights and biases) hold loaded in ``fmt``: the planner's terms of those linears
    (of the head's, for the untied head's unit). A GGUF format: each weight's tensor bytes at the type llama.cpp
    writes for it (biases stay F32, outside the units)."""
    if fmt.startswith("gguf-"):
        return sum(tensor_bytes(effective_type(gguf_format_type(fmt), k), (k, o)) for _, o, k in unit.modules)
    layout = GptqMixedLayout(((unit.name, fmt),))
    if shapes.head is not None and unit.name == shapes.head.name:
        return layout.head_bytes(shapes.head, shapes.unquantized["lm_head"], device)
    names = {n for n, _, _ in unit.modules}
    total = sum(sum(layout.named_linear_bytes(n, o, i, device).values()) for n, o, i in unit.modules)
    return total + sum(b for n, b in shapes.linear_biases if n in names) * layout.bias_dtype_bytes(device)


def fixed_bytes(units: list[UnitSpec], shapes: ModelShapes, device: str, kind: str = "gptq") -> int:
    """Bytes of everything outside the units (embeddings, norms, a tied head, other biases, buffers): the whole model's
    planned bytes less the units', so that fixed + Σ unit bytes is ``weight_terms`` of the allocation exactly
    (``kind``: the formats' family)."""
    if kind == "gguf":
        fmt = "gguf-f32"
        layout = GgufMixedLayout(allocation=tuple((u.name, fmt) for u in units))
    else:
        layout, fmt = GptqMixedLayout(tuple((u.name, FP) for u in units)), FP
    return sum(weight_terms(layout, shapes, device).values()) - sum(unit_bytes(u, fmt, shapes, device) for u in units)

