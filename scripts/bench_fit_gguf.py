"""A fit in GGUF formats against llama.cpp's own mixes, at their bytes, measured in llama.cpp (issue 34).

Rows, each measured the way the fidelity step measures every recipe (the file in llama.cpp against fp in torch on
the reference text, WikiText-2 test, 16 windows of 256 tokens; KLD with its bootstrap 95 % interval):

- llama.cpp's mixes: gguf-q4_k_s, gguf-q4_k_m and gguf-q5_k_m, with and without an importance matrix;
- fits in GGUF formats with the importance matrix (``fit-<bytes>-gguf-imatrix``), at five weights budgets: the
  tensor bytes of each -imatrix mix's file, 5 % under Q4_K_M's and halfway between Q4_K_M's and Q5_K_M's. For each:
  the file's tensor bytes (``llama_model_size``) against the prediction and the budget. The goals: at
  Q4_K_M-imatrix's bytes the fit's KLD ≤ 0.8x Q4_K_M-imatrix's, at Q5_K_M's bytes ≤ 0.8x Q5_K_M-imatrix's;
- the KV cache (``--context``, ``--batch``): one GPU plan whose memory is llama.cpp's compute buffer plus
  Q4_K_M-imatrix's bytes plus the F16 cache's, so the F16 cache takes a quarter or more of it; fitted once with the
  cache fixed at F16 and once with its types in the choice, each file then measured in llama.cpp at that context
  with its cache against the F16 GGUF with an F16 cache (``engines.kv.context_kld``: ``--kv-windows`` windows of the
  reference text, the second half of each scored, as llama-perplexity --kl-divergence scores); the fit's own measure
  of each cache pair (its ``kv_windows``) takes as many windows of its calibration text.

Last, one byte below the smallest allocation, as a weights budget and as a GPU plan, each refused before any work
with the smallest that can be met (and that smallest met).

Each finished row is kept in ``--state`` and reused, so an interrupted run resumes (artifacts, sensitivity columns
and fp log-probs are cached under QUANTLAB_HOME too); ``--report-only`` prints what is there, headed PARTIAL when
rows are missing.

    .venv/bin/python scripts/bench_fit_gguf.py [--model smollm2-135m] [--units linear] [--formats ...]
        [--context 8192] [--batch 1] [--kv-windows 1] [--threads 1] [--state FILE] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REFS = ("gguf-q4_k_s", "gguf-q4_k_m", "gguf-q5_k_m")
FORMATS = "gguf-q3_k,gguf-q4_k,gguf-q5_k,gguf-q6_k,gguf-q8_0"
#: the budgets placed at a mix's bytes, and that mix; the issue's goals are at two of them
SAME_BYTES = {"Q4_K_S-imatrix's bytes": "gguf-q4_k_s-imatrix", "Q4_K_M-imatrix's bytes": "gguf-q4_k_m-imatrix",
              "Q5_K_M-imatrix's bytes": "gguf-q5_k_m-imatrix"}
GOALS = ("Q4_K_M-imatrix's bytes", "Q5_K_M-imatrix's bytes")


def measure(model: str, recipe, threads: int) -> dict:
    from quantlab.provenance import provenance
    from quantlab.steps.bench import weigh_artifact
    from quantlab.sweep.commands import evaluate_model, quantize_model

    art = quantize_model(model, recipe, "cpu", threads)
    built = art["recipe"]
    weights = weigh_artifact(built, art["artifact"], "cpu", (), threads, False)
    fid = evaluate_model(art["artifact"], model, threads=threads)["fidelity"]
    return {"recipe": recipe.name, "artifact": art["artifact"], "bytes": weights["weights_bytes"],
            "kld": fid["kld_mean"], "kld_ci95": fid["ci95"]["kld_mean"], "top1": fid.get("top1_agreement"),
            "cost": art["cost"], "fit": art.get("fit"), "git_sha": provenance("cpu").get("git_sha")}


def at_context(model: str, row: dict, reference: str, context: int, windows: int, threads: int) -> dict:
    """The fit's file with its cache against the F16 GGUF with an F16 cache, at ``context`` tokens."""
    from quantlab.engines.kv import context_kld
    from quantlab.evaluate.text import resolve_text
    from quantlab.models.load import load_tokenizer
    from quantlab.models.source import resolve_model
    from quantlab.sweep.plan import resolved_data_dir

    source = resolve_model(model)
    text = resolve_text("wikitext2_raw", resolved_data_dir(None))
    ids = load_tokenizer(source.path)(text.read(), add_special_tokens=False)["input_ids"]
    rows = [ids[i * context:(i + 1) * context] for i in range(windows)]
    k, v = (row["fit"].get("kv_cache") or "f16/f16").split("/")
    out = context_kld((Path(reference) / "model.gguf", "f16", "f16"), (Path(row["artifact"]) / "model.gguf", k, v),
                      rows, threads)
    return {"kld": out["kld_mean"], "top1": out["top1"], "positions": out["positions"], "text_sha256": text.sha256}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--units", default="linear")
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kv-windows", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--state", default="/tmp/quantlab-bench-fit-gguf.json")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from quantlab.engines.llamacpp import compute_bytes, kv_bytes
    from quantlab.methods.fit import FitConfig
    from quantlab.models.load import load_config
    from quantlab.models.source import resolve_model
    from quantlab.plan.shapes import model_shapes
    from quantlab.recipe import Recipe, parse_recipe

    torch.set_num_threads(args.threads)
    state_path = Path(args.state)
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}

    def kept(key, compute):
        if key not in state and not args.report_only:
            state[key] = compute()
            state_path.write_text(json.dumps(state, indent=1, default=str))
        return state.get(key)

    source = resolve_model(args.model)
    shapes = model_shapes(load_config(source.path))
    formats = tuple(f.strip() for f in args.formats.split(","))
    for name in REFS + tuple(f"{r}-imatrix" for r in REFS):
        kept(name, lambda name=name: measure(args.model, parse_recipe(name), args.threads))
    sizes = {r: state[f"{r}-imatrix"]["bytes"] for r in REFS if f"{r}-imatrix" in state}
    budgets = {}
    if len(sizes) == len(REFS):
        budgets = {"Q4_K_S-imatrix's bytes": sizes["gguf-q4_k_s"],
                   "Q4_K_M-imatrix's bytes - 5 %": sizes["gguf-q4_k_m"] * 95 // 100,
                   "Q4_K_M-imatrix's bytes": sizes["gguf-q4_k_m"],
                   "halfway to Q5_K_M's": (sizes["gguf-q4_k_m"] + sizes["gguf-q5_k_m"]) // 2,
                   "Q5_K_M-imatrix's bytes": sizes["gguf-q5_k_m"]}
    for label, budget in budgets.items():
        config = FitConfig(weights_budget=budget, formats=formats, units=args.units, imatrix=True)
        kept(f"fit {label}", lambda config=config: measure(args.model, Recipe(f"fit-{config.weights_budget}B-gguf-imatrix",
                                                                             "fit", config), args.threads))
    if "gguf-q4_k_m" in sizes:
        plan = (compute_bytes(shapes, args.context) + sizes["gguf-q4_k_m"]
                + kv_bytes(shapes, args.context, args.batch))
        reference = kept("gguf-f32", lambda: measure(args.model, parse_recipe("gguf-f32"), args.threads))
        for label, kv in (("cache fixed at F16", ("f16",)), ("cache types in the choice", ("f16", "q8_0", "q4_0"))):
            config = FitConfig(gpu_mem=plan, context=args.context, batch=args.batch, formats=formats, units=args.units,
                               imatrix=True, kv_formats=kv, kv_windows=args.kv_windows)
            name = f"fit-gpu{plan}B-c{args.context}-b{args.batch}-gguf-imatrix" + ("-kv" if len(kv) > 1 else "")
            row = kept(f"plan {label}", lambda config=config, name=name: measure(args.model, Recipe(name, "fit", config),
                                                                               args.threads))
            if row and reference:
                kept(f"plan {label} at context", lambda row=row: at_context(
                    args.model, row, reference["artifact"], args.context, args.kv_windows, args.threads))
    print(report(args, source, shapes, state, budgets) + "\n\n" + refusals(args, shapes, formats))
    return 0


