"""Every CUDA path quantlab has, exercised once on one GPU with no hub: run by scripts/gpu_check.sh.

Each check is one JSON line in ``<out>/<date>-<gpu>.jsonl`` (written as it finishes, so a run cut short keeps what
it did): its name, ok, seconds, the numbers it measured, or the error / the reason it was skipped. Models are
random-weight models of real configs' shapes (SmolLM2-135M's and Llama-3.1-8B's), built there, since the GPU
machine reaches no hub; the reference text is random words. Checks:

  env            torch, CUDA, GPU, which optional libraries import
  fp-bf16        bench of each model in bf16: CUDA-event latency, max reserved, % of the HBM roofline
  planner        the planner's predicted total beside measured max reserved at two contexts (weights step)
  bnb-int8/nf4   bitsandbytes quantize on CUDA, then bench
  gptq           GPTQ quantize on CUDA (GPTQModel), then decode through the kernel GPTQModel picks
  fit            a fit's mixed GPTQ checkpoint (fp, gptq-w8, gptq-w4-g64 across blocks) built on CUDA, loaded as its
                 manifest says (GPTQModel.load, torch kernel), its bytes beside the planner's, then bench
  torchao-int4   torchao int4 weight-only on CUDA, then bench
  budget         quantize-and-compare under --max-memory below the bf16 model: the reference layer by layer on CUDA
  ray            a one-GPU sweep on the Ray executor (skipped when ray is not importable)

    python scripts/gpu_check.py --out reports/gpu [--deadline 470] [--device cpu --small]   # cpu: a dry run here
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
           "max_position_embeddings": 8192, "rope_theta": 100000.0}
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": True,
        "max_position_embeddings": 512}


class Checks:
    def __init__(self, path: Path, deadline: float):
        self.path, self.deadline, self.started = path, deadline, time.time()
        path.parent.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn, *args, need: float = 20.0):
        """Run one check, record it; skip it when fewer than ``need`` seconds are left."""
        left = self.deadline - (time.time() - self.started)
        if left < need:
            return self.write({"check": name, "ok": None, "skipped": f"{left:.0f} s left of the deadline"})
        t0 = time.time()
        try:
            result = fn(*args)
            record = {"check": name, "ok": True, **(result or {})}
        except Exception as exc:  # a check that fails is a finding, not the end of the run
            record = {"check": name, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                      "traceback": traceback.format_exc()[-2000:]}
        record["seconds"] = round(time.time() - t0, 2)
        return self.write(record)

    def write(self, record: dict) -> dict:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k != "traceback"}, default=str)[:600], flush=True)
        return record


def build_model(path: Path, fields: dict, device: str) -> Path:
    """A random-weight model of ``fields``' shape (bf16 on CUDA), saved with the tests' word-level tokenizer."""
    import torch
    from tiny import build_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "config.json").is_file():
        return path
    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    del model
    return path


def env_check(device: str) -> dict:
    import importlib.util

    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, memory_bytes=props.total_memory, sm=f"{props.major}.{props.minor}")
    for lib in ("transformers", "bitsandbytes", "gptqmodel", "optimum", "torchao", "ray", "accelerate"):
        spec = importlib.util.find_spec(lib)
        out[lib] = None if spec is None else __import__(lib).__dict__.get("__version__", "?")
    return out


def gptq_recipe(text: Path):
    """GPTQ w4 g64 calibrated on the random-word text (the data dir does not travel to the GPU machine)."""
    from quantlab.recipe import expand_recipes

    (recipe,) = expand_recipes([{"method": "gptq", "bits": 4, "group_size": 64, "calibration": str(text),
                                 "samples": 16, "tokens": 128}], "gpu_check")
    return recipe


def bench_check(model: Path, recipe, device: str, small: bool) -> dict:
    from quantlab.measure.latency import LatencySettings
    from quantlab.recipe import parse_recipe
    from quantlab.steps.bench import bench_artifact
    from quantlab.sweep.commands import quantize_model

    r = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    recipe = r.name
    art = quantize_model(str(model), r, device)
    settings = LatencySettings(prompt_tokens=128, decode_tokens=8 if small else 32, batch_sizes=(1, 8),
                               repetitions=2 if small else 3)
    res = bench_artifact(r, art["artifact"], 1, settings, device, False)
    mem, lat = res["memory"], res["latency"]
    return {"model": model.name, "recipe": recipe, "quantize_s": art["cost"].get("quantize_wall_s"),
            "weights_bytes": mem["weights_bytes"], "peak_bytes": mem["peak_bytes"], "peak_kind": mem.get("peak_kind"),
            "prefill_ms": (lat.get("prefill_ms") or {}).get("median"), "decode_tok_s": {
                b: v.get("median") for b, v in lat.get("decode_tok_s", {}).items()},
            "roofline_b1": lat.get("roofline_b1"), "decode_path": lat.get("decode_path"), "skipped": lat.get("skipped"),
            "kernel": _kernel(art["artifact"], r, device) if r.method in ("gptq", "fit") else None}


def fit_check(model: Path, text: Path, device: str, small: bool) -> dict:
    """A fit's CUDA path without its sensitivity pass (the GPU's minutes go to the build): an allocation cycling
    gptq-w4-g64, gptq-w8 and fp over the decoder blocks, built in one GPTQModel calibration with dynamic overrides,
    loaded as its manifest says and benched; its weights bytes beside the planner's prediction."""
    from quantlab.fit.units import model_units
    from quantlab.methods.fit import FitConfig
    from quantlab.models.load import load_config
    from quantlab.plan.shapes import model_shapes
    from quantlab.plan.steps import layout_weights
    from quantlab.recipe import Recipe

    shapes = model_shapes(load_config(model))
    cycle = ("gptq-w4-g64", "gptq-w8", "fp")
    allocation = tuple((u.name, cycle[i % len(cycle)]) for i, u in enumerate(model_units(shapes, "block")))
    recipe = Recipe("fit-gpu-check", "fit", FitConfig(weights_budget=10**12, formats=("fp", "gptq-w8", "gptq-w4-g64"),
                                                      units="block", calibration=str(text), samples=16, tokens=128,
                                                      allocation=allocation))
    row = bench_check(model, recipe, device, small)
    predicted = layout_weights(recipe, shapes, "cpu" if device == "cpu" else "cuda")
    return {**row, "predicted_weights_bytes": predicted, "bytes_equal": predicted == row["weights_bytes"]}


