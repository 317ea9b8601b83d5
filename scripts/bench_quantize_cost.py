"""Quantize cost of recipes side by side in one window: each recipe built afresh, in turn, for several rounds.

Each build is the quantize step quantlab runs (a fresh process, the job's threads), into a scratch QUANTLAB_HOME
whose models/ and gguf/ link to the real home's (the one-time conversions are shared, no artifact is), so nothing
is reused and the real caches are untouched. Printed per recipe: the median and range of the step's wall seconds
and CPU seconds (the step's own ``quantize_wall_s`` and ``quantize_cpu_s``), then each recipe's medians as a
fraction of the last recipe's, with the goal of ``--goal`` (a ratio) checked on wall time.

    .venv/bin/python scripts/bench_quantize_cost.py --model smollm2-135m --recipes hqq-w4-g64,gptq-w4-g64 \\
        --rounds 3 --goal 0.05 [--max-memory 3.5GB]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BUILD = """
import json, sys
from quantlab.recipe import parse_recipe
from quantlab.sweep.commands import quantize_model
art = quantize_model(sys.argv[1], parse_recipe(sys.argv[2]), "cpu", threads=int(sys.argv[3]),
                     max_memory=sys.argv[4] or None)
print("COST " + json.dumps({k: art["cost"].get(k) for k in ("quantize_wall_s", "quantize_cpu_s")}))
"""


def build(model: str, recipe: str, threads: int, home: Path, max_memory: str | None) -> dict:
    import json

    env = {**os.environ, "QUANTLAB_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", BUILD, model, recipe, str(threads), max_memory or ""], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("COST "))[5:])


def main() -> None:
    from quantlab.home import quantlab_home
    from quantlab.provenance import git_sha, provenance

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default="hqq-w4-g64,gptq-w4-g64", help="the last is the reference")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--goal", type=float, default=None, help="most wall-time fraction of the reference allowed")
    ap.add_argument("--max-memory", default=None, help="the memory budget each build plans under (e.g. 3.5GB)")
    args = ap.parse_args()
    recipes = args.recipes.split(",")
    real = quantlab_home()
    costs: dict[str, list[dict]] = {r: [] for r in recipes}
    with tempfile.TemporaryDirectory(prefix="quantlab-cost-") as scratch:
        for i in range(args.rounds):
            order = recipes if i % 2 == 0 else recipes[::-1]  # alternate, so drift hits every recipe alike
            for recipe in order:
                home = Path(scratch) / f"home-{i}-{recipe}"
                home.mkdir()
                for shared in ("models", "gguf"):
                    if (real / shared).is_dir():
                        (home / shared).symlink_to(real / shared)
                costs[recipe].append(build(args.model, recipe, args.threads, home, args.max_memory))
                print(f"round {i + 1} {recipe}: {costs[recipe][-1]}", flush=True)
    prov = provenance("cpu")
    print(f"\nmodel {args.model}; threads {args.threads}; budget {args.max_memory or 'none'}; {args.rounds} rounds, "
          "recipes alternating; "
          f"git {git_sha()}; versions {prov.get('versions')}")
    print("wall = the quantize step's wall seconds (quantize_wall_s); cpu = its CPU seconds, all its threads "
          "(quantize_cpu_s); median [min, max]")
    med = {}
    for recipe, rows in costs.items():
        wall = [r["quantize_wall_s"] for r in rows]
        cpu = [r["quantize_cpu_s"] for r in rows]
        med[recipe] = (statistics.median(wall), statistics.median(cpu))
        print(f"  {recipe:16s} wall {med[recipe][0]:8.1f} s [{min(wall):.1f}, {max(wall):.1f}]   "
              f"cpu {med[recipe][1]:8.1f} s [{min(cpu):.1f}, {max(cpu):.1f}]")
    ref = recipes[-1]
    for recipe in recipes[:-1]:
        ratio = med[recipe][0] / med[ref][0]
        verdict = "" if args.goal is None else f"  goal <= {args.goal}: {'PASS' if ratio <= args.goal else 'FAIL'}"
        print(f"{recipe} / {ref}: wall {ratio:.3f}x, cpu {med[recipe][1] / med[ref][1]:.3f}x{verdict}")


if __name__ == "__main__":
    main()