def refusals(args, shapes, formats) -> str:
    """One byte below the smallest allocation, as a weights budget and as a GPU plan: each refused before any work
    (``quantlab.steps.fit.solve``, which every fit runs first), its message naming the smallest that can be met,
    which is then met. The smallest is the one a 1-byte budget's refusal names."""
    from quantlab.errors import UsageError
    from quantlab.methods.fit import FitConfig
    from quantlab.steps.fit import solve

    common = dict(formats=formats, units=args.units, imatrix=True)
    kinds = (("weights budget {:,} B", "weights_budget", common),
             (f"GPU plan {{:,}} B at context {args.context} x batch {args.batch}", "gpu_mem",
              dict(common, context=args.context, batch=args.batch, kv_formats=("f16", "q8_0", "q4_0"))))
    lines = ["budgets below every allocation (refused before any work):"]
    for label, field, settings in kinds:
        def outcome(size):
            try:
                solve(FitConfig(**{field: size}, **settings), None, shapes, "cpu")
                return "met"
            except UsageError as exc:
                return f"refused: {exc}"
        smallest = int(re.search(r"the smallest that can be met is (\d+) bytes", outcome(1)).group(1))
        lines += [f"  {label.format(size)}: {outcome(size)}" for size in (smallest - 1, smallest)]
    return "\n".join(lines)


def _versions() -> str:
    from quantlab.provenance import provenance

    v = provenance("cpu")["versions"]
    return ", ".join(f"{k} {v.get(k)}" for k in ("llama_cpp", "torch", "transformers", "gguf") if v.get(k))


