"""`quantlab eval --tasks` vs lm-evaluation-harness called directly, side by side in one run.

Same model directory, the same task YAMLs (quantlab's offline overrides of lm-eval's built-in tasks), the same
batch size, limit, dtype (fp32) and one torch thread; both keep per-sample scores (lm-eval: --log_samples).
lm-eval's CLI also indexes its built-in tasks, as it does for any user. Each run is a fresh process (imports, model load and
evaluation all counted), the two alternate, and the table gives wall and CPU seconds per run, the median
ratio quantlab / lm-eval (goal <= 1.10) and whether both report the same accuracies.

    .venv/bin/python scripts/bench_eval.py [--model smollm2-135m] [--tasks arc_easy,piqa] [--limit 100]
        [--batch-size 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall s, CPU s of the child) for one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="arc_easy,piqa")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from quantlab.evaluate.harness import HarnessSettings, prepare_tasks
    from quantlab.models.source import resolve_model
    from quantlab.provenance import provenance

    source = resolve_model(args.model)
    settings = HarnessSettings(tasks=tuple(args.tasks.split(",")), limit=args.limit, batch_size=args.batch_size)
    prepared = prepare_tasks(settings)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "DISABLE_MULTIPROC": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(tmp) / "tasks"  # lm-eval's CLI takes one include path: the same YAMLs, gathered
        include.mkdir()
        for folder in prepared.include_paths:
            for yaml_file in Path(folder).glob("*.yaml"):
                shutil.copy(yaml_file, include / yaml_file.name)
        commands = {
            "quantlab eval": [str(BIN / "quantlab"), "eval", source.path, "--tasks", args.tasks, "--limit",
                              str(args.limit), "--batch-size", str(args.batch_size), "--threads", "1",
                              "--output", f"{tmp}/quantlab.json"],
            "lm-eval": [str(BIN / "lm-eval"), "run", "--model", "hf", "--model_args",
                        f"pretrained={source.path},dtype=float32", "--tasks", args.tasks, "--include_path",
                        str(include), "--limit", str(args.limit), "--batch_size", str(args.batch_size),
                        "--device", "cpu", "--log_samples", "--output_path",
                        f"{tmp}/lm_eval"],
        }
        runs = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                runs[name].append(timed(cmd, env))
        ours = json.loads(Path(f"{tmp}/quantlab.json").read_text())["runs"][0]["accuracy"]["tasks"]
        theirs = json.loads(next(Path(f"{tmp}/lm_eval").rglob("results_*.json")).read_text())["results"]

    prov = provenance("cpu")
    print("$ .venv/bin/python scripts/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(f"model {source.ref}: {source.note or source.fingerprint[:12]}; tasks {args.tasks}, first {args.limit} "
          f"documents each, batch {args.batch_size}, fp32, 1 torch thread; each run a fresh process (imports, "
          f"model load, evaluation)")
    print(f"versions {prov['versions']}; cpu {prov['device']['cpu']}; git {prov['git_sha']}")
    print(f"\n{'runner':14s} {'wall s (each run)':24s} {'CPU s (each run)':24s} {'median wall':>11s}")
    for name, values in runs.items():
        walls = " ".join(f"{w:.1f}" for w, _ in values)
        cpus = " ".join(f"{c:.1f}" for _, c in values)
        print(f"{name:14s} {walls:24s} {cpus:24s} {statistics.median(w for w, _ in values):11.1f}")
    ratio = statistics.median(w for w, _ in runs["quantlab eval"]) / statistics.median(w for w, _ in runs["lm-eval"])
    print(f"\nratio quantlab / lm-eval (median wall): {ratio:.3f} (goal <= 1.10)")
    for task, info in ours.items():
        same = all(abs(info["metrics"][m] - theirs[task][f"{m},none"]) < 1e-12 for m in info["metrics"])
        shown = ", ".join(f"{m} {v:.4f}" for m, v in info["metrics"].items())
        print(f"{task}: {shown} — {'identical to' if same else 'DIFFERENT from'} lm-eval's own run")


if __name__ == "__main__":
    main()
