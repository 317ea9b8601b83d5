"""Fit to a budget (issue 17), measured: budgets from below uniform 4-bit to above uniform 8-bit, side by side.

For each budget the fit is resolved (sensitivity table, exact allocation), built with GPTQModel's dynamic
overrides, loaded the way its manifest says (GPTQModel.load) in a fresh process and measured:

- bytes: predicted (the planner's, the allocation's) against measured (every tensor of the loaded model) and the
  budget; a budget below the smallest allocation is refused, and the refusal names the smallest;
- KLD against fp on the reference text (WikiText-2 test, the fidelity step's 16 windows), beside uniform
  gptq-w4-g64's and gptq-w8's; the goals: ≤ 0.5x gptq-w4-g64's at the budget halfway between the uniform
  recipes' bytes, ≤ 0.8x at gptq-w4-g64's bytes + 5 %;
- additivity: the predicted sum of the units' KLDs beside the KLD measured on the sensitivity windows themselves;
- cost: the sensitivity pass's wall time beside one GPTQ run's (gptq-w4-g64's quantize step).

The uniform bytes the budgets are placed by are the mixed layout's (the fit's dtype, as GPTQModel.load holds
every format), so a budget compares like with like; the fp model held in that dtype alone is measured too (part of
every fit's KLD). Each finished row is kept in ``--state`` and reused, so an
interrupted run resumes; artifacts, sensitivity columns and fp log-probs are cached under QUANTLAB_HOME. Each
format is taken in turn (its uniform row, then its sensitivity column, while its artifact is at hand), so a run
too long for one machine can go on on another: keep ``--state`` and ``--columns`` (the columns measured so far)
where the next machine finds them, and ``--report-only`` prints what is there, headed PARTIAL if rows are missing.

    .venv/bin/python scripts/bench_fit.py [--model smollm2-135m] [--units linear] [--formats ...]
        [--dtype float16] [--samples 64] [--threads 1] [--state FILE] [--columns DIR] [--report-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


def uniform_bytes(source, config, device: str) -> tuple[dict[str, int], int]:
    """Each format's uniform recipe's bytes in the fit layout: every linear in that format, an untied head fp (as a
    uniform gptq recipe leaves it), and the smallest allocation's bytes (every unit in its smallest format)."""
    from quantlab.fit.units import HEAD, fixed_bytes, model_units, parse_formats, unit_bytes
    from quantlab.layouts.gptq_mixed import FP
    from quantlab.sweep.plan import source_shapes

    shapes = source_shapes(source)
    units = model_units(shapes, config.units)
    fixed = fixed_bytes(units, shapes, device)
    sizes = {f.name: fixed + sum(unit_bytes(u, FP if u.name == HEAD else f.name, shapes, device) for u in units)
             for f in parse_formats(config.formats)}
    # the smallest allocation: every unit (the head too) in its smallest format
    least = fixed + sum(min(unit_bytes(u, f.name, shapes, device) for f in parse_formats(config.formats))
                        for u in units)
    return sizes, least


BUDGETS = ("below", "w4+2%", "w4+5%", "halfway", "w8", "w8+25%")