def _unit_format(row: dict, unit: str) -> str:
    formats = row["fit"].get("unit_formats") or {}
    if isinstance(formats, str):  # a row kept by an older run of this script, its mapping as text
        import ast
        formats = ast.literal_eval(formats)
    return formats.get(unit, "?")


def report(args, source, shapes, state: dict, budgets: dict) -> str:
    from quantlab.engines.llamacpp import compute_bytes, kv_bytes

    refs = [n for r in REFS for n in (r, f"{r}-imatrix")]
    plan_keys = [f"plan {label}{at}" for label in ("cache fixed at F16", "cache types in the choice")
                 for at in ("", " at context")] if budgets else []
    missing = [n for n in refs + [f"fit {b}" for b in budgets] + plan_keys if n not in state]
    lines = [("PARTIAL — rows not yet measured: " + ", ".join(missing)) if missing or not budgets else "complete",
             f"$ .venv/bin/python scripts/bench_fit_gguf.py --model {args.model} --units {args.units} --formats "
             f"{args.formats} --context {args.context} --batch {args.batch} --kv-windows {args.kv_windows}",
             f"model {source.ref}: {source.note}",
             "rows measured at git " + ", ".join(sorted({str(r.get("git_sha")) for r in state.values()
                                                        if isinstance(r, dict) and r.get("git_sha")})) + "; " + _versions(),
             "KLD: mean per-token KL(fp || model) in nats/token on WikiText-2 test (16 windows of 256 tokens), the file in "
             "llama.cpp against fp in torch, [bootstrap 95 % CI]; bytes: the file's tensor bytes (llama_model_size)",
             "", "llama.cpp's mixes:"]
    for n in refs:
        if n in state:
            r = state[n]
            lines.append(f"  {n:24s} {r['bytes']:>13,} B  KLD {r['kld']:.4f} [{r['kld_ci95'][0]:.4f}, {r['kld_ci95'][1]:.4f}]")
    lines += ["", f"fits (formats {args.formats}, {args.units} units, importance matrix):"]
    for label, budget in budgets.items():
        r = state.get(f"fit {label}")
        if not r:
            continue
        ok = "within" if r["bytes"] <= budget else "OVER"
        line = (f"  {label:30s} budget {budget:>13,}  predicted {r['fit']['predicted_bytes']:>13,}  file "
                f"{r['bytes']:>13,} ({ok})  KLD {r['kld']:.4f} [{r['kld_ci95'][0]:.4f}, {r['kld_ci95'][1]:.4f}]")
        base = state.get(SAME_BYTES.get(label, ""))
        if base:
            ratio = r["kld"] / base["kld"]
            goal = f" ({'meets' if ratio <= 0.8 else 'MISSES'} the ≤ 0.8 goal)" if label in GOALS else ""
            line += f"  x {SAME_BYTES[label]}'s {ratio:.3f}{goal}"
        lines.append(line)
        lines.append("    units per format: " + ", ".join(f"{k} {v}" for k, v in r["fit"]["units_per_format"].items())
                     + f"; token embedding {_unit_format(r, 'model.embed_tokens')}; predicted KLD (the units' KLDs "
                     f"summed) {r['fit']['predicted_kld']:.4f}")
    plan_rows = [(k, state[k]) for k in ("plan cache fixed at F16", "plan cache types in the choice") if k in state]
    if plan_rows:
        cfg = plan_rows[0][1]["fit"]
        lines += ["", f"GPU plan at context {args.context} x batch {args.batch}: compute buffer "
                  f"{compute_bytes(shapes, args.context):,} B, F16 cache {kv_bytes(shapes, args.context, args.batch):,} B, "
                  f"budget for weights and cache {cfg['budget_bytes']:,} B"]
        for label, r in plan_rows:
            ctx = state.get(f"{label} at context") or {}
            lines.append(f"  {label:28s} cache {r['fit'].get('kv_cache', 'f16/f16'):10s} weights {r['bytes']:>13,} B  "
                         f"predicted weights+cache {r['fit']['predicted_bytes']:,}  KLD at 256 tokens {r['kld']:.4f}  "
                         f"at {args.context} tokens vs F16 GGUF: " + (f"{ctx['kld']:.4f} (top-1 {ctx['top1']:.3f}, "
                                                                     f"{ctx['positions']} positions)" if ctx else "n/a"))
        table = dict(plan_rows)["plan cache types in the choice"]["fit"].get("kv_table") if len(plan_rows) > 1 else None
        if table:
            pairs = sorted(table["kld"].items(), key=lambda kv: kv[1])
            lines.append(f"  the cache pairs the choice weighed (KLD against the F16 cache at {args.context} tokens of the "
                         "calibration text, on the uniform file of the most precise format; bytes at the plan): "
                         + ", ".join(f"{pair} {kld:.4f} ({kv_bytes(shapes, args.context, args.batch, *pair.split('/')):,} B)"
                                     for pair, kld in pairs))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
