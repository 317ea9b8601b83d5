"""Each run's weight bytes as loaded beside the planner's prediction, for one results.json.

    .venv/bin/python scripts/bytes_vs_planner.py --results reports/formats/smollm2-135m/results.json

Measured: ``memory.weights_bytes`` of the run's bench step (transformers: the parameters and buffers of the loaded
model, and hqq's scales and zeros held outside them; llama.cpp: ``llama_model_size``, the file's tensor bytes). Where
a memory budget skipped the bench, results.json carries the planner's number and no measurement: such rows say so.
Predicted: ``quantlab.plan.steps.layout_weights`` of this commit, from the model's config alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlab.methods import get_method  # noqa: E402
from quantlab.models.load import load_config  # noqa: E402
from quantlab.models.source import resolve_model  # noqa: E402
from quantlab.plan.shapes import model_shapes  # noqa: E402
from quantlab.plan.steps import layout_weights  # noqa: E402
from quantlab.recipe import Recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True)
    args = ap.parse_args()
    results = json.loads(Path(args.results).read_text())
    source = resolve_model(results["model"]["ref"])
    shapes = model_shapes(load_config(source.path))
    device = results["runs"][0]["provenance"]["device"].get("device", "cpu")
    print(f"$ .venv/bin/python scripts/bytes_vs_planner.py --results {args.results}")
    print(f"model {results['model']['ref']}; device {device}; bytes (B)")
    print(f"{'recipe':20s} {'engine':12s} {'predicted':>14s} {'as loaded':>14s}  verdict")
    for run in results["runs"]:
        recipe = Recipe.from_dict({"name": run["recipe"], "method": run["method"], "params": run["params"]})
        predicted = layout_weights(recipe, shapes, device)
        engine = get_method(recipe.method).layout(recipe.config).engines[0]
        measured = run["memory"]["weights_bytes"]
        if run["memory"].get("planned"):
            verdict = "not measured (the budget skipped the bench; results.json holds the planner's number)"
        else:
            verdict = "equal" if measured == predicted else f"differ by {measured - predicted:+,d}"
        print(f"{run['recipe']:20s} {engine:12s} {predicted:>14,d} {measured:>14,d}  {verdict}")


if __name__ == "__main__":
    main()