def _kernel(artifact: str, recipe, device: str) -> str | None:
    """The QuantLinear class GPTQModel's loader picked for this artifact (its fastest available kernel)."""
    from quantlab.layouts.loading import load_recipe_model

    model = load_recipe_model(artifact, recipe, device)
    names = {type(m).__name__ for m in model.modules() if hasattr(m, "qweight")}
    return ", ".join(sorted(names)) or None


def planner_check(model: Path, device: str, small: bool) -> dict:
    from quantlab.models.load import load_config
    from quantlab.plan import PlanSettings, plan_recipe
    from quantlab.plan.shapes import model_shapes
    from quantlab.recipe import parse_recipe
    from quantlab.sweep.commands import weigh_model

    contexts = (256, 1024) if small else (1024, 8192)
    shapes = model_shapes(load_config(model))
    measured = weigh_model(str(model), parse_recipe("fp"), device, contexts)
    rows = []
    for ctx in contexts:
        plan = plan_recipe(parse_recipe("fp"), shapes, PlanSettings(context=ctx, device="cuda" if device != "cpu" else "cpu"))
        got = measured["prefill"][str(ctx)]
        rows.append({"context": ctx, "predicted_total_bytes": plan["total_bytes"], "measured_peak_bytes": got["peak_total_bytes"],
                     "measured_kind": got["kind"], "ratio": plan["total_bytes"] / got["peak_total_bytes"]})
    return {"model": model.name, "weights_bytes": measured["weights_bytes"], "contexts": rows}


