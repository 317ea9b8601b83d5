"""What GPTQ's quantize step holds in each phase, beside the planner's phases, on Qwen2.5-Coder-1.5B's shape.

    .venv/bin/python scripts/bench_gptq_save.py [--layers 2] [--recipe gptq-w4-g64] [--samples 32]

A random-weight model of the named model's config (its vocabulary, hidden and MLP sizes, untied head) with
``--layers`` decoder layers is written as fp32 safetensors with the named model's tokenizer, then quantized by
quantlab's GPTQ method in this process (GPTQModel with its disk offload, as the quantize step runs it) while a
thread samples RssAnon every 50 ms. The save phase starts when the output directory appears. Printed: the
held peak of the quantize phase and of the save phase (above RssAnon once the libraries are imported, after
``return_freed_memory`` as under a budget), what was still held when the save began, and the planner's
components of each phase. Needs ``quantlab models fetch qwen2.5-coder-1.5b`` (the config and tokenizer).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlab.measure.memory import anon_rss_bytes, return_freed_memory  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--recipe", default="gptq-w4-g64")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    args = ap.parse_args()
    print(f"$ .venv/bin/python scripts/bench_gptq_save.py {' '.join(sys.argv[1:])}", flush=True)

    import contextlib
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    from quantlab.methods import get_method
    from quantlab.methods.gptqmodel_runner import import_gptqmodel
    from quantlab.models.load import load_config
    from quantlab.models.source import resolve_model
    from quantlab.plan.shapes import model_shapes
    from quantlab.plan.steps import PHASES, quantize_sizes
    from quantlab.provenance import versions
    from quantlab.recipe import parse_recipe

    torch.set_num_threads(1)
    named = Path(resolve_model(args.model).path)
    config = load_config(named)
    config.num_hidden_layers = args.layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:args.layers]
    recipe = parse_recipe(args.recipe)
    recipe = dataclasses.replace(recipe, config=dataclasses.replace(recipe.config, samples=args.samples))
    with tempfile.TemporaryDirectory(prefix="bench-gptq-save-") as tmp:
        src, out = Path(tmp) / "model", Path(tmp) / "out"
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(src)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(named / name, src / name)
        return_freed_memory()
        import_gptqmodel()
        samples, done = [], threading.Event()

        def sample():
            while not done.is_set():
                samples.append((time.perf_counter(), anon_rss_bytes(), out.exists()))
                time.sleep(0.05)

        base = anon_rss_bytes()
        sampler = threading.Thread(target=sample, daemon=True)
        started = time.perf_counter()
        sampler.start()
        with contextlib.redirect_stdout(sys.stderr):  # GPTQModel's progress bars
            get_method("gptq").quantize(recipe.config, src, out, "cpu")
        done.set()
        sampler.join()
        wall = time.perf_counter() - started
        shapes = model_shapes(load_config(src))
    quantize = [a for _, a, saving in samples if not saving]
    saving = [a for _, a, s in samples if s]
    comp = get_method("gptq").quantize_peak(recipe.config, quantize_sizes(recipe, shapes, "cpu"), "cpu")
    phase = {p: sum(v for k, v in comp.items() if k.startswith(p + ": ")) for p in PHASES}
    v = versions()
    print(f"recipe {recipe.name} (samples {args.samples}); {args.model}'s shape with {args.layers} layers, random "
          f"weights, fp32, CPU, 1 thread; torch {v['torch']}, transformers {v['transformers']}, gptqmodel "
          f"{v['gptqmodel']}; {len(samples)} samples of RssAnon every 50 ms over {wall:.0f} s")
    print("held = RssAnon above its value once the libraries were imported; GB = 10^9 bytes")
    print(f"quantize phase (capture, layers): held peak {(max(quantize) - base) / 1e9:.3f} GB; planned "
          f"{max(phase['capture'], phase['layers']) / 1e9:.3f} GB (capture {phase['capture'] / 1e9:.3f}, "
          f"layers {phase['layers'] / 1e9:.3f})")
    print(f"save phase: held when it began {(saving[0] - base) / 1e9:.3f} GB, held peak {(max(saving) - base) / 1e9:.3f}"
          f" GB; planned {phase['save'] / 1e9:.3f} GB:")
    for k, val in comp.items():
        if k.startswith("save: "):
            print(f"  {k.removeprefix('save: ')}: {val / 1e9:.3f} GB")
    print(f"save phase held peak minus what was held when it began: {(max(saving) - saving[0]) / 1e9:.3f} GB "
          f"(planned/that {phase['save'] / (max(saving) - saving[0]):.3f})")


if __name__ == "__main__":
    main()
