"""An AWQ artifact loaded whole on CPU: GPTQModel's repack on the first forward against quantlab's before it.

transformers loads an AWQ checkpoint into GPTQModel's ``TorchAtenAwqLinear``, which repacks each linear for torch's
int4 matmul on its first forward. quantlab's load runs that repack itself once the model is weighed
(``AwqGemmLayout.prepare``: one linear at a time, freed memory returned after each, the fp16 biases copied off the
checkpoint's mapping). Each way runs in a fresh process, with glibc returning freed memory as a budgeted step does,
over one forward of ``--tokens`` tokens; printed side by side: the peak RSS above the process's RSS once its
libraries are imported (anonymous and file-backed pages at that moment), what it holds after the forward, the
checkpoint pages still resident, and the logits' agreement. Beside them the planner's terms
(``AwqGemmLayout.load_terms``) and the tensors' bytes before and after the repack.

    .venv/bin/python scripts/bench_awq_load.py --model smollm2-135m [--artifact DIR] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WAYS = {"lazy": "transformers' load, the repack inside the first forward (GPTQModel's way)",
        "prepared": "quantlab's load: the repack before the first forward (AwqGemmLayout.prepare)"}


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def child(way: str, artifact: str, tokens: int) -> dict:
    """One way in this (fresh) process; returns its measurements and the logits' digest."""
    import torch

    from quantlab.measure.memory import return_freed_memory
    from quantlab.layouts.loading import load_recipe_model, prepare_model
    from quantlab.measure.memory import weight_bytes
    from quantlab.recipe import recipe_from_mapping

    torch.set_num_threads(1)
    import gptqmodel  # noqa: F401  (the libraries' baseline is outside what is measured)
    import transformers  # noqa: F401

    return_freed_memory()
    qc = json.loads((Path(artifact) / "config.json").read_text())["quantization_config"]
    recipe = recipe_from_mapping({"method": "awq", "bits": qc["bits"], "group_size": qc["group_size"]}, "bench")
    base = _status()
    peak = {"total": 0}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.01):
            s = _status()
            total = s["RssAnon"] + s["RssFile"] - base["RssAnon"] - base["RssFile"]
            if total > peak["total"]:
                peak.update(total=total, anon=s["RssAnon"] - base["RssAnon"], file=s["RssFile"] - base["RssFile"])

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    model = load_recipe_model(artifact, recipe, "cpu", prepare=False)
    weights = weight_bytes(model)["weights_bytes"]  # as loaded, what the bench step weighs
    if way == "prepared":
        prepare_model(model, recipe, "cpu")
    load_s = time.perf_counter() - t0
    at_load = dict(peak)
    peak["total"] = 0
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = model(ids).logits
    forward_s = time.perf_counter() - t0
    stop.set()
    thread.join()
    after = _status()
    digest = float(logits.double().abs().sum())
    return {"weights_bytes": weights, "load_peak": at_load, "forward_peak": peak, "held_after": after["RssAnon"] + after["RssFile"] - base["RssAnon"] - base["RssFile"],
            "file_after": after["RssFile"] - base["RssFile"], "load_s": load_s, "first_forward_s": forward_s,
            "logits_abs_sum": digest}


def _peak(run: dict) -> int:
    return max(run["load_peak"]["total"], run["forward_peak"]["total"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifact", help="an awq artifact of --model (default: build or reuse awq-w4-g64's)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.artifact, args.tokens)))
        return 0

    from quantlab.layouts.awq import AwqGemmLayout
    from quantlab.models.load import load_config
    from quantlab.models.source import resolve_model
    from quantlab.plan.shapes import model_shapes
    from quantlab.plan.steps import checkpoint_pages, gb, layout_weights, step_peak
    from quantlab.provenance import provenance
    from quantlab.recipe import parse_recipe

    artifact = args.artifact
    if artifact is None:
        from quantlab.sweep.commands import quantize_model
        artifact = quantize_model(args.model, parse_recipe("awq-w4-g64"), "cpu", 1)["artifact"]
    qc = json.loads((Path(artifact) / "config.json").read_text())["quantization_config"]
    layout = AwqGemmLayout(qc["bits"], qc["group_size"])
    shapes = model_shapes(load_config(resolve_model(args.model).path))
    recipe = parse_recipe(f"awq-w{qc['bits']}-g{qc['group_size']}")
    weights = layout_weights(recipe, shapes, "cpu")
    terms = checkpoint_pages(layout, shapes, "cpu")
    runs = {}
    for way in WAYS:
        out = subprocess.run([sys.executable, __file__, "--child", way, "--artifact", str(artifact), "--tokens",
                              str(args.tokens)], capture_output=True, text=True, check=True)
        runs[way] = json.loads(out.stdout.strip().splitlines()[-1])
    prov = provenance("cpu")
    given = f" --artifact {args.artifact}" if args.artifact else ""
    built = json.loads((Path(artifact) / "quantlab.json").read_text()).get("recipe", {})
    lines = [f"$ .venv/bin/python scripts/bench_awq_load.py --model {args.model} --tokens {args.tokens}{given}",
             f"artifact {artifact}: recipe {built.get('name')} {json.dumps(built.get('params', {}), sort_keys=True)}, file "
             f"{Path(artifact, 'model.safetensors').stat().st_size:,} B; git "
             f"{prov.get('git_sha')}, torch {prov.get('versions', {}).get('torch')}, gptqmodel "
             f"{prov.get('versions', {}).get('gptqmodel')}, transformers {prov.get('versions', {}).get('transformers')}",
             "held = RSS above the process's RSS once torch, transformers and gptqmodel are imported (GB = 10^9 B), one "
             f"thread, glibc returning freed memory (as a budgeted step); one forward of {args.tokens} tokens", ""]
    for way, text in WAYS.items():
        r = runs[way]
        lines.append(f"{way:9s} peak of the load {gb(r['load_peak']['total']):>8s} (checkpoint pages "
                     f"{gb(r['load_peak']['file'])}), of the first forward {gb(r['forward_peak']['total']):>8s} "
                     f"(checkpoint pages {gb(r['forward_peak']['file'])})  held after the forward {gb(r['held_after']):>9s} (checkpoint pages "
                     f"{gb(r['file_after'])})  load {r['load_s']:.1f} s, first forward {r['first_forward_s']:.1f} s "
                     f"— {text}")
    same = runs["lazy"]["logits_abs_sum"] == runs["prepared"]["logits_abs_sum"]
    lines += [f"logits: {'identical' if same else 'DIFFER'} (sum of |logits| {runs['prepared']['logits_abs_sum']:.6e})",
              f"peak prepared / lazy {_peak(runs['prepared']) / _peak(runs['lazy']):.3f}; held "
              f"after prepared / lazy {runs['prepared']['held_after'] / runs['lazy']['held_after']:.3f}", "",
              f"planner (quantlab.plan.steps, a whole load on CPU): weights as loaded {weights:,} B; measured as loaded "
              f"{runs['prepared']['weights_bytes']:,} B ({'equal' if weights == runs['prepared']['weights_bytes'] else 'DIFFER'})"]
    lines += [f"  {k} {gb(v)}" for k, v in terms.items()]
    planned = step_peak({"weights": weights, **terms})
    held = runs["prepared"]["load_peak"]["total"]
    lines.append(f"  the load's planned peak {gb(planned)}; measured (prepared) {gb(held)}: planned/held "
                 f"{planned / held:.3f}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
