"""The fit planner: predicted memory of each recipe from a model's config alone, and whether it fits.

``plan_model("meta-llama/Llama-3.1-8B", PlanSettings(gpu_mem=32e9, context=8192))`` returns every memory
component per recipe (see ``quantlab.plan.terms`` for the definitions), the total, fits yes/no with the
headroom, the largest context that fits, and what would fit when nothing does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quantlab.device import CUDA, DEVICE_KINDS
from quantlab.engines.llamacpp import kv_bytes
from quantlab.errors import RecipeError, UsageError
from quantlab.methods import get_method
from quantlab.plan import terms
from quantlab.plan.known import resolve_config
from quantlab.plan.shapes import model_shapes, require_linears
from quantlab.plan.sizes import GB, parse_size  # noqa: F401 (re-exported)
from quantlab.plan.steps import plan_quantize, quantize_sizes, step_peak
from quantlab.recipe import parse_recipe_list

PLAN_RECIPES = "fp,bnb-int8,bnb-nf4,bnb-nf4-dq,gptq-w8,gptq-w4-g128,rtn-w8"
KV_FORMATS = ("f16", "q8_0", "q4_0")  # the llama.cpp cache types the plan shows
GPU_SIZES_GB = (16, 24, 32, 40, 48, 80, 96, 141, 192)  # common single-GPU memory sizes, for suggestions


@dataclass(frozen=True)
class PlanSettings:
    gpu_mem: int = 32 * GB
    context: int = 4096
    batch: int = 1
    device: str = CUDA
    recipes: tuple = field(default_factory=tuple)

    def __post_init__(self):
        if self.context < 1 or self.batch < 1 or self.gpu_mem <= 0:
            raise UsageError("context, batch and GPU memory must be positive — e.g. --context 4096 --batch 1")
        if self.device not in DEVICE_KINDS:
            raise UsageError(f"plan device must be cuda or cpu (got {self.device!r})")


def plan_model(ref: str, settings: PlanSettings, trust_remote_code: bool = False) -> dict:
    recipes = list(settings.recipes) or parse_recipe_list(PLAN_RECIPES)
    config, source = resolve_config(ref, trust_remote_code)
    shapes = model_shapes(config, trust_remote_code)  # its shape fields checked first (plan.shapes.check_config)
    require_linears(len(shapes.linears), ref)
    rows = [plan_recipe(recipe, shapes, settings) for recipe in recipes]
    return {
        "model": {"ref": ref, "config_source": source, **_shape_summary(shapes)},
        "settings": {"gpu_mem_bytes": settings.gpu_mem, "context": settings.context, "batch": settings.batch,
                     "device": settings.device},
        "recipes": rows,
        "kv_formats": kv_formats(shapes, settings),
        "advice": advise(rows, shapes, settings),
        "definitions": definitions(),
    }


def plan_recipe(recipe, shapes, settings: PlanSettings) -> dict:
    method = get_method(recipe.method)
    row = {"recipe": recipe.name, "method": recipe.method, "bits": recipe.bits}
    try:
        method.check_model(recipe.config, shapes.linear_shapes())
    except RecipeError as exc:
        return {**row, "applicable": False, "reason": str(exc)}
    layout = method.layout(recipe.config)
    weights = terms.weight_terms(layout, shapes, settings.device)
    elem = layout.unquantized_dtype_bytes(settings.device)
    fixed = sum(weights.values()) + terms.runtime_bytes(settings.device)
    in_llama_cpp = layout.engines[0] == "llama.cpp"  # its own F16 cache, whatever its tensors' types

    def cache(context: int) -> int:
        if in_llama_cpp:
            return kv_bytes(shapes, context, settings.batch)
        return terms.kv_cache_bytes(shapes, context, settings.batch, elem)

    def total_at(context: int) -> int:
        return fixed + cache(context) + terms.activation_bytes(shapes, context, settings.batch, elem)

    kv = cache(settings.context)
    act = terms.activation_bytes(shapes, settings.context, settings.batch, elem)
    total = total_at(settings.context)
    whole = plan_quantize(recipe, shapes, settings.device, None)
    layered = method.layer_by_layer_peak(recipe.config, quantize_sizes(recipe, shapes, settings.device), settings.device)
    return {
        **row, "applicable": True, "layout": layout.note(),
        "quantize": {"peak_bytes": whole.peak_bytes, "components": whole.components,
                     "layer_by_layer_bytes": step_peak(layered) if layered else None},
        "components": {**weights, "kv_cache": kv, "activations": act, "runtime": terms.runtime_bytes(settings.device)},
        "weights_bytes": sum(weights.values()),
        "activation_elem_bytes": elem,
        "total_bytes": total,
        "fits": total <= settings.gpu_mem,
        "headroom_bytes": settings.gpu_mem - total,
        "max_context": _max_context(total_at, settings.gpu_mem, shapes.max_positions),
    }


def kv_formats(shapes, settings: PlanSettings) -> dict:
    """llama.cpp's KV cache at the plan's context and batch in each cache type it offers for keys and values alike
    (``-ctk``/``-ctv``), bytes; None where the type's block does not divide the model's KV rows."""
    out = {}
    for name in KV_FORMATS:
        try:
            out[name] = kv_bytes(shapes, settings.context, settings.batch, name, name)
        except UsageError:
            out[name] = None
    return out


def _max_context(total_at, budget: int, limit: int | None) -> int:
    """Largest context (≤ the model's max positions) whose total fits ``budget``; 0 when none does."""
    hi = limit or 2**20
    if total_at(1) > budget:
        return 0
    if total_at(hi) <= budget:
        return hi
    lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total_at(mid) <= budget else (lo, mid)
    return lo


def advise(rows: list[dict], shapes, settings: PlanSettings) -> list[str]:
    """One line per conclusion: what fits, and what would when nothing does."""
    ok = [r for r in rows if r.get("applicable")]
    fitting = [r for r in ok if r["fits"]]
    budget = settings.gpu_mem / GB
    if fitting:
        best = max(fitting, key=lambda r: (r["bits"], r["headroom_bytes"]))
        lines = [f"{best['recipe']} is the highest-precision recipe that fits {budget:g} GB at context "
                 f"{settings.context} x batch {settings.batch} ({best['headroom_bytes'] / GB:.2f} GB headroom)."]
        for r in ok:
            if not r["fits"] and r["max_context"]:
                lines.append(f"{r['recipe']} fits only up to context {r['max_context']}.")
        return lines
    if not ok:
        return ["No recipe applies to this model — see each recipe's reason."]
    smallest = min(ok, key=lambda r: r["total_bytes"])
    need = smallest["total_bytes"] / GB
    gpu = next((g for g in GPU_SIZES_GB if g >= need), None)
    lines = [f"Nothing fits {budget:g} GB at context {settings.context}: the smallest, {smallest['recipe']}, "
             f"needs {need:.1f} GB" + (f" — a {gpu} GB GPU holds it" if gpu else "") + "."]
    c = smallest["components"]
    rest = sum(v for k, v in c.items() if k not in ("linear_data", "linear_scales"))
    bpw = (settings.gpu_mem - rest) * 8 / shapes.quantized_weights
    lines.append(f"To fit {budget:g} GB the quantized layers would need {max(bpw, 0):.2f} bits per weight including "
                 f"scales ({smallest['recipe']} uses {(c['linear_data'] + c['linear_scales']) * 8 / shapes.quantized_weights:.2f}): "
                 "a 2-3-bit method, or tensor parallelism over "
                 f"{-(-smallest['total_bytes'] // settings.gpu_mem)} GPUs of {budget:g} GB.")
    if smallest["max_context"]:
        lines.append(f"{smallest['recipe']} would fit at context ≤ {smallest['max_context']}.")
    return lines


def _shape_summary(shapes) -> dict:
    return {"model_type": shapes.model_type, "params": shapes.params, "quantized_weights": shapes.quantized_weights,
            "quantized_layers": sum(lin.count for lin in shapes.linears), "layers": shapes.layers,
            "hidden": shapes.hidden, "intermediate": shapes.intermediate, "heads": shapes.heads,
            "kv_heads": shapes.kv_heads, "head_dim": shapes.head_dim, "vocab": shapes.vocab, "tied": shapes.tied,
            "sliding_window": shapes.sliding_window, "sliding_layers": shapes.sliding_layers,
            "max_positions": shapes.max_positions, "experts_per_token": shapes.experts_per_token,
            "unquantized_elements": shapes.unquantized, "buffer_bytes": shapes.buffer_bytes}


def definitions() -> dict:
    return {
        "GB": "10^9 bytes",
        "linear_data": "bytes of the quantized linear weights' values (lm_head excluded), as loaded",
        "linear_scales": "their per-group scales, zero points, absmax/codebooks and group indices",
        "embeddings": "input embedding at the unquantized dtype (tied lm_head counted here once)",
        "lm_head": "untied output projection at the unquantized dtype (no recipe quantizes it)",
        "norms_biases_other": "norms, biases, routers at the unquantized dtype",
        "buffers": "rotary tables and other buffers at their own dtype",
        "kv_cache": "2 x layers x kv_heads x head_dim x tokens x batch x bytes; sliding-window layers hold "
                    "min(context, window) tokens; in llama.cpp (GGUF recipes) its F16 cache, each sequence's tokens "
                    "rounded up to 256 cells, every layer full size",
        "kv_formats": "llama.cpp's KV cache at the context and batch with keys and values in one cache type (f16, "
                      "q8_0: 34 bytes per 32 values, q4_0: 18), as it allocates it",
        "activations": (terms.activation_bytes.__doc__ or "").split("\n")[0].strip() + " "
                       "= batch x context x (2 x hidden + 3 x intermediate x experts_per_token) x bytes "
                       "+ batch x vocab x 4",
        "runtime": f"CUDA context and library workspaces, an estimate: {terms.CUDA_RUNTIME_BYTES / 2**20:.0f} MiB "
                   "on CUDA, 0 on CPU",
        "max_context": "largest context (≤ the model's max positions) whose total fits the memory budget",
        "quantize_peak": "what quantizing holds at its peak on the plan's device, by component (each method's "
                         "quantize_peak; 'layered': RTN read and written one decoder layer at a time)",
    }
