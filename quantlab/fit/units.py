"""Units and formats of a fit: what gets one format each, which formats it may take, and the bytes of each choice.

A unit is a decoder block's quantizable linears together (``block``), the linears vLLM runs as one matmul together
(``fused``: q, k and v; gate and up; every other linear alone, as vLLM's Llama and Qwen2 ``packed_modules_mapping``
fuse them), or one linear (``linear``, the default), and an untied output head (``lm_head``) is a unit of its own
at every granularity: GPTQModel quantizes it (``lm_head=True``) but refuses a head tied to the input embedding,
and a tied head could only be quantized by untying it, which adds bytes, since the embedding stays unquantized. A
format is ``fp`` (left unquantized, at the dtype the model is held in) or a GPTQ short name (``gptq-w8``,
``gptq-w4-g64``): the formats GPTQModel's ``dynamic`` per-module overrides can mix in one checkpoint. The bytes
of a unit in a format are the planner's terms of the mixed layout (``unit_bytes``); the formats and the
projections vLLM fuses are the layout's own (``quantlab.layouts.gptq_mixed``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantlab.errors import RecipeError
from quantlab.layouts.gptq_mixed import FP, Format, GptqMixedLayout, fused_name, parse_format
from quantlab.plan.shapes import ModelShapes
from quantlab.plan.terms import weight_terms

GRANULARITIES = ("block", "fused", "linear")
HEAD = "lm_head"  # the output head's module name, as GPTQModel's model definitions name it
DEFAULT_FORMATS = ("fp", "gptq-w8", "gptq-w4-g64", "gptq-w4-g32")  # each divides SmolLM2's 576 and 1536


def parse_formats(names) -> tuple[Format, ...]:
    formats = tuple(parse_format(str(n).strip()) for n in names)
    if len({f.name for f in formats}) != len(formats) or len(formats) < 2:
        raise RecipeError("A fit needs at least two distinct formats — e.g. fp,gptq-w8,gptq-w4-g64")
    return formats


@dataclass(frozen=True)
class UnitSpec:
    name: str  # the block's module path (``model.layers.3``) or the linear's
    modules: tuple[tuple[str, int, int], ...]  # (linear name, out, in) of each linear in the unit
    block: int  # the decoder block it lies in (the prefix a forward can start after)


def model_units(shapes: ModelShapes, granularity: str = "block") -> list[UnitSpec]:
    """The quantizable units in model order. Fused expert stacks are not GPTQ linears and are refused."""
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
    """Every GPTQ format's group size must divide each unit's in-features."""
    for f in formats:
        if f.bits is not None and f.group_size > 0:
            bad = sorted({k for u in units for _, _, k in u.modules if k % f.group_size})
            if bad:
                raise RecipeError(f"fit format {f.name}: group size {f.group_size} does not divide in-features "
                                  f"{bad} of this model — drop it or use another group size")


def unit_bytes(unit: UnitSpec, fmt: str, shapes: ModelShapes, device: str) -> int:
    """Bytes the unit's linears (weights and biases) hold loaded in ``fmt``: the planner's terms of those linears
    (of the head's, for the untied head's unit)."""
    layout = GptqMixedLayout(((unit.name, fmt),))
    if shapes.head is not None and unit.name == shapes.head.name:
        return layout.head_bytes(shapes.head, shapes.unquantized["lm_head"], device)
    names = {n for n, _, _ in unit.modules}
    total = sum(sum(layout.named_linear_bytes(n, o, i, device).values()) for n, o, i in unit.modules)
    return total + sum(b for n, b in shapes.linear_biases if n in names) * layout.bias_dtype_bytes(device)


def fixed_bytes(units: list[UnitSpec], shapes: ModelShapes, device: str) -> int:
    """Bytes of everything outside the units (embeddings, norms, a tied head, other biases, buffers): the whole model's
    planned bytes less the units', so that fixed + Σ unit bytes is ``weight_terms`` of the allocation exactly."""
    layout = GptqMixedLayout(tuple((u.name, FP) for u in units))
    return sum(weight_terms(layout, shapes, device).values()) - sum(unit_bytes(u, FP, shapes, device) for u in units)
