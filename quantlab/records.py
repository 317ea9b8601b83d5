"""The record of one run (results.json's ``runs[]``, the store's row) and the definitions of its numbers.

Each definition lives beside the code that computes the number (a fidelity metric's in its declaration,
``quantlab.metrics``); this module gathers them.
"""

from __future__ import annotations

from quantlab import metrics
from quantlab.evaluate.accuracy import SUITE_DEFINITIONS
from quantlab.evaluate.flips import DEFINITION as FLIPS
from quantlab.fit.allocate import DEFINITION as FIT
from quantlab.measure.cost import DEFINITIONS as COST
from quantlab.measure.latency import DEFINITIONS as LATENCY
from quantlab.measure.memory import DEFINITIONS as MEMORY
from quantlab.methods import get_method
from quantlab.plan.steps import gb
from quantlab.recipe import Recipe

BUDGET = {
    "budget": "each step's held_peak_bytes (quantize, fidelity, bench) beside the memory budget (--max-memory); "
              "over: the steps that held more than the budget. A step whose artifact was quantized earlier "
              "without a budget is not judged (unjudged)",
}
WALL = {
    "step_wall_s": "wall seconds of each step of the run, each in a process of its own: quantize (quantize_wall_s, "
                   "the artifact's build, also when a later run reused the artifact), fidelity and bench (from the "
                   "step process's entry to its result: imports, loads and the work); None where a step ran in no "
                   "process of its own (a bench the budget skipped) or the record predates this field",
}
ENGINE = {
    "engine": "what ran the artifact for its fidelity and bench (quantlab.engines): transformers (torch) or llama.cpp "
              "(llama-cpp-python; its log-probs, timings as llama-bench defines them, and buffers are llama.cpp's own)",
}
DEFINITIONS = {**MEMORY, **LATENCY, **COST, **BUDGET, **WALL, **ENGINE}  # after the fidelity metrics' (quantlab.metrics)
STEPS = ("quantize", "fidelity", "bench")


def definitions(suite: bool, fit: bool = False) -> dict:
    """Every number's definition; the suite metrics' too when the runs have suite accuracy, and ``fit``'s when
    one of them is a fit. The fidelity metrics' are the registry's (``quantlab.metrics``) when this is called."""
    return {**metrics.definitions(), **DEFINITIONS, **({**SUITE_DEFINITIONS, "flips": FLIPS} if suite else {}),
            **(FIT if fit else {})}


def make_record(recipe: Recipe, art: dict, fidelity: dict, bench: dict) -> dict:
    lat = bench["latency"]
    return {"recipe": recipe.name, "method": recipe.method, "bits": recipe.bits, "params": recipe.params(),
            "engine": get_method(recipe.method).layout(recipe.config).engines[0],
            "artifact": art["artifact"], "artifact_cached": art["cached"], "fidelity": fidelity,
            "guard": fidelity.get("guard"),
            "memory": bench["memory"],
            "latency": {"prefill_ms": (lat["prefill_ms"] or {}).get("median"),
                        "decode_tok_s": {b: v["median"] for b, v in lat["decode_tok_s"].items()},
                        "skipped": lat.get("skipped"), "detail": lat},
            "cost": art["cost"], "threads": bench["threads"],
            "step_wall_s": {"quantize": art["cost"].get("quantize_wall_s"),
                            "fidelity": (fidelity.get("step") or {}).get("wall_s"),
                            "bench": bench.get("step_wall_s")}}


def held_bytes(record: dict) -> dict[str, int | None]:
    """What each step of a run held at its peak above its libraries (``held_peak_bytes``), None where it is not
    known: quantize (from the artifact's cost; an older artifact: its peak RSS minus the RSS before), fidelity
    (the reference step for fp), bench (an older record: its peak minus the RSS before the load)."""
    cost, mem, fid = record.get("cost") or {}, record.get("memory") or {}, record.get("fidelity") or {}
    held = lambda d: (d or {}).get("held_peak_bytes")  # noqa: E731
    quantize = held(cost.get("held"))
    if quantize is None and cost.get("quantize_peak_rss_bytes") and cost.get("process_rss_before_bytes"):
        quantize = cost["quantize_peak_rss_bytes"] - cost["process_rss_before_bytes"]
    bench = held(mem.get("held"))
    if bench is None and mem.get("peak_bytes") and mem.get("process_rss_before_load_bytes"):
        bench = mem["peak_bytes"] - mem["process_rss_before_load_bytes"]
    return {"quantize": quantize, "fidelity": held((fid.get("step") or {}).get("memory")), "bench": bench}


def budget_check(record: dict, budget: int) -> dict:
    """Each step's held memory against ``budget`` (see ``BUDGET``): ``{"max_memory_bytes", "held_bytes", "over",
    "unjudged"}``; ``over`` lists the steps that held more than the budget."""
    held = held_bytes(record)
    unjudged = []
    if (record.get("cost") or {}).get("budgeted") is False:  # the artifact was built before, without a budget
        unjudged.append("quantize")
    over = [s for s in STEPS if s not in unjudged and held[s] is not None and held[s] > budget]
    return {"max_memory_bytes": budget, "held_bytes": held, "over": over, "unjudged": unjudged}


def budget_warning(recipe: str, step: str, held: int, budget: int, plan) -> str:
    """The one-line warning for a step that held more than the budget (``plan``: its StepPlan, or None)."""
    return (f"{recipe}: its {step} step held {gb(held)}, over the {gb(budget)} budget (planned "
            f"{gb(plan and plan.peak_bytes)}, {plan.mode if plan else '?'}) — the planner under-predicted it; leave more "
            "headroom in --max-memory")