def budgets(b: dict[str, int], least: int, keys=BUDGETS) -> list[tuple[str, int]]:
    """The budgets named by ``keys``, in that order: (label, bytes)."""
    w4, w8 = b["gptq-w4-g64"], b["gptq-w8"]
    every = {"below": ("below every allocation", least - 1), "w4+2%": ("gptq-w4-g64 + 2 %", int(w4 * 1.02)),
             "w4+5%": ("gptq-w4-g64 + 5 %", int(w4 * 1.05)), "halfway": ("halfway w4-g64 .. w8", (w4 + w8) // 2),
             "w8": ("gptq-w8", w8), "w8+25%": ("gptq-w8 + 25 %", int(w8 * 1.25))}
    return [every[k] for k in keys]


def measure(model: str, recipe, threads: int, additivity: bool) -> dict:
    from quantlab.evaluate.fidelity import FidelitySettings
    from quantlab.provenance import provenance
    from quantlab.steps.bench import weigh_artifact
    from quantlab.steps.fit import WINDOW_TOKENS
    from quantlab.sweep.commands import evaluate_model, quantize_model

    art = quantize_model(model, recipe, "cpu", threads)
    built = art["recipe"]
    weights = weigh_artifact(built, art["artifact"], "cpu", (), threads, False)
    fid = evaluate_model(art["artifact"], model, threads=threads)["fidelity"]
    row = {"recipe": recipe.name, "artifact": art["artifact"], "measured_bytes": weights["weights_bytes"],
           "kld": fid["kld_mean"], "kld_ci95": fid["ci95"]["kld_mean"], "cost": art["cost"], "fit": art.get("fit"),
           "git_sha": provenance("cpu").get("git_sha")}
    if additivity:
        chunks = recipe.config.sensitivity_chunks
        on_windows = evaluate_model(art["artifact"], model, text=recipe.config.calibration, threads=threads,
                                    settings=FidelitySettings(chunk_tokens=WINDOW_TOKENS, max_chunks=chunks))
        row["kld_sensitivity_windows"] = on_windows["fidelity"]["kld_mean"]
    return row


def held_in(source, recipe, threads: int) -> dict:
    """The fp model loaded at another dtype (``recipe``: fp16 or bf16) against fp, on the same reference text."""
    from quantlab.device import torch_threads
    from quantlab.evaluate.fidelity import FidelitySettings
    from quantlab.steps.fidelity import Candidate, measure_fidelity
    from quantlab.sweep.plan import reference_text, resolved_data_dir

    text = reference_text(None, resolved_data_dir(None))(source, "cpu")
    with torch_threads(threads):
        fid = measure_fidelity(source, text, FidelitySettings(), "cpu", [Candidate(recipe, source.path)])["results"][0]
    return {"recipe": recipe.name, "kld": fid["kld_mean"], "kld_ci95": fid["ci95"]["kld_mean"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--units", default="linear")
    ap.add_argument("--formats", default=None, help="comma-separated (default: the fit's default formats)")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"), help="what the fit is held in")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=None, help="GPTQ calibration windows of every run (default: "
                    "the fit's, 64)")
    ap.add_argument("--state", default="/tmp/quantlab-bench-fit.json")
    ap.add_argument("--columns", default=None, help="a folder the sensitivity columns are kept in and read back "
                    "from, so a run spread over machines measures each column once")
    ap.add_argument("--budgets", default=",".join(BUDGETS), help="which budgets, in the order to compute them "
                    "(default %(default)s)")  # argparse formats help with %: the budgets' own % signs would break it
    ap.add_argument("--report-only", action="store_true", help="print what --state holds, computing nothing")
    args = ap.parse_args(argv)

    from quantlab.errors import UsageError
    from quantlab.fsutil import atomic_write_text
    from quantlab.methods.fit import DTYPES, FitConfig
    from quantlab.models.source import resolve_model
    from quantlab.provenance import provenance
    from quantlab.recipe import Recipe, parse_recipe
    from quantlab.steps.fit import solve
    from quantlab.sweep.plan import source_shapes

    state_path = Path(args.state)
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}

    def kept(key, compute):
        if key not in state:
            if args.report_only:
                return None
            state[key] = compute()
            atomic_write_text(state_path, json.dumps(state, indent=1, default=str))
        return state[key]

    source = resolve_model(args.model)
    base = FitConfig(weights_budget=1, units=args.units, dtype=args.dtype,
                     **({"formats": args.formats} if args.formats else {}),
                     **({"samples": args.samples} if args.samples else {}))
    sizes, least = uniform_bytes(source, base, "cpu")
    shapes = source_shapes(source)
    uniform = {}
    for fmt in base.formats:  # a format's uniform row and its column while its artifact is at hand
        if fmt in ("gptq-w4-g64", "gptq-w8"):
            recipe = Recipe(parse_recipe(fmt).name, "gptq", base.uniform(fmt))  # the artifact its column reads
            uniform[fmt] = kept(fmt, lambda r=recipe: measure(args.model, r, args.threads, False))
        if fmt != "fp" and not args.report_only:
            column(source, base, fmt, args.threads, args.columns)
    held = DTYPES[args.dtype]  # the fp recipe of that dtype: fp16 or bf16
    floor = kept(held, lambda: held_in(source, parse_recipe(held), args.threads))
    rows = []
    keys = [k.strip() for k in args.budgets.split(",")]
    unknown = sorted(set(keys) - set(BUDGETS))
    if unknown:
        ap.error(f"unknown budget {', '.join(unknown)}: choose from {','.join(BUDGETS)}")
    for label, budget in budgets(sizes, least, keys):
        config = dataclasses.replace(base, weights_budget=budget)
        recipe = Recipe(f"fit-{budget}B", "fit", config)
        try:
            solve(config, None, shapes, "cpu")  # a budget nothing meets is refused before any work (as a fit is)
            row = kept(f"{args.units}:{held}:{budget}", lambda r=recipe: measure(args.model, r, args.threads, True))
        except UsageError as exc:
            row = {"refused": str(exc)}
        rows.append((label, budget, row))
    print(report(args, source, sizes, uniform, rows, provenance("cpu"), floor))
    heads = head_runs(args, base, shapes)
    if heads:
        print(heads)
    builds = build_runs(base, shapes, rows)
    if builds:
        print(builds)
    return 0


def column(source, config, fmt: str, threads: int, keep: str | None) -> None:
    """Measure (or find) one format's sensitivity column; with ``keep``, read it from there first and copy it
    there once measured (a column is a cache entry keyed by content: its file name is its key)."""
    from quantlab.fsutil import atomic_write_text
    from quantlab.methods.calibration import resolve_calibration
    from quantlab.home import quantlab_home
    from quantlab.steps.fit import ensure_column

    text = resolve_calibration(config, Path(source.path))
    if keep:
        for kept in Path(keep).glob("*.json"):
            target = quantlab_home() / "sensitivity" / "columns" / kept.stem / "table.json"
            if not target.is_file():
                atomic_write_text(target, kept.read_text())
    col = ensure_column(source, config, fmt, text, "cpu", threads, None)
    if keep:
        path = Path(col["path"])
        atomic_write_text(Path(keep) / f"{path.parent.name}.json", path.read_text())


def head_runs(args, config, shapes) -> str:
    """Each kept column's head-only GPTQ run: the quantize step's planned peak (``quantlab plan``'s, for that
    allocation) beside what it held, and its wall time."""
    from quantlab.fit.units import HEAD, model_units
    from quantlab.methods.fit import head_only

    if not args.columns or not any(u.name == HEAD for u in model_units(shapes, config.units)):
        return ""
    lines = []
    for path in sorted(Path(args.columns).glob("*.json")):
        col = json.loads(path.read_text())
        if col.get("head_artifact_cost"):
            fmt = col["formats"][0]
            lines.append(planned_vs_held(f"head-only {fmt}", f"{fmt}-head-only", head_only(config, fmt, shapes),
                                         shapes, col["head_artifact_cost"]))
    return "\n".join(["# the head-only GPTQ runs (held: peak RSS above the step's RSS after its imports)", *lines])


def build_runs(config, shapes, rows) -> str:
    """Each fit row's build (one GPTQ calibration with its allocation): the quantize step's planned peak beside what
    it held, and its wall time."""
    lines = [planned_vs_held(label, row["recipe"], dataclasses.replace(
        config, weights_budget=budget, allocation=tuple(row["fit"]["unit_formats"].items())), shapes, row["cost"])
        for label, budget, row in rows if row and "refused" not in row]
    return "\n".join(["# the fit builds (held: peak RSS above the step's RSS after its imports)", *lines]) \
        if lines else ""


def planned_vs_held(label: str, name: str, config, shapes, cost: dict) -> str:
    """One fit quantize step's line: ``quantlab plan``'s peak for that resolved config beside what the step held."""
    from quantlab.plan.steps import plan_quantize, step_peak
    from quantlab.recipe import Recipe

    planned = step_peak(plan_quantize(Recipe(name, "fit", config), shapes, "cpu", None).components)
    held = cost["held"]["held_peak_bytes"]
    return (f"{label}: quantize planned {planned / 1e9:.2f} GB, held {held / 1e9:.2f} GB "
            f"(planned/held {planned / held:.2f}), {cost['quantize_wall_s']:.0f} s wall")


def uniform_samples(args) -> int:
    from quantlab.methods.fit import FitConfig

    return args.samples or FitConfig(weights_budget=1).samples


def report(args, source, sizes, uniform, rows, prov, floor) -> str:
    from quantlab.methods.fit import DTYPES

    held = DTYPES[args.dtype]
    missing = [k for k, v in uniform.items() if v is None] + ([held] if floor is None else []) \
        + [label for label, _, row in rows if row is None]
    uniform = {k: v for k, v in uniform.items() if v is not None}
    floor = floor or {"kld": float("nan"), "kld_ci95": [float("nan")] * 2}
    w4 = uniform["gptq-w4-g64"]["kld"] if "gptq-w4-g64" in uniform else float("nan")
    lines = [f"# bench_fit: {args.model} ({source.note or source.ref}), units {args.units}, held in {args.dtype}, "
             f"GPTQ calibration {uniform_samples(args)} windows, {args.threads} thread(s), "
             f"CPU; git {prov.get('git_sha')}, {time.strftime('%Y-%m-%d')}",
             "# the fp baseline is the model as quantlab resolves it (for smollm2-135m: the Q4_1 GGUF dequantized)",
             "# KLD: mean per-token KL(fp || quant), nats/token, reference text WikiText-2 test, 16 x 256 tokens, "
             "95 % chunk-bootstrap interval",
             f"# bytes: weights as loaded (every tensor, tied once); uniform bytes in the fit layout ({held} via "
             "GPTQModel.load, an untied head fp as uniform recipes leave it): "
             + ", ".join(f"{k} {v}" for k, v in sizes.items()),
             "# uniform recipes as quantlab builds them (transformers load, fp32 on CPU): "
             + ", ".join(f"{k} KLD {v['kld']:.4f} [{v['kld_ci95'][0]:.4f}, {v['kld_ci95'][1]:.4f}], "
                         f"{v['measured_bytes']} B" for k, v in uniform.items()),
             f"# the fit is held in {held} (GPTQModel's torch kernel); the fp model held in {held} alone has KLD "
             f"{floor['kld']:.4f} [{floor['kld_ci95'][0]:.4f}, {floor['kld_ci95'][1]:.4f}]: part of every fit's KLD",
             "",
             f"{'budget':<28} {'budget B':>11} {'predicted B':>11} {'measured B':>11} {'=':>2} {'KLD':>7} "
             f"{'95% CI':>17} {'x w4g64':>7} {'pred ΣKLD':>9} {'meas@sens':>9}  units per format"]
    for label, budget, row in rows:
        if row is None:
            lines.append(f"{label:<28} {budget:>11} not yet computed")
            continue
        if "refused" in row:
            lines.append(f"{label:<28} {budget:>11} refused: {row['refused']}")
            continue
        fit = row["fit"]
        ci = row["kld_ci95"]
        lines.append(f"{label:<28} {budget:>11} {fit['predicted_bytes']:>11} {row['measured_bytes']:>11} "
                     f"{'ok' if fit['predicted_bytes'] == row['measured_bytes'] <= budget else 'NO':>2} "
                     f"{row['kld']:>7.4f} [{ci[0]:.4f}, {ci[1]:.4f}] {row['kld'] / w4:>7.3f} "
                     f"{fit['predicted_kld']:>9.4f} {row['kld_sensitivity_windows']:>9.4f}  "
                     + ", ".join(f"{k} {v}" for k, v in fit["units_per_format"].items()))
    goals = {"gptq-w4-g64 + 5 %": 0.8, "halfway w4-g64 .. w8": 0.5}
    for label, _, row in rows:
        if label in goals and row and "refused" not in row:
            ratio = row["kld"] / w4
            lines.append(f"goal at {label}: KLD <= {goals[label]} x gptq-w4-g64's: {ratio:.4f} x, "
                         + ("met" if ratio <= goals[label] else "NOT met"))
    shas = sorted({str(r.get("git_sha")) for r in [*uniform.values(), *(r for _, _, r in rows)] if r and "refused" not in r})
    lines.append(f"rows computed at git {', '.join(shas)}")
    built = [r for _, _, r in rows if r and r.get("fit")]
    if built:
        cost = built[0]["fit"]["sensitivity_cost"]
        runs = ", ".join(f"{name} {wall:.0f} s" for name, wall in cost["gptq_runs_wall_s"].items())
        heads = cost.get("head_runs_wall_s")
        heads = ("; the head-only GPTQ runs the head's sensitivity reads, quantize step wall: "
                 + ", ".join(f"{name} {wall:.0f} s" for name, wall in heads.items())) if heads else ""
        columns = ", ".join(f"{name} {c['quantize_wall_s']:.0f} s" for name, c in cost["columns"].items())
        lines += ["", f"sensitivity pass: {cost['quantize_wall_s']:.0f} s wall ({cost['forwards_wall_s']:.0f} s of "
                      f"forwards; per format's column: {columns}), {cost['quantize_cpu_s']:.0f} s CPU, peak RSS "
                      f"{cost['quantize_peak_rss_bytes'] / 1e9:.2f} GB; "
                      f"one GPTQ run, quantize step wall: {runs} (the uniform artifacts it reads; each built once, "
                      "then shared with uniform recipes; a run built earlier at other threads or load shows "
                      f"that){heads}",
                  "pred ΣKLD: sum of the chosen formats' unit sensitivities (sensitivity windows: the first "
                  "8 x 256 tokens of the calibration text); meas@sens: the fitted model's KLD on those windows"]
    if missing:
        lines.insert(0, "# PARTIAL: not yet computed: " + ", ".join(missing))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
