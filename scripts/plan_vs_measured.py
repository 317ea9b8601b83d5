"""Each step's planned peak beside what it held, for the runs of one run set (or results.json).

    .venv/bin/python scripts/plan_vs_measured.py --run-set RUN_SET [--store DB] [--model qwen2.5-coder-1.5b]
    .venv/bin/python scripts/plan_vs_measured.py --results reports/.../results.json

Measured ("held"): peak RSS minus the step process's RSS after its libraries were imported (quantize: before
the model loads; bench: before load; fidelity: ``held_peak_bytes`` of the step). Planned: ``quantlab.plan.steps``
of this commit at the run's budget (none: in memory); where the job recorded a different plan when it ran, that
one is shown beside it. The ratio planned / held is the planner's error; a finished run set and a partial one
print alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlab import store  # noqa: E402
from quantlab.evaluate.fidelity import FidelitySettings  # noqa: E402
from quantlab.measure.latency import LatencySettings  # noqa: E402
from quantlab.models.load import load_config  # noqa: E402
from quantlab.models.source import resolve_model  # noqa: E402
from quantlab.plan.shapes import model_shapes  # noqa: E402
from quantlab.plan.steps import plan_job_steps  # noqa: E402
from quantlab.recipe import Recipe  # noqa: E402
from quantlab.records import held_bytes  # noqa: E402


def run_budget(run: dict) -> int | None:
    """The budget the run was planned under: published runs carry it; a stored row has it in its recorded plans."""
    published = ((run.get("memory") or {}).get("budget") or {}).get("max_memory_bytes")
    plans = ((run.get("fidelity") or {}).get("step") or {}).get("plans") or {}
    return published or next((q.get("budget_bytes") for q in plans.values() if q.get("budget_bytes")), None)


def planned(run: dict, shapes, device: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """This commit's plan of each step at the run's budget, and the plans the job recorded when it ran."""
    recorded = (run["fidelity"].get("step") or {}).get("plans") or {}
    prov = run.get("provenance") or {}
    recipe = Recipe.from_dict({"name": run["recipe"], "method": run["method"], "params": run["params"]})
    fidelity = FidelitySettings.from_dict(prov.get("fidelity_settings") or {})
    latency = LatencySettings.from_dict(prov.get("latency_settings") or {})
    budget = run_budget(run)
    fresh = {k: v.to_dict() for k, v in plan_job_steps(recipe, shapes, fidelity, latency, device, budget).items()}
    step = "reference" if run["recipe"] == "fp" else "fidelity"
    bench = fresh["bench"]
    if run["memory"].get("planned"):  # the budget skipped this bench: its weights are the planner's
        bench = {**bench, "mode": "skipped"}
    return ({"quantize": fresh["quantize"], "bench": bench, "fidelity": fresh[step]},
            {"fidelity": recorded[step]} if recorded.get(step) else {})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-set")
    ap.add_argument("--store")
    ap.add_argument("--results")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    args = ap.parse_args()
    if args.results:
        runs = json.loads(Path(args.results).read_text())["runs"]
    else:
        runs = list(reversed(store.list_runs(args.store, args.run_set)))
    shapes = model_shapes(load_config(resolve_model(args.model).path))
    print(f"$ .venv/bin/python scripts/plan_vs_measured.py {' '.join(sys.argv[1:])}")
    print("held = peak RSS above the step process's RSS once its libraries are imported; GB = 10^9 bytes; "
          "wall = the step's wall seconds (step_wall_s; quantize: the artifact's build)")
    print("planned = this commit's planner at the run's budget; as run = the plan the job recorded, where it differs")
    print(f"{'recipe':<21}{'step':<10}{'mode':<16}{'planned GB':>11}{'held GB':>9}{'planned/held':>14}{'wall s':>9}"
          f"  {'budget':<8}as run")
    for run in runs:
        device = (run.get("provenance") or {}).get("device", {}).get("device", "cpu")
        (plans, as_run), got = planned(run, shapes, device), held_bytes(run)
        walls = {**(run.get("step_wall_s") or {})}
        walls.setdefault("fidelity", (run["fidelity"].get("step") or {}).get("wall_s"))  # a record before step_wall_s
        walls.setdefault("quantize", (run.get("cost") or {}).get("quantize_wall_s") or None)
        for step in ("quantize", "fidelity", "bench"):
            p, m = plans[step], got[step]
            if p["mode"] == "none":
                continue
            ratio = f"{p['peak_bytes'] / m:.3f}" if m else "—"
            held = f"{m / 1e9:.2f}" if m else "—"
            budget = run_budget(run)
            verdict = "" if budget is None or not m else ("OVER" if m > budget else "within")
            old = as_run.get(step)
            then = (f"{old['mode']} {old['peak_bytes'] / 1e9:.2f} GB ({old['peak_bytes'] / m:.3f})" if m else
                    f"{old['mode']} {old['peak_bytes'] / 1e9:.2f} GB") if old and old["peak_bytes"] != p["peak_bytes"] else ""
            wall = f"{walls[step]:.0f}" if walls.get(step) else "—"
            print(f"{run['recipe']:<21}{step:<10}{p['mode']:<16}{p['peak_bytes'] / 1e9:>11.2f}{held:>9}{ratio:>14}"
                  f"{wall:>9}  {verdict:<8}{then}")


if __name__ == "__main__":
    main()
