"""The planner's peak memory of each step of a job, and how each step runs within a memory budget.

A budget (``--max-memory``) is the most memory any step may hold in model weights and activations on the
device: host RAM on CPU, GPU memory on CUDA. The libraries' own baseline (the Python process with torch and
transformers imported) is outside it. Before any work, every step of every job is predicted:

- quantize: the method's ``quantize_peak`` (``quantlab.methods``): what it holds while it quantizes;
- reference (the fp baseline's log-probs on the reference text): in memory (the fp model loaded whole) when that
  fits, else layer by layer (``quantlab.layerwise``: one decoder layer, one slice of the head, one forward's
  activations); a budget below that is refused;
- fidelity (a candidate's log-probs beside the reference's): the candidate loaded whole, windows in batches
  of ``batch``, fewer windows per forward when that fits and the default does not;
- bench: the model loaded whole, plus the KV cache and activations of its largest timed batch.

A job whose quantize or fidelity step cannot fit is refused before work with these numbers; a bench that
cannot fit is skipped (memory then comes from the planner, latency is not measured).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

import quantlab.plan.terms as terms
from quantlab.device import as_device
from quantlab.errors import UsageError
from quantlab.evaluate.fidelity import ROWS
from quantlab.evaluate.harness import HarnessSettings
from quantlab.methods import get_method
from quantlab.plan.sizes import parse_size

GB = 10**9
IN_MEMORY, LAYER_BY_LAYER, SKIPPED, REFUSED, NONE = "in memory", "layer by layer", "skipped", "refused", "none"
PHASES = ("convert", "load", "forward", "capture", "layers", "head", "compare", "save")
HEAD_SLICE_ROWS = 16384  # vocabulary rows of the output head per slice, layer by layer
ACCURACY_BATCH = HarnessSettings.batch_size  # lm-eval requests per forward in transformers
ACCURACY_TOKENS = 256  # tokens per lm-eval request, as planned


@dataclass(frozen=True)
class StepPlan:
    step: str
    mode: str
    peak_bytes: int
    components: dict = field(default_factory=dict)
    batch: int = 0  # windows per forward (reference, fidelity)
    reason: str = ""
    budget_bytes: int | None = None  # the budget it was planned under

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StepPlan":
        return cls(**data)


def resolve_budget(value: str | int | None) -> int | None:
    """``--max-memory`` (or a sweep file's ``max_memory``), else QUANTLAB_MAX_MEMORY, as bytes; None: no budget."""
    value = value if value not in (None, "") else os.environ.get("QUANTLAB_MAX_MEMORY") or None
    return None if value is None else parse_size(str(value))


def gb(n: int | None) -> str:
    """Bytes for a message: GB (10^9) with two decimals, MB or kB below 0.1 GB."""
    if n is None:
        return "?"
    if n >= GB // 10:
        return f"{n / GB:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 10**5 else f"{n / 1e3:.1f} kB"


def step_peak(components: dict) -> int:
    """The peak of a step's components. A step may go through phases that never overlap: keys ``"<phase>: ..."``
    are held only during that phase (``PHASES``: a GGUF source's one-time convert, a whole load's reading and
    converting and the forwards after it, a quantizer's calibration capture, the decoder layers, the output head,
    the final save), the rest throughout. The peak is the rest plus the largest phase."""
    prefixes = tuple(p + ": " for p in PHASES)
    phase = {p: sum(v for k, v in components.items() if k.startswith(p + ": ")) for p in PHASES}
    rest = sum(v for k, v in components.items() if not k.startswith(prefixes))
    return rest + max(phase.values())


def layout_weights(recipe, shapes, device: str) -> int:
    return step_peak(terms.weight_terms(get_method(recipe.method).layout(recipe.config), shapes, device))


def _forward(shapes, windows: int, tokens: int, elem: int) -> dict:
    """A loaded model's forward over ``windows`` x ``tokens`` and its log-probs: activations, KV cache, the fp32
    logits, the contiguous copy log_softmax makes of the logits without the last position, and the log-probs."""
    logprobs = windows * (tokens - 1) * shapes.vocab * 4
    return {"activations": terms.activation_bytes(shapes, tokens, windows, elem) - windows * shapes.vocab * 4,
            "kv_cache": terms.kv_cache_bytes(shapes, tokens, windows, elem),
            "logits": windows * tokens * shapes.vocab * 4, "log-softmax input copy": logprobs, "log_probs": logprobs}


def _layerwise_forward(shapes, windows: int, tokens: int, elem: int) -> dict:
    """The same forward layer by layer: a layer's activations (no KV cache kept), then the head's logits for all
    positions but the last, one head slice and its product for 256 positions, and the normalisation's temporary
    (one window's exp, as each window is normalised in place)."""
    rows = min(HEAD_SLICE_ROWS, shapes.vocab)
    return {"layers: activations": terms.activation_bytes(shapes, tokens, windows, elem) - windows * shapes.vocab * 4,
            "head: logits": windows * (tokens - 1) * shapes.vocab * 4, "head: slice": rows * shapes.hidden * elem,
            "head: slice product": min(windows * (tokens - 1), 256) * rows * 4,
            "head: logsumexp of one window": (tokens - 1) * shapes.vocab * 4}


def _always(shapes, windows: int, fidelity, elem: int) -> dict:
    return {"hidden states": 2 * windows * fidelity.chunk_tokens * shapes.hidden * elem,
            "norms and buffers": shapes.unquantized["norms"] * elem + shapes.buffer_bytes}


def layer_bytes(shapes, elem: int) -> int:
    """Bytes of one decoder layer's weights (every layer of the models quantlab plans is the same size)."""
    parts = shapes.unquantized
    outside = parts["embeddings"] + parts["lm_head"]
    return (shapes.params - outside) * elem // max(shapes.layers, 1)


def reference_components(shapes, fidelity, device: str, mode: str, windows: int) -> dict:
    fp = get_method("fp").layout(get_method("fp").config_cls())
    elem = fp.unquantized_dtype_bytes(device)
    if mode == IN_MEMORY:
        weights = terms.weight_terms(fp, shapes, device)
        return {"weights": step_peak(weights) - _unread_embedding(shapes, weights, fidelity, device),
                **_forward(shapes, windows, fidelity.chunk_tokens, elem)}
    return {"layers: one layer": layer_bytes(shapes, elem),
            **_layerwise_forward(shapes, windows, fidelity.chunk_tokens, elem), **_always(shapes, windows, fidelity, elem)}


def _unread_embedding(shapes, weights: dict, fidelity, device: str) -> int:
    """Bytes of the input embedding that stay on disk: on CPU transformers maps an fp32 checkpoint without a copy,
    and a lookup reads only the rows (4 KiB pages) of the text's tokens; a tied table is read whole by the head."""
    if not as_device(device).is_cpu or shapes.tied:
        return 0
    row = shapes.hidden * 4
    read = fidelity.max_chunks * fidelity.chunk_tokens * (-(-row // 4096) + 1) * 4096
    return max(weights["embeddings"] - read, 0)


def plan_reference(shapes, fidelity, device: str, budget: int | None) -> StepPlan:
    """In memory at the settings' batch if it fits; else in memory with fewer windows; else layer by layer."""
    batches = range(fidelity.batch_size, 0, -1)
    for mode in (IN_MEMORY, LAYER_BY_LAYER):
        for b in batches:
            comp = reference_components(shapes, fidelity, device, mode, b)
            if budget is None or step_peak(comp) <= budget:
                return StepPlan("reference", mode, step_peak(comp), comp, batch=b)
    comp = reference_components(shapes, fidelity, device, LAYER_BY_LAYER, 1)
    return StepPlan("reference", REFUSED, step_peak(comp), comp, batch=1,
                    reason=f"even layer by layer, one window needs {gb(step_peak(comp))} (one layer "
                           f"{gb(comp['layers: one layer'])}, one window's logits {gb(comp['head: logits'])}) — "
                           f"the budget {gb(budget)} is smaller than one layer's step; raise --max-memory")


def fidelity_components(recipe, shapes, fidelity, device: str, mode: str, windows: int) -> dict:
    """A candidate's fidelity step: its forward over ``windows`` windows and one window's comparison temporaries
    (the reference's log-probs read back, their exp, the difference), with the candidate loaded whole, or layer
    by layer: one layer as stored (and as its kernel converts it), its largest linear dequantized in flight, one head
    slice."""
    layout = get_method(recipe.method).layout(recipe.config)
    elem = layout.unquantized_dtype_bytes(device)
    compare = {"comparison": (fidelity.chunk_tokens - 1) * shapes.vocab * 4 + 3 * ROWS * shapes.vocab * 4}
    if mode == IN_MEMORY:
        engine = layout.engine_terms(shapes, windows, fidelity.chunk_tokens)
        forward = engine if engine is not None else _forward(shapes, windows, fidelity.chunk_tokens, elem)
        return whole_load(layout, shapes, device, layout_weights(recipe, shapes, device), {**forward, **compare})
    weights = terms.weight_terms(layout, shapes, device)
    largest = max((lin.out_features * lin.in_features for lin in shapes.linears), default=0)
    # Layer by layer the comparison comes after the head: the batch's log-probs, one reference window read
    # back and the row blocks' temporaries, with no layer or head slice held (quantlab.evaluate.fidelity.compare).
    after = {"compare: candidate log-probs of the batch": windows * (fidelity.chunk_tokens - 1) * shapes.vocab * 4,
             "compare: reference window and row blocks": compare["comparison"]}
    kernel = sum(v for k, v in layout.load_terms(shapes, device).items() if not k.startswith("load: "))
    return {"layers: one layer": (weights["linear_data"] + weights["linear_scales"] + kernel) // max(shapes.layers, 1),
            "layers: largest linear dequantized": largest * layout.dequantize_bytes_per_value(device),
            **_layerwise_forward(shapes, windows, fidelity.chunk_tokens, elem), **_always(shapes, windows, fidelity, elem),
            **after}


def checkpoint_pages(layout, shapes, device: str) -> dict:
    """The checkpoint's mapped pages that stay resident beside the copies a whole load makes of them, and the
    layout's own load terms (``Layout.load_terms``)."""
    own = layout.load_terms(shapes, device)
    if not layout.load_copies_linears:
        return own
    w = terms.weight_terms(layout, shapes, device)
    if layout.load_copies_everything:
        return {"checkpoint pages of the copied tensors": sum(w.values()), **own}
    return {"checkpoint pages of the copied linears": w["linear_data"] + w["linear_scales"], **own}


def whole_load(layout, shapes, device: str, weights: int, forward: dict) -> dict:
    """A step with the model loaded whole: its weights, what its load holds (``checkpoint_pages``) and its
    forward's terms, which are a phase of their own after the load where the load has one."""
    load = checkpoint_pages(layout, shapes, device)
    if any(k.startswith("load: ") for k in load):
        forward = {f"forward: {k}": v for k, v in forward.items()}
    return {"weights": weights, **forward, **load}


def is_reference(recipe) -> bool:
    """The fp baseline itself (recipe ``fp``): its fidelity is the reference against itself, with no forward of
    its own. Another fp dtype (bf16, fp16, fp32) is compared with the reference like any candidate."""
    return recipe.name == "fp"


def plan_fidelity(recipe, shapes, fidelity, device: str, budget: int | None) -> StepPlan:
    """In memory at the settings' batch, else with fewer windows, else layer by layer where the layout allows."""
    if is_reference(recipe):
        return StepPlan("fidelity", NONE, 0, reason="the fp baseline is its own reference")
    layout = get_method(recipe.method).layout(recipe.config)
    modes = (IN_MEMORY, LAYER_BY_LAYER) if layout.layer_by_layer else (IN_MEMORY,)
    for mode in modes:
        for b in range(fidelity.batch_size, 0, -1):
            comp = fidelity_components(recipe, shapes, fidelity, device, mode, b)
            if budget is None or step_peak(comp) <= budget:
                return StepPlan("fidelity", mode, step_peak(comp), comp, batch=b)
    comp = fidelity_components(recipe, shapes, fidelity, device, modes[-1], 1)
    how = "layer by layer" if layout.layer_by_layer else f"loaded whole ({gb(layout_weights(recipe, shapes, device))})"
    why = "" if layout.layer_by_layer else "; its layout is not run layer by layer"
    return StepPlan("fidelity", REFUSED, step_peak(comp), comp, batch=1,
                    reason=f"{recipe.name} {how} with one window needs {gb(step_peak(comp))}, over the budget {gb(budget)}{why}")


def bench_components(recipe, shapes, latency, device: str, batch: int) -> dict:
    layout = get_method(recipe.method).layout(recipe.config)
    elem = layout.unquantized_dtype_bytes(device)
    tokens = latency.prompt_tokens + latency.decode_tokens
    engine = layout.engine_terms(shapes, 0, tokens)  # an engine of its own benches batch 1 (llama-bench's way)
    return whole_load(layout, shapes, device, layout_weights(recipe, shapes, device), engine if engine is not None else
                      {"kv_cache": terms.kv_cache_bytes(shapes, tokens, batch, elem),
                       "activations": terms.activation_bytes(shapes, latency.prompt_tokens, batch, elem)})


def plan_bench(recipe, shapes, latency, device: str, budget: int | None) -> StepPlan:
    """The model loaded whole, timed at each of the settings' batch sizes; under a budget the largest batch sizes
    that do not fit are left out (``batch``: the largest benched), and with none left the bench is skipped."""
    tokens = latency.prompt_tokens + latency.decode_tokens
    comps = {b: bench_components(recipe, shapes, latency, device, b) for b in sorted(latency.batch_sizes)}
    largest = max(comps)
    fitting = [b for b, comp in comps.items() if budget is None or step_peak(comp) <= budget]
    full = step_peak(comps[largest])
    if not fitting:
        return StepPlan("bench", SKIPPED, full, comps[largest],
                        reason=f"{recipe.name} loaded whole needs {gb(full)} at batch {largest} x {tokens} "
                               f"tokens, over the budget {gb(budget)}: memory is the planner's, latency not measured")
    kept = fitting[-1]
    left = [b for b in comps if b > kept]
    reason = (f"batch {', '.join(map(str, left))} not timed: {recipe.name} at batch {largest} x {tokens} tokens needs "
              f"{gb(full)}, over the budget {gb(budget)}") if left else ""
    return StepPlan("bench", IN_MEMORY, step_peak(comps[kept]), comps[kept], batch=kept, reason=reason)


def plan_accuracy(recipe, shapes, device: str, budget: int | None) -> StepPlan:
    """The lm-eval step: the model loaded whole and one batch of requests scored. transformers (HFLM) scores
    ``ACCURACY_BATCH`` requests at once and holds their logits and log-softmax over the vocabulary; llama.cpp one
    request at a time. Requests are planned at ``ACCURACY_TOKENS`` tokens: those of the suites quantlab ships
    (arc_easy, piqa, hellaswag) are shorter; a longer task's batch can hold more, which the step's held memory then
    shows against the budget."""
    layout = get_method(recipe.method).layout(recipe.config)
    engine = layout.engine_terms(shapes, 0, ACCURACY_TOKENS)
    batch = 1 if engine is not None else ACCURACY_BATCH
    comp = whole_load(layout, shapes, device, layout_weights(recipe, shapes, device), engine if engine is not None else {
        "activations": terms.activation_bytes(shapes, ACCURACY_TOKENS, batch,
                                              layout.unquantized_dtype_bytes(device)) - batch * shapes.vocab * 4,
        "logits and log-softmax": 2 * batch * ACCURACY_TOKENS * shapes.vocab * 4})
    if budget is not None and step_peak(comp) > budget:
        return StepPlan("accuracy", SKIPPED, step_peak(comp), comp,
                        reason=f"{recipe.name} loaded whole with a batch of {batch} lm-eval requests of "
                               f"{ACCURACY_TOKENS} tokens needs {gb(step_peak(comp))}, over the budget {gb(budget)}: "
                               "accuracy not measured")
    return StepPlan("accuracy", IN_MEMORY, step_peak(comp), comp, batch=batch)


def quantize_sizes(recipe, shapes, device: str) -> dict:
    """What a method's ``quantize_peak`` and ``layer_by_layer_peak`` are computed from."""
    elem = as_device(device).default_dtype_bytes
    largest_linear = max((lin.out_features * lin.in_features for lin in shapes.linears), default=0) * elem
    return {"fp_weights": step_peak(terms.weight_terms(get_method("fp").layout(get_method("fp").config_cls()), shapes, device)),
            "quantized_weights": layout_weights(recipe, shapes, device),
            "largest_tensor": max(largest_linear, shapes.vocab * shapes.hidden * elem), "largest_linear": largest_linear,
            "layer": layer_bytes(shapes, elem), "shapes": shapes}


def plan_quantize(recipe, shapes, device: str, budget: int | None) -> StepPlan:
    method = get_method(recipe.method)
    if not method.writes_artifact:
        return StepPlan("quantize", NONE, 0, reason="no artifact to build")
    sizes = quantize_sizes(recipe, shapes, device)
    comp = method.quantize_peak(recipe.config, sizes, device)
    if budget is None or step_peak(comp) <= budget:
        return StepPlan("quantize", IN_MEMORY, step_peak(comp), comp)
    layered = method.layer_by_layer_peak(recipe.config, sizes, device)
    if layered is not None and step_peak(layered) <= budget:
        return StepPlan("quantize", LAYER_BY_LAYER, step_peak(layered), layered)
    way = "" if layered is None else f"; layer by layer {gb(step_peak(layered))}"
    return StepPlan("quantize", REFUSED, step_peak(comp), comp,
                    reason=f"quantizing {recipe.name} holds {gb(step_peak(comp))} "
                           f"({', '.join(f'{k} {gb(v)}' for k, v in comp.items())}){way}, over the budget {gb(budget)}")


def plan_job_steps(recipe, shapes, fidelity, latency, device: str, budget: int | None) -> dict[str, StepPlan]:
    """Every step of one job: quantize, reference (computed by whichever job's fidelity step needs it first, then
    cached), fidelity, accuracy (run when the job has a suite) and bench."""
    return {"quantize": plan_quantize(recipe, shapes, device, budget),
            "reference": plan_reference(shapes, fidelity, device, budget),
            "fidelity": plan_fidelity(recipe, shapes, fidelity, device, budget),
            "accuracy": plan_accuracy(recipe, shapes, device, budget),
            "bench": plan_bench(recipe, shapes, latency, device, budget)}


def require_fits(plan: StepPlan, what: str = "") -> StepPlan:
    """``plan`` itself, or a one-line UsageError (before any work) when the budget refused it."""
    if plan.mode == REFUSED:
        hint = "" if "raise --max-memory" in plan.reason else " — raise --max-memory or choose another recipe"
        raise UsageError(f"--max-memory: {what or plan.step}: {plan.reason}{hint}")
    return plan


def plan_steps(recipe, shapes, fidelity, latency, device: str, budget: int) -> dict[str, StepPlan]:
    """Every step of one job planned within ``budget``, each plan naming it: what every entry point (a sweep's
    jobs, quantize, eval) runs under a budget."""
    return {name: replace(plan, budget_bytes=budget)
            for name, plan in plan_job_steps(recipe, shapes, fidelity, latency, device, budget).items()}


def refusal(steps: dict[str, StepPlan]) -> str | None:
    """Why a job cannot run within the budget (its first refused step), or None."""
    bad = [s for s in steps.values() if s.mode == REFUSED]
    return f"{bad[0].step}: {bad[0].reason}" if bad else None
