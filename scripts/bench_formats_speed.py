"""Prefill and decode speed of recipes in their engines, side by side in one window, batch 1, one thread.

Each recipe's artifact (from the artifact cache, built if missing) is benched by the step a sweep runs (a fresh
process: ``quantlab.steps.bench``), recipes alternating over ``--rounds`` rounds so drift on a shared machine hits
them alike. transformers rows are timed by ``quantlab.measure.latency`` (prefill: one forward over the prompt;
decode: tokens/s of the KV-cache loop), llama.cpp rows as llama-bench defines them (``quantlab.engines.llamacpp``).
Printed per recipe: the median over rounds of each round's median, with the range, and each as a multiple of the
first recipe's (fp by default).

    .venv/bin/python scripts/bench_formats_speed.py --model smollm2-135m \\
        --recipes fp,gguf-f32,gptq-w4-g64,awq-w4-g64,hqq-w4-g64,fp8,gguf-q4_k_m,gguf-q8_0 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    from quantlab.measure.latency import LatencySettings
    from quantlab.methods import get_method
    from quantlab.provenance import git_sha, provenance
    from quantlab.recipe import parse_recipe
    from quantlab.steps.bench import bench_artifact
    from quantlab.sweep.commands import quantize_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default="fp,gguf-f32,gptq-w4-g64,hqq-w4-g64,fp8,gguf-q4_k_m,gguf-q8_0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repetitions", type=int, default=3)
    args = ap.parse_args()
    recipes = [parse_recipe(r) for r in args.recipes.split(",")]
    settings = LatencySettings(prompt_tokens=args.prompt, decode_tokens=args.decode, batch_sizes=(1,),
                               repetitions=args.repetitions)
    artifacts = {r.name: quantize_model(args.model, r, "cpu", threads=1)["artifact"] for r in recipes}
    rows: dict[str, list[tuple[float, float]]] = {r.name: [] for r in recipes}
    for i in range(args.rounds):
        for recipe in (recipes if i % 2 == 0 else recipes[::-1]):
            lat = bench_artifact(recipe, artifacts[recipe.name], 1, settings, "cpu", False)["latency"]
            prefill = args.prompt / (lat["prefill_ms"]["median"] / 1000)
            rows[recipe.name].append((prefill, lat["decode_tok_s"]["1"]["median"]))
            print(f"round {i + 1} {recipe.name}: prefill {prefill:.1f} tok/s, decode {rows[recipe.name][-1][1]:.1f} "
                  "tok/s", flush=True)
    prov = provenance("cpu")
    print(f"\nmodel {args.model}; one thread; prompt {args.prompt} tokens, {args.decode} decoded, batch 1; "
          f"{args.repetitions} repetitions per bench, {args.rounds} rounds alternating; git {git_sha()}")
    print(f"versions {prov['versions']}; cpu {prov['device'].get('cpu') or prov['device']}")
    print("prefill = prompt tokens / the prefill's median time; decode = tokens/s of one-at-a-time generation; "
          "each: median over rounds of the round's median [min, max]; x = multiple of the first row's")
    base = None
    print(f"{'recipe':20s} {'engine':12s} {'prefill tok/s':>26s} {'x':>6s} {'decode tok/s':>24s} {'x':>6s}")
    for recipe in recipes:
        pre = [p for p, _ in rows[recipe.name]]
        dec = [d for _, d in rows[recipe.name]]
        med = (statistics.median(pre), statistics.median(dec))
        base = base or med
        engine = get_method(recipe.method).layout(recipe.config).engines[0]
        print(f"{recipe.name:20s} {engine:12s} {med[0]:9.1f} [{min(pre):7.1f}, {max(pre):7.1f}] {med[0] / base[0]:6.2f} "
              f"{med[1]:8.1f} [{min(dec):6.1f}, {max(dec):6.1f}] {med[1] / base[1]:6.2f}")


if __name__ == "__main__":
    main()
