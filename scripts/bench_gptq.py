"""RTN vs GPTQ at the same bits and group size, side by side in one run, on one model.

For each pair (w4-g64, w4-g32, w8): KLD mean with its 95 % interval, top-1 agreement, token-level
perplexity and quantization cost, then GPTQ's KLD as a fraction of symmetric RTN's (goal for w4-g64:
<= 0.5). ``--variants`` adds GPTQ settings that were tried (e.g. the clipping search off) as extra rows.
``--bench`` measures weight memory and CPU latency for the w4-g64 group, RTN in both storage formats
beside GPTQ, each in its own process. Artifacts and baseline log-probs are cached under QUANTLAB_HOME,
so a rerun only re-evaluates.

    .venv/bin/python scripts/bench_gptq.py [--model smollm2-135m] [--pairs w4-g64,w4-g32,w8]
        [--variants mse=0,damp_percent=0.01] [--bench]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path


def measure(model: str, recipe) -> dict:
    from quantlab.artifacts import read_manifest
    from quantlab.sweep.commands import evaluate_model, quantize_model

    art = quantize_model(model, recipe, "cpu")
    fid = evaluate_model(art["artifact"], model)["fidelity"]
    manifest = read_manifest(art["artifact"]) or {}
    return {"name": recipe.name, "recipe": recipe, "artifact": art["artifact"], "fid": fid, "cost": art["cost"],
            "notes": manifest.get("method_notes", {})}


def variant(pair: str, spec: str):
    """``gptq-<pair>`` with one parameter changed, e.g. ``mse=0``."""
    from dataclasses import replace

    from quantlab.recipe import Recipe, parse_recipe

    base = parse_recipe(f"gptq-{pair}")
    key, value = spec.split("=")
    config = replace(base.config, **{key: type(getattr(base.config, key))(value)})
    return Recipe(name=f"gptq-{pair} {key}={value}", method="gptq", config=config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", default="w4-g64,w4-g32,w8")
    ap.add_argument("--variants", default="", help="comma-separated GPTQ parameter changes tried at w4-g64")
    ap.add_argument("--bench", action="store_true", help="also measure memory and latency at w4-g64")
    args = ap.parse_args()

    from quantlab.evaluate.text import resolve_text
    from quantlab.models.source import resolve_model
    from quantlab.provenance import provenance
    from quantlab.recipe import parse_recipe
    from quantlab.sweep.commands import bench_model

    source = resolve_model(args.model)
    text = resolve_text(None)
    prov = provenance("cpu", data={text.name: text.sha256})
    rows: dict[str, list[dict]] = {}
    with contextlib.redirect_stdout(sys.stderr):  # GPTQModel prints a banner on import
        for pair in args.pairs.split(","):
            names = [f"rtn-{pair}"] + ([f"rtn-{pair}-gptqfmt"] if pair == "w4-g64" else []) + [f"gptq-{pair}"]
            rows[pair] = [measure(args.model, parse_recipe(n)) for n in names]
            if pair == "w4-g64":
                rows[pair] += [measure(args.model, variant(pair, v)) for v in filter(None, args.variants.split(","))]
        benches = ({r["name"]: bench_model(r["artifact"], "cpu") for r in rows["w4-g64"][:3]}
                   if args.bench and "w4-g64" in rows else {})

    print("$ .venv/bin/python scripts/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(f"model {source.ref}: {source.note or source.fingerprint[:12]}")
    first = next(iter(rows.values()))[0]["fid"]
    print(f"evaluation text {text.name} (sha256 {text.sha256[:12]}), {first['tokens']} tokens in {first['chunks']} "
          f"windows; fp token-level ppl {first['ppl_baseline']:.2f}; KLD = mean per-token KL(fp || quant), nats; "
          f"[95 % chunk-bootstrap interval]")
    gptq = next(r for r in next(iter(rows.values())) if r["recipe"].method == "gptq")
    calib, cfg = gptq["notes"].get("calibration", {}), gptq["recipe"].config
    print(f"gptq: calibration {calib.get('source')} {calib.get('samples')} x {calib.get('tokens')} tokens, "
          f"seed {calib.get('seed')} (sha256 {str(calib.get('sha256'))[:12]}); damp_percent {cfg.damp_percent}, "
          f"mse {cfg.mse} (clipping search norm; 0 = off), act_group_aware on with groups; "
          f"GPTQModel {prov['versions']['gptqmodel']}")
    print("rtn = torchao layout; rtn-...-gptqfmt = the same RTN written by GPTQModel in the packed GPTQ format")
    print(f"versions {prov['versions']}; cpu {prov['device']['cpu']}; git {prov['git_sha']}")
    print("quantize s / peak RSS: wall time and peak resident memory of the quantize process; baseline = its RSS "
          "after importing the method's libraries, before loading the model; over/model = (peak - baseline) / "
          "bytes of the fp model's safetensors (goal <= 1.5)")
    print(f"{'recipe':28s} {'KLD mean [95% CI]':28s} {'top-1':>6s} {'ppl':>7s} {'quantize s':>10s} {'peak RSS GB':>11s} "
          f"{'baseline':>9s} {'over/model':>12s}")
    for pair, runs in rows.items():
        for r in runs:
            f, c = r["fid"], r["cost"]
            lo, hi = f["ci95"]["kld_mean"]
            over = c.get("quantize_peak_over_baseline_x_source")
            print(f"{r['name']:28s} {f['kld_mean']:.4f} [{lo:.4f}, {hi:.4f}]       {f['top1_agreement']:6.3f} "
                  f"{f['ppl']:7.2f} {c['quantize_wall_s']:10.1f} {c['quantize_peak_rss_bytes'] / 1e9:11.2f} "
                  f"{c['process_rss_before_bytes'] / 1e9:9.2f} {over:12.2f}")
        rtn = runs[0]["fid"]["kld_mean"]
        for r in runs:
            if r["recipe"].method == "gptq":
                print(f"  {r['name']} / {runs[0]['name']} KLD: {r['fid']['kld_mean'] / rtn:.3f}"
                      + ("  (goal <= 0.5)" if pair == "w4-g64" else ""))
    if benches:
        print("memory and latency, w4-g64, CPU, 1 thread, each model loaded in its own process; "
              "weights = bytes of parameters and buffers as loaded; decode = median tok/s [IQR] over reps")
        print(f"{'recipe':28s} {'weights MiB':>11s} {'disk MiB':>9s} {'prefill ms':>11s} {'decode b1 tok/s':>16s}")
        for name, b in benches.items():
            mem, lat = b["memory"], b["latency"]
            dec, pre = lat["decode_tok_s"].get("1"), lat["prefill_ms"]
            pre_s = f"{pre['median']:.1f}" if pre else "n/a"
            dec_s = f"{dec['median']:.1f} [{dec['iqr']:.1f}]" if dec else f"n/a: {lat['skipped']}"
            print(f"{name:28s} {mem['weights_bytes'] / 2**20:11.1f} {mem['disk_bytes'] / 2**20:9.1f} "
                  f"{pre_s:>11s} {dec_s:>16s}")


if __name__ == "__main__":
    main()
