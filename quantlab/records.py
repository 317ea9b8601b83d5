"""The record of one run (results.json's ``runs[]``, the store's row) and the definitions of its numbers.

Each definition lives beside the code that computes the number; this module gathers them.
"""

from __future__ import annotations

from quantlab.evaluate.accuracy import SUITE_DEFINITIONS
from quantlab.evaluate.fidelity import DEFINITIONS as FIDELITY
from quantlab.measure.cost import DEFINITIONS as COST
from quantlab.measure.latency import DEFINITIONS as LATENCY
from quantlab.measure.memory import DEFINITIONS as MEMORY
from quantlab.recipe import Recipe

DEFINITIONS = {**FIDELITY, **MEMORY, **LATENCY, **COST}


def definitions(suite: bool) -> dict:
    """Every number's definition; the suite metrics' too when the runs have suite accuracy."""
    return {**DEFINITIONS, **(SUITE_DEFINITIONS if suite else {})}


def make_record(recipe: Recipe, art: dict, fidelity: dict, bench: dict) -> dict:
    lat = bench["latency"]
    return {"recipe": recipe.name, "method": recipe.method, "bits": recipe.bits, "params": recipe.params(),
            "artifact": art["artifact"], "artifact_cached": art["cached"], "fidelity": fidelity,
            "guard": fidelity.get("guard"),
            "memory": bench["memory"],
            "latency": {"prefill_ms": (lat["prefill_ms"] or {}).get("median"),
                        "decode_tok_s": {b: v["median"] for b, v in lat["decode_tok_s"].items()},
                        "skipped": lat.get("skipped"), "detail": lat},
            "cost": art["cost"], "threads": bench["threads"]}
