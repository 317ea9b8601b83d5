"""RTN vs GPTQ at the same bits and group size, side by side in one run, on one model.

For each pair (w4-g64, w4-g32, w8): KLD mean with its 95 % interval, top-1 agreement, token-level
perplexity and quantization cost, then GPTQ's KLD as a fraction of RTN's (goal for w4-g64: <= 0.5).
Artifacts and the baseline log-probs are cached under QUANTLAB_HOME, so a rerun only re-evaluates.

    .venv/bin/python scripts/bench_gptq.py [--model smollm2-135m] [--pairs w4-g64,w4-g32,w8]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path


def measure(model: str, name: str) -> dict:
    from quantlab.artifacts import read_manifest
    from quantlab.pipeline import evaluate_model, quantize_model
    from quantlab.recipe import parse_recipe

    art = quantize_model(model, parse_recipe(name), "cpu")
    fid = evaluate_model(art["artifact"], model)["fidelity"]
    manifest = read_manifest(art["artifact"]) or {}
    return {"name": name, "fid": fid, "cost": art["cost"], "notes": manifest.get("method_notes", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", default="w4-g64,w4-g32,w8")
    args = ap.parse_args()

    from quantlab.evaluate.text import resolve_text
    from quantlab.models import resolve_model
    from quantlab.provenance import provenance

    source = resolve_model(args.model)
    text = resolve_text(None)
    prov = provenance("cpu", data={text.name: text.sha256})
    with contextlib.redirect_stdout(sys.stderr):  # GPTQModel prints a banner on import
        rows = {pair: (measure(args.model, f"rtn-{pair}"), measure(args.model, f"gptq-{pair}"))
                for pair in args.pairs.split(",")}
    print("$ .venv/bin/python scripts/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(f"model {source.ref}: {source.note or source.fingerprint[:12]}")
    first = next(iter(rows.values()))[0]["fid"]
    print(f"evaluation text {text.name} (sha256 {text.sha256[:12]}), {first['tokens']} tokens in {first['chunks']} "
          f"windows; fp token-level ppl {first['ppl_baseline']:.2f}; KLD = mean per-token KL(fp || quant), nats; "
          f"[95 % chunk-bootstrap interval]")
    calib = next(iter(rows.values()))[1]["notes"].get("calibration", {})
    print(f"gptq calibration: {calib.get('source')} {calib.get('samples')} x {calib.get('tokens')} tokens, "
          f"seed {calib.get('seed')} (sha256 {str(calib.get('sha256'))[:12]}); GPTQModel {prov['versions']['gptqmodel']}")
    print(f"versions {prov['versions']}; cpu {prov['device']['cpu']}; git {prov['git_sha']}")
    print(f"{'recipe':14s} {'KLD mean [95% CI]':28s} {'top-1':>6s} {'ppl':>7s} {'quantize s':>10s} {'peak RSS GB':>11s}")
    for pair, runs in rows.items():
        for r in runs:
            f, c = r["fid"], r["cost"]
            lo, hi = f["ci95"]["kld_mean"]
            print(f"{r['name']:14s} {f['kld_mean']:.4f} [{lo:.4f}, {hi:.4f}]       {f['top1_agreement']:6.3f} "
                  f"{f['ppl']:7.2f} {c['quantize_wall_s']:10.1f} {c['quantize_peak_rss_bytes'] / 1e9:11.2f}")
        ratio = runs[1]["fid"]["kld_mean"] / runs[0]["fid"]["kld_mean"]
        print(f"  gptq/rtn KLD at {pair}: {ratio:.3f}" + ("  (goal <= 0.5)" if pair == "w4-g64" else ""))


if __name__ == "__main__":
    main()
