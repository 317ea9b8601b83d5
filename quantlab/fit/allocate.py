"""The allocation: one format per unit, minimising the predicted total KLD within a byte budget, exactly.

Each unit (a linear, a decoder block's linears, the lm_head) has candidate formats, each with the bytes the
planner predicts for the unit in that format and the unit's measured sensitivity (KLD against fp with only
that unit quantized). The predicted KLD of an allocation is the sum of its units' (an assumption the fit
benchmark checks). Minimising it under ``fixed_bytes + Σ bytes ≤ budget`` is a multiple-choice knapsack,
solved as a 0/1 integer programme by scipy's ``milp`` (HiGHS) with a zero optimality gap: the optimum, not a
heuristic's guess. The chosen bytes are summed again in integers, so the budget is kept to the byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.errors import UsageError

DEFINITION = {
    "fit": "a fit recipe's allocation and what chose it (None for every other recipe). sensitivity: the table it "
           "was chosen from (units in model order, formats, granularity, text: the sensitivity text, the first "
           "windows of the fit's calibration text, not the reference text), whose kld[unit][format] is the mean "
           "per-token KL(fp || model) in nats/token with only that unit in that format (its weights from the "
           "format's uniform GPTQ artifact) against the fp model on the sensitivity text, every other unit fp (fp: 0); "
           "unit_formats: the format chosen for each unit, units_per_format and fp_units their counts; "
           "predicted_kld: the sum over the units of their chosen formats' KLDs in that table (it assumes the units' "
           "KLDs add; fidelity.kld_mean is what the fit measured on the reference text); predicted_bytes: the "
           "planner's exact weight bytes of the allocation (the model as GPTQModel.load holds it), compared with "
           "memory.weights_bytes as loaded; budget_bytes: the weights budget the allocation keeps, given or what a "
           "GPU plan leaves for the weights; sensitivity_table and sensitivity_cost: the cached table's path and "
           "what measuring it cost",
}


@dataclass(frozen=True)
class Option:
    format: str
    bytes: int
    kld: float


@dataclass(frozen=True)
class Unit:
    name: str
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Allocation:
    formats: dict[str, str]  # unit -> format
    bytes: int  # fixed_bytes + the units' bytes in their formats
    kld: float  # the sum of the units' KLDs in their formats (predicted)
    budget: int


def smallest_budget(units: list[Unit], fixed_bytes: int) -> int:
    """The least budget any allocation meets: every unit in its smallest format."""
    return fixed_bytes + sum(min(o.bytes for o in u.options) for u in units)


def allocate(units: list[Unit], budget: int, fixed_bytes: int = 0) -> Allocation:
    """The allocation of least predicted KLD whose bytes are ≤ ``budget``; a UsageError naming the smallest
    budget that can be met when none can."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    if any(not u.options for u in units):
        raise UsageError(f"Unit {next(u.name for u in units if not u.options)} has no candidate format")
    least = smallest_budget(units, fixed_bytes)
    if budget < least:
        raise UsageError(f"No allocation fits {budget} bytes: the smallest that can be met is {least} bytes "
                         "(every unit in its smallest format) — raise the budget or add a smaller format")
    flat = [(i, o) for i, u in enumerate(units) for o in u.options]
    cost = np.array([o.kld for _, o in flat], float)
    pick = np.zeros((len(units), len(flat)))
    for j, (i, _) in enumerate(flat):
        pick[i, j] = 1
    sizes = np.array([[o.bytes for _, o in flat]], float)
    constraints = [LinearConstraint(pick, 1, 1), LinearConstraint(sizes, -np.inf, budget - fixed_bytes)]
    res = milp(cost, constraints=constraints, integrality=np.ones(len(flat)), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0})
    if res.x is None:
        raise UsageError(f"The allocation solver found no solution within {budget} bytes ({res.message})")
    chosen = [flat[j] for j in np.flatnonzero(res.x > 0.5)]
    formats = {units[i].name: o.format for i, o in chosen}
    total = fixed_bytes + sum(o.bytes for _, o in chosen)
    if len(formats) != len(units) or total > budget:  # integer re-check: the budget is kept to the byte
        raise UsageError(f"The allocation solver returned an infeasible choice ({total} > {budget} bytes)")
    return Allocation(formats, total, float(sum(o.kld for _, o in chosen)), budget)
