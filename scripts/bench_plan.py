"""The planner's predictions beside measurement, side by side in one run.

For every recipe quantlab runs here, on SmolLM2 and on two tiny random-init models built in this script
(a tied Llama and an untied Qwen2 with q/k/v biases): predicted weight bytes (``quantlab plan``, config
only) against the bytes of every tensor of the artifact as loaded in a fresh process (goal: within 1 %).
Then the prefill term: predicted KV cache + activations against the peak memory a prefill adds above the
loaded model at two contexts (``--device cuda``: max reserved, goal within 5 % of the total; on CPU the
peak RSS, reported for information: glibc's allocator and oneDNN scratch are not PyTorch's caching
allocator). Last, the planner for Llama-3.1-8B against three reference values measured on an H200 in an
earlier run (issue 6), typed into this script as ``H200_REFERENCE``: this script measures none of them.

    .venv/bin/python scripts/bench_plan.py [--device cpu] [--contexts 512,2048] [--models smollm2-135m,tiny-llama,tiny-qwen2]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

RECIPES = ("fp,bnb-int8,bnb-nf4,bnb-nf4-dq,bnb-fp4,rtn-w8,rtn-w4-g32,rtn-w4-g64,rtn-w4-g64-gptqfmt,gptq-w8,"
           "gptq-w4-g32,gptq-w4-g64,torchao-w4-g32,torchao-a8w4-g32,qat-w4-g32,qat-a8w4-g32")
MIB = 2**20
# Reference values measured on an H200 in an earlier run (issue 6: Llama-3.1-8B shape, random weights,
# transformers 5.17, bitsandbytes 0.50.2). No committed file holds that run's output; they are typed in here and
# printed as such, never re-measured by this script.
H200_REFERENCE_SOURCE = ("reference values measured on an H200 in an earlier run (issue 6; Llama-3.1-8B shape, "
                         "random weights, transformers 5.17, bitsandbytes 0.50.2; typed into scripts/bench_plan.py, "
                         "no committed file holds that run)")
H200_REFERENCE = {
    "fp": ("bf16 allocated", 16.06e9),
    "bnb-nf4": ("nf4 get_memory_footprint", 5.59e9),
    "bnb-int8": ("int8 get_memory_footprint", 9.08e9),
}


def build_tiny(kind: str, root: Path) -> Path:
    """A 2-layer random-init model with SmolLM2's tokenizer (so calibration and QAT text tokenize)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from quantlab.models.source import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=4096)
    torch.manual_seed(0)
    if kind == "tiny-llama":
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=False, use_sliding_window=False))
    path = root / kind
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def recipe_for(name: str, model: str):
    """The named recipe; on the tiny models QAT trains 2 steps (same layout, seconds instead of minutes)."""
    from dataclasses import replace

    from quantlab.recipe import parse_recipe

    recipe = parse_recipe(name)
    if recipe.method == "qat" and model != "smollm2-135m":
        recipe = replace(recipe, config=replace(recipe.config, steps=2, heldout_windows=1, curve_points=1))
    return recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--models", default="smollm2-135m,tiny-llama,tiny-qwen2")
    ap.add_argument("--recipes", default=RECIPES)
    ap.add_argument("--prefill-recipes", default="fp,bnb-nf4")
    args = ap.parse_args()

    from quantlab.plan import PlanSettings, plan_model
    from quantlab.provenance import provenance
    from quantlab.sweep.commands import weigh_model

    contexts = tuple(int(c) for c in args.contexts.split(","))
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    prov = provenance(args.device)
    rows, prefill = [], []
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        for model in args.models.split(","):
            ref = model if model == "smollm2-135m" else str(build_tiny(model, Path(tmp)))
            recipes = [recipe_for(n, model) for n in args.recipes.split(",")]
            plans = {}
            for context in contexts:
                plan = plan_model(ref, PlanSettings(device=device, context=context, recipes=tuple(recipes)))
                plans[context] = {r["recipe"]: r for r in plan["recipes"]}
            for recipe in recipes:
                pred = plans[contexts[0]][recipe.name]
                if not pred["applicable"]:
                    rows.append({"model": model, "recipe": recipe.name, "skipped": pred["reason"]})
                    continue
                wants = recipe.name in args.prefill_recipes.split(",")
                got = weigh_model(ref, recipe, args.device, contexts if wants else ())
                rows.append({"model": model, "recipe": recipe.name, "pred": pred["weights_bytes"],
                             "meas": got["weights_bytes"], "footprint": got["footprint_hf_bytes"]})
                for context in contexts if wants else ():
                    p = plans[context][recipe.name]["components"]
                    prefill.append({"model": model, "recipe": recipe.name, "context": context,
                                    "pred": p["kv_cache"] + p["activations"], "kv": p["kv_cache"],
                                    "meas": got["prefill"][str(context)]["bytes"],
                                    "pred_total": pred["weights_bytes"] + p["kv_cache"] + p["activations"],
                                    "meas_total": got["prefill"][str(context)]["peak_total_bytes"],
                                    "kind": got["prefill"][str(context)]["kind"]})
        ref8b = plan_model("meta-llama/Llama-3.1-8B", PlanSettings(device="cuda", context=4096))
    report(args, rows, prefill, ref8b, prov, device)


