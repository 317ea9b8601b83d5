"""What one artifact's quantize step cost, beside the planner's prediction for it: for an artifact whose job has
not finished (so no run is stored), or to check one quantize step on its own.

    .venv/bin/python scripts/artifact_cost.py ARTIFACT_DIR [--max-memory 3.5GB]

Prints JSON: the artifact's manifest (quantlab.json: recipe, source model, method notes, cost with what the step
held, versions, device, creation time) and ``planned``, ``quantlab.plan.steps.plan_quantize`` for its recipe and
source model now, with ``planned_over_held`` = the plan's peak / the step's ``held_peak_bytes``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlab.artifacts import read_manifest  # noqa: E402
from quantlab.models.load import load_config  # noqa: E402
from quantlab.models.source import resolve_model  # noqa: E402
from quantlab.plan.shapes import model_shapes  # noqa: E402
from quantlab.plan.steps import plan_quantize, resolve_budget  # noqa: E402
from quantlab.provenance import provenance  # noqa: E402
from quantlab.recipe import Recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--max-memory", default=None, help="plan under this budget (as the step ran)")
    args = ap.parse_args()
    manifest = read_manifest(args.artifact)
    if not manifest:
        sys.exit(f"{args.artifact} has no quantlab.json — give an artifact directory quantlab wrote")
    recipe = Recipe.from_dict(manifest["recipe"])
    shapes = model_shapes(load_config(resolve_model(manifest["source"]["ref"]).path))
    plan = plan_quantize(recipe, shapes, manifest["device"]["device"], resolve_budget(args.max_memory)).to_dict()
    held = (manifest.get("cost", {}).get("held") or {}).get("held_peak_bytes")
    flag = f" --max-memory {args.max_memory}" if args.max_memory else ""
    print(json.dumps({"command": f".venv/bin/python scripts/artifact_cost.py {args.artifact}{flag}",
                      "git": provenance("cpu").get("git_sha"), "artifact": str(Path(args.artifact).resolve()),
                      **manifest, "planned": plan,
                      "planned_over_held": plan["peak_bytes"] / held if held else None}, indent=1))


if __name__ == "__main__":
    main()
