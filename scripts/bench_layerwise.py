"""The fp reference log-probs in memory and layer by layer, side by side in one run, each in a fresh process.

    .venv/bin/python scripts/bench_layerwise.py [--model qwen2.5-coder-1.5b] [--chunks 16] [--threads 1]
    .venv/bin/python scripts/bench_layerwise.py --artifact DIR --recipe gptq-w8   # a quantized artifact both ways

With ``--artifact`` the model run both ways is that artifact of ``--recipe`` (its layout decides how it loads
whole), and the planner's prediction is its fidelity step's (``fidelity_components``).

For each way: wall seconds, what the process held at its peak above its libraries (``held_peak_bytes``: peak
RssAnon sampled every 5 ms minus RssAnon after torch and transformers are imported) beside the planner's
prediction (``quantlab.plan.steps.plan_reference``), and peak RSS. Then the largest absolute difference of the
two log-prob files (goal ≤ 1e-4) and whether the greedy continuations agree, and the ratio of wall times
(goal ≤ 1.5). The checkpoint is read once first so both ways start from a warm page cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlab.evaluate import fidelity as fid  # noqa: E402
from quantlab.evaluate.fidelity import FidelitySettings  # noqa: E402
from quantlab.evaluate.text import resolve_text  # noqa: E402
from quantlab.measure.memory import measure_memory, return_freed_memory  # noqa: E402
from quantlab.models.load import load_config, load_tokenizer  # noqa: E402
from quantlab.models.source import resolve_model  # noqa: E402
from quantlab.plan.shapes import model_shapes  # noqa: E402
from quantlab.plan.steps import IN_MEMORY, LAYER_BY_LAYER, fidelity_components, reference_components, step_peak  # noqa: E402,E501
from quantlab.provenance import provenance  # noqa: E402
from quantlab.recipe import parse_recipe  # noqa: E402


def worker(model_ref: str, mode: str, chunks: int, threads: int, out: Path, artifact: str | None, recipe: str) -> None:
    import torch

    from quantlab.layerwise.model import LayerwiseModel
    from quantlab.layouts.loading import load_recipe_model
    from quantlab.steps.fidelity import write_generation

    return_freed_memory()
    torch.set_num_threads(threads)
    source = resolve_model(model_ref)
    settings = FidelitySettings(max_chunks=chunks)
    ids = fid.chunk_ids(load_tokenizer(source.path), resolve_text(None).read(), settings)
    with measure_memory(preload=("torch", "transformers", "transformers.modeling_utils")) as mem:
        t0 = time.perf_counter()
        path = artifact or source.path
        model = (LayerwiseModel(path) if mode == LAYER_BY_LAYER else load_recipe_model(path, parse_recipe(recipe), "cpu"))
        load_s = time.perf_counter() - t0
        fid.baseline_cache(model, ids, out, settings)
        write_generation(model, ids, out)
        wall = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "wall_s": wall, "load_s": load_s, **mem}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--artifact", help="a quantized artifact of MODEL to run both ways (default: the fp model)")
    ap.add_argument("--recipe", default="fp", help="the artifact's recipe (its layout): e.g. gptq-w8")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "OUT"))
    ap.add_argument("--plan-only", action="store_true", help="print the planner's two peaks and stop")
    args = ap.parse_args()
    if args.worker:
        return worker(args.model, args.worker[0].replace("-", " "), args.chunks, args.threads, Path(args.worker[1]),
                      args.artifact, args.recipe)
    if args.plan_only:
        return plan_only(args.model, args.chunks)
    source = resolve_model(args.model)
    path = args.artifact or source.path
    for f in Path(path).glob("*.safetensors"):  # warm the page cache for both ways alike
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    shapes = model_shapes(load_config(source.path))
    settings = FidelitySettings(max_chunks=args.chunks)
    which = f" --artifact {args.artifact} --recipe {args.recipe}" if args.artifact else ""
    print(f"$ .venv/bin/python scripts/bench_layerwise.py --model {args.model} --chunks {args.chunks} "
          f"--threads {args.threads}{which}")
    print(f"model {source.ref}: {source.note}; {shapes.params / 1e9:.3f} B params, {shapes.layers} layers")
    if args.artifact:
        print(f"run both ways: the {args.recipe} artifact {args.artifact}")
    print(f"reference text {resolve_text(None).name}, {args.chunks} windows x {settings.chunk_tokens} tokens, "
          f"batch {settings.batch_size} windows per forward, torch threads {args.threads}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in (IN_MEMORY, LAYER_BY_LAYER):
            out = Path(tmp) / mode.replace(" ", "-")
            extra = ["--artifact", args.artifact, "--recipe", args.recipe] if args.artifact else []
            proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--chunks", str(args.chunks),
                                   "--threads", str(args.threads), "--worker", mode.replace(" ", "-"), str(out), *extra],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{mode} worker failed:\n{proc.stderr[-3000:]}")
            rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            rows[mode]["predicted"] = step_peak(
                fidelity_components(parse_recipe(args.recipe), shapes, settings, "cpu", mode, settings.batch_size)
                if args.artifact else reference_components(shapes, settings, "cpu", mode, settings.batch_size))
        diff = _max_diff(Path(tmp) / "in-memory", Path(tmp) / "layer-by-layer")
        same_gen = all(json.loads((Path(tmp) / m / "generation.json").read_text())["tokens"] == json.loads(
            (Path(tmp) / "in-memory" / "generation.json").read_text())["tokens"] for m in ("layer-by-layer",))
    print(f"{'way':<16}{'wall s':>9}{'load s':>9}{'held peak GB':>14}{'planned GB':>12}{'planned/held':>14}{'peak RSS GB':>13}")
    for mode, r in rows.items():
        print(f"{mode:<16}{r['wall_s']:>9.1f}{r['load_s']:>9.1f}{r['held_peak_bytes'] / 1e9:>14.2f}"
              f"{r['predicted'] / 1e9:>12.2f}{r['predicted'] / r['held_peak_bytes']:>14.3f}{r['peak_rss_bytes'] / 1e9:>13.2f}")
    ratio = rows[LAYER_BY_LAYER]["wall_s"] / rows[IN_MEMORY]["wall_s"]
    print(f"max |log-prob difference| layer by layer vs in memory: {diff:.3g} (goal <= 1e-4)")
    print(f"greedy continuations identical: {same_gen}")
    print(f"wall time layer by layer / in memory: {ratio:.3f} (goal <= 1.5)")
    print(f"held peak layer by layer / in memory: {rows[LAYER_BY_LAYER]['held_peak_bytes'] / rows[IN_MEMORY]['held_peak_bytes']:.3f}")
    prov = provenance("cpu")
    print(f"versions {prov['versions']}; cpu {prov['device'].get('cpu', '')}; git {prov.get('git_sha')}")


def plan_only(model: str, chunks: int) -> None:
    shapes = model_shapes(load_config(resolve_model(model).path))
    settings = FidelitySettings(max_chunks=chunks)
    print(f"$ .venv/bin/python scripts/bench_layerwise.py --model {model} --chunks {chunks} --plan-only")
    for mode in (IN_MEMORY, LAYER_BY_LAYER):
        comp = reference_components(shapes, settings, "cpu", mode, settings.batch_size)
        print(f"planned {mode}: {step_peak(comp) / 1e9:.3f} GB = " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in comp.items()))
    print(f"git {provenance('cpu').get('git_sha')}")


def _max_diff(a: Path, b: Path) -> float:
    import numpy as np

    fa, _ = fid.load_baseline(a)
    fb, _ = fid.load_baseline(b)
    return max(float(np.abs(fa[i] - fb[i]).max()) for i in range(len(fa)))


if __name__ == "__main__":
    main()