def budget_check(model: Path, text: Path, device: str) -> dict:
    from quantlab.evaluate.fidelity import FidelitySettings
    from quantlab.models.load import load_config
    from quantlab.plan.shapes import model_shapes
    from quantlab.plan.steps import IN_MEMORY, LAYER_BY_LAYER, reference_components, step_peak
    from quantlab.sweep.commands import quantize_and_compare
    from quantlab.sweep.driver import RunOptions
    from quantlab.sweep.spec import compare_spec

    # between the reference layer by layer and in memory: the fp model does not fit, its layers do
    shapes, settings, plan_device = model_shapes(load_config(model)), FidelitySettings(max_chunks=4, chunk_tokens=128), (
        "cpu" if device == "cpu" else "cuda")
    budget = sum(step_peak(reference_components(shapes, settings, plan_device, mode, 1)) for mode in (IN_MEMORY, LAYER_BY_LAYER)) // 2
    spec = compare_spec(str(model), "rtn-w8", text=str(text), chunks=4, chunk_tokens=128, device=device,
                        max_memory=f"{budget}B", repetitions=2, batch_sizes=[1], decode_tokens=8)
    res = quantize_and_compare(spec, RunOptions(out=str(Path("/tmp") / "quantlab-gpu-budget")))
    runs = {r["recipe"]: r for r in res["runs"]}
    return {"budget_bytes": budget, "refused": [r["recipe"] for r in res.get("refused", [])],
            "runs": {name: {"reference_mode": (r["fidelity"].get("step") or {}).get("reference_mode"),
                            "fidelity_held_bytes": ((r["fidelity"].get("step") or {}).get("memory") or {}).get("held_peak_bytes"),
                            "kld_mean": r["fidelity"]["kld_mean"]} for name, r in runs.items()}}


def ray_check(model: Path, text: Path, device: str) -> dict:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return {"skipped": "ray is not importable here (its wheel, ~79 MB, is over the device tool's 64 MiB transfer)"}
    import yaml

    from quantlab.sweep.commands import run_sweep
    from quantlab.sweep.driver import RunOptions

    sweep = Path("/tmp/quantlab-gpu-sweep.yaml")
    sweep.write_text(yaml.safe_dump({"models": [str(model)], "recipes": ["fp", "bnb-nf4"], "device": device,
                                     "evaluation": {"text": str(text), "chunks": 4, "chunk_tokens": 128},
                                     "measure": {"batch_sizes": [1], "repetitions": 2, "decode_tokens": 8}}))
    summary = run_sweep(str(sweep), RunOptions(executor="ray", max_parallel=1, out="/tmp/quantlab-gpu-ray"))
    return {"jobs": summary["jobs"], "computed": summary["computed"], "results": summary["results"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "reports" / "gpu"))
    ap.add_argument("--deadline", type=float, default=470.0, help="seconds for all checks (the script's budget)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes instead of SmolLM2's and Llama-3.1-8B's")
    args = ap.parse_args()
    from tiny import write_text

    from quantlab.plan.known import known_models

    env = env_check(args.device)
    name = (env.get("gpu") or args.device).replace(" ", "-")
    checks = Checks(Path(args.out) / f"{date.today():%Y-%m-%d}-{name}{'-dry-run' if args.small else ''}.jsonl",
                    args.deadline)
    checks.write({"check": "env", "ok": True, **env})
    work = Path("/tmp/quantlab-gpu-models")
    small = build_model(work / "smollm2-shape" if not args.small else work / "tiny", TINY if args.small else SMOLLM2,
                        args.device)
    text = write_text(work / "text.txt", words=20000)
    for recipe in ("fp", "bnb-int8", "bnb-nf4", "torchao-w4-g32", gptq_recipe(text)):
        label = recipe if isinstance(recipe, str) else recipe.name
        checks.run(f"{label}:{small.name}", bench_check, small, recipe, args.device, args.small, need=30)
    checks.run(f"fit:{small.name}", fit_check, small, text, args.device, args.small, need=60)
    checks.run(f"planner:{small.name}", planner_check, small, args.device, args.small)
    checks.run("budget", budget_check, small, text, args.device, need=40)
    checks.run("ray", ray_check, small, text, args.device, need=60)
    if not args.small:
        big = checks.run("build:llama-3.1-8b-shape", lambda: {"path": str(build_model(
            work / "llama-3.1-8b-shape", known_models()["meta-llama/Llama-3.1-8B"]["config"], args.device))}, need=120)
        if big.get("ok"):
            for recipe in ("bf16", "bnb-nf4"):
                checks.run(f"{recipe}:llama-3.1-8b-shape", bench_check, Path(big["path"]), recipe, args.device, False,
                           need=90)
            checks.run("planner:llama-3.1-8b-shape", planner_check, Path(big["path"]), args.device, False, need=60)
    print(f"wrote {checks.path}")


if __name__ == "__main__":
    main()