def report(args, rows, prefill, ref8b, prov, device) -> None:
    print("$ .venv/bin/python scripts/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(f"device {args.device}; predicted = quantlab plan from the config alone; measured = bytes of every "
          "parameter and buffer as loaded in a fresh process (quantization statistics included, tied weights once)")
    print(f"\n{'model':13s} {'recipe':20s} {'predicted MiB':>14s} {'measured MiB':>13s} {'diff bytes':>11s} {'diff %':>8s}  within 1 %")
    worst = 0.0
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:13s} {r['recipe']:20s} not applicable: {r['skipped']}")
            continue
        diff = 100 * (r["pred"] - r["meas"]) / r["meas"]
        worst = max(worst, abs(diff))
        print(f"{r['model']:13s} {r['recipe']:20s} {r['pred'] / MIB:14.3f} {r['meas'] / MIB:13.3f} "
              f"{r['pred'] - r['meas']:+11d} {diff:+8.4f}  "
              f"{'yes' if abs(diff) <= 1 else 'NO'}")
    n = sum(1 for r in rows if "pred" in r)
    print(f"\nweights: {n} recipe x model pairs, largest |difference| {worst:.4f} % (goal ≤ 1 %): "
          f"{'met' if worst <= 1 else 'NOT met'}")
    if prefill:
        bound = "goal within 5 % of the total" if device == "cuda" else "information only on CPU"
        print(f"\nprefill at batch 1 ({prefill[0]['kind']}; {bound}):")
        print(f"{'model':13s} {'recipe':10s} {'context':>7s} {'predicted MiB':>14s} {'(KV MiB)':>9s} {'measured MiB':>13s} {'ratio':>6s}")
        for p in prefill:
            print(f"{p['model']:13s} {p['recipe']:10s} {p['context']:7d} {p['pred'] / MIB:14.1f} {p['kv'] / MIB:9.1f} "
                  f"{p['meas'] / MIB:13.1f} {p['meas'] / p['pred']:6.2f}")
        if device == "cuda":
            print("\npeak reserved in all (weights + prefill) vs predicted weights + KV + activations (goal within 5 %):")
            for p in prefill:
                diff = 100 * (p["pred_total"] - p["meas_total"]) / p["meas_total"]
                print(f"{p['model']:13s} {p['recipe']:10s} {p['context']:7d} predicted {p['pred_total'] / MIB:10.1f} MiB "
                      f"measured {p['meas_total'] / MIB:10.1f} MiB  {diff:+.2f} %  {'yes' if abs(diff) <= 5 else 'NO'}")
    print(f"\nLlama-3.1-8B (quantlab's table), predicted here vs {H200_REFERENCE_SOURCE}:")
    plans = {r["recipe"]: r for r in ref8b["recipes"]}
    for name, (what, ref) in H200_REFERENCE.items():
        c = plans[name]["components"]
        total = plans[name]["weights_bytes"]
        footprint = total - c["linear_scales"] - c["buffers"] if name != "fp" else total
        print(f"  {what:28s} reference {ref / 1e9:6.2f} GB, predicted {footprint / 1e9:6.2f} GB"
              + (f" (get_memory_footprint omits the quantization statistics; with them {total / 1e9:.2f} GB)"
                 if name != "fp" else ""))
    print(f"\nversions {prov['versions']}; device {prov['device']}; git {prov['git_sha']}")


if __name__ == "__main__":
    main()
