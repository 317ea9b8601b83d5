"""quantlab's path vs the same library calls made directly, side by side in one run.

Steps: load the fp model, quantize with bnb-nf4 (load + quantize + save), fidelity (baseline
log-probs, then KL / top-1 / NLL of the nf4 model) on the same text. Each step alternates
direct/quantlab, repeats, and reports the median time of each and their ratio (goal <= 1.10).

    .venv/bin/python scripts/bench_overhead.py [--model smollm2-135m] [--repeats 6] [--chunks 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def direct_load(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def quantlab_load(path):
    from quantlab.models.load import load_causal_lm

    return load_causal_lm(path)


def direct_nf4(path, out):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=qc).save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)


def quantlab_nf4(path, out):
    from quantlab.methods import get_method
    from quantlab.recipe import parse_recipe

    recipe = parse_recipe("bnb-nf4")
    get_method("bnb").quantize(recipe.config, Path(path), Path(out), "cpu")


def direct_fidelity(fp_model, q_model, ids):
    import torch

    with torch.inference_mode():
        lp = torch.log_softmax(fp_model(ids).logits[:, :-1].float(), -1)
        lq = torch.log_softmax(q_model(ids).logits[:, :-1].float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    agree = (lp.argmax(-1) == lq.argmax(-1)).float()
    nll = -lq.gather(-1, ids[:, 1:].unsqueeze(-1))
    return kl.mean().item(), agree.mean().item(), nll.mean().item()


def quantlab_fidelity(fp_model, q_model, ids, cache, settings):
    from quantlab.evaluate import fidelity as fid

    fid.baseline_cache(fp_model, ids, cache, settings)
    per_token = fid.compare(q_model, ids, fid.load_baseline(cache)[0])
    return fid.summarize(per_token, settings)


def direct_eval_from_disk(fp_path, q_path, ids):
    """What `quantlab eval` does, as direct calls in this process: load both models, forward, compare."""
    return direct_fidelity(direct_load(fp_path), direct_load(q_path), ids)


def quantlab_eval(artifact, model_ref, settings):
    from quantlab.sweep.commands import evaluate_model

    return evaluate_model(artifact, model_ref, settings=settings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from quantlab.evaluate import fidelity as fid
    from quantlab.evaluate.text import resolve_text
    from quantlab.models.load import load_tokenizer
    from quantlab.models.source import resolve_model
    from quantlab.provenance import provenance

    torch.set_num_threads(args.threads)
    source = resolve_model(args.model)
    text = resolve_text(None)
    settings = fid.FidelitySettings(max_chunks=args.chunks, batch_size=args.chunks, bootstrap=1000)
    ids = fid.chunk_ids(load_tokenizer(source.path), text.read(), settings)
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    direct_nf4(source.path, tmp / "nf4")  # warm-up: first loads pay for imports and page cache
    fp_model, q_model = quantlab_load(source.path), quantlab_load(tmp / "nf4")
    from quantlab.recipe import parse_recipe
    from quantlab.sweep.commands import quantize_model

    artifact = quantize_model(args.model, parse_recipe("bnb-nf4"), "cpu")["artifact"]
    quantlab_eval(artifact, args.model, settings)  # warm-up; fills the baseline cache, as a second run finds it

    steps = {
        "load fp": (lambda: direct_load(source.path), lambda: quantlab_load(source.path)),
        "quantize bnb-nf4 (load+quantize+save)": (lambda: direct_nf4(source.path, tmp / f"d{time.time_ns()}"),
                                                  lambda: quantlab_nf4(source.path, tmp / f"q{time.time_ns()}")),
        "fidelity (fp + nf4 forward, KL/top-1/NLL)": (
            lambda: direct_fidelity(fp_model, q_model, ids),
            lambda: quantlab_fidelity(fp_model, q_model, ids, tmp / f"c{time.time_ns()}", settings)),
        "eval from disk (load both, forward, compare)": (
            lambda: direct_eval_from_disk(source.path, tmp / "nf4", ids),
            lambda: quantlab_eval(artifact, args.model, settings)),
    }
    prov = provenance("cpu", data={text.name: text.sha256})
    print("$ .venv/bin/python scripts/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(f"model {source.ref} ({source.note or source.fingerprint[:12]}); text {text.name} "
          f"{ids.numel()} tokens; threads {args.threads}; repeats {args.repeats} (ABBA order, median)")
    print(f"versions {prov['versions']}; cpu {prov['device']['cpu']}; git {prov['git_sha']}")
    print(f"{'step':58s} {'direct s':>9s} {'quantlab s':>11s} {'ratio':>7s}")
    ratios = []
    for name, (direct, ours) in steps.items():
        d, q = [], []
        for i in range(args.repeats):  # ABBA order, so neither side always runs on a warmer cache
            if i % 2 == 0:
                d.append(timed(direct))
                q.append(timed(ours))
            else:
                q.append(timed(ours))
                d.append(timed(direct))
        ratio = statistics.median(q) / statistics.median(d)
        ratios.append(ratio)
        print(f"{name:58s} {statistics.median(d):9.2f} {statistics.median(q):11.2f} {ratio:7.3f}")
    worst = max(ratios)
    print(f"worst ratio {worst:.3f} (goal <= 1.10): {'PASS' if worst <= 1.10 else 'FAIL'}")
    print("notes: quantlab's fidelity also writes the baseline cache memmap and runs a 1000-resample bootstrap, "
          "which the direct loop does not. 'eval from disk' is `quantlab eval` (resolve and fingerprint the "
          "model, load the artifact, forward it, compare with the cached fp log-probs) against loading both models "
          "and running both forwards directly.")


if __name__ == "__main__":
    main()
