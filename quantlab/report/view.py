"""The report's view: per-run rows, the planner's predictions, the charts and the verdict."""

from __future__ import annotations

from quantlab import metrics
from quantlab.device import CUDA, as_device, device_kind
from quantlab.errors import QuantlabError
from quantlab.evaluate.accuracy import primary_metric
from quantlab.plan import PlanSettings, plan_model
from quantlab.recipe import Recipe
from quantlab.report.fit import fit_views
from quantlab.report.plots import memory_bars_svg, method_style, pareto_svg

MIB = 2**20


def build(data: dict, settings) -> dict:
    runs = data["runs"]
    device = device_kind(data.get("device"))
    recipes = [_recipe(r) for r in runs]
    here, gpu, plan_note = _plans(data, recipes, device, settings)
    rows = [_row(r, here, gpu) for r in runs]
    styles = method_style([r["method"] for r in rows])
    return {
        "data": data, "settings": settings, "device": device, "rows": rows, "plan_gpu": gpu, "plan_note": plan_note,
        "verdict": verdict(rows, settings),
        "charts": _charts(rows, device, styles, data),
        "memory_chart": _memory_chart(rows),
        "tasks": _tasks(runs),
        "fits": fit_views(runs, rows),
    }


def _recipe(run: dict):
    return Recipe.from_dict({"name": run["recipe"], "method": run["method"], "params": run["params"]})


def _plans(data: dict, recipes: list, device: str, settings) -> tuple[dict, dict, str]:
    """Predicted memory on the device the runs were measured on, and on the chosen GPU, from the config."""
    path = (data.get("model") or {}).get("path")
    if not path:
        return {}, {}, "the model's directory is not recorded, so nothing is predicted"
    trust = bool(data["model"].get("trust_remote_code"))
    try:
        here = plan_model(path, PlanSettings(device=device, recipes=tuple(recipes)), trust)
        gpu = plan_model(path, PlanSettings(gpu_mem=settings.gpu_mem, context=settings.context, batch=settings.batch,
                                            device=CUDA, recipes=tuple(recipes)), trust)
    except QuantlabError as exc:
        return {}, {}, f"no prediction: {exc}"
    return ({r["recipe"]: r for r in here["recipes"]}, {**gpu, "by_recipe": {r["recipe"]: r for r in gpu["recipes"]}},
            f"config: {here['model']['config_source']}")


def _row(run: dict, here: dict, gpu: dict) -> dict:
    f, m, lat, cost = run.get("fidelity") or {}, run.get("memory") or {}, run.get("latency") or {}, run.get("cost") or {}
    detail = lat.get("detail") or {}
    pred = here.get(run["recipe"]) or {}
    fit = (gpu.get("by_recipe") or {}).get(run["recipe"]) or {}
    b1 = (lat.get("decode_tok_s") or {}).get("1")
    guard = run.get("guard") or f.get("guard") or {"ok": True, "reasons": []}
    return {
        "recipe": run["recipe"], "method": run["method"], "bits": run["bits"],
        "engine": run.get("engine", "transformers"),
        "kld": f.get("kld_mean"), "kld_ci": (f.get("ci95") or {}).get("kld_mean"),
        "top1": f.get("top1_agreement"), "top1_ci": (f.get("ci95") or {}).get("top1_agreement"),
        "ppl": f.get("ppl"), "ppl_ci": (f.get("ci95") or {}).get("ppl"), "ppl_baseline": f.get("ppl_baseline"),
        "fidelity": f,
        "weights": m.get("weights_bytes"), "disk": m.get("disk_bytes"), "peak": m.get("peak_bytes"),
        "predicted": pred.get("weights_bytes") if pred.get("applicable") else None,
        "predicted_parts": _parts(pred.get("components")) if pred.get("applicable") else None,
        "prefill_ms": lat.get("prefill_ms"), "prefill_iqr": (detail.get("prefill_ms") or {}).get("iqr"),
        "decode": {b: (v, ((detail.get("decode_tok_s") or {}).get(b) or {}).get("iqr"))
                   for b, v in (lat.get("decode_tok_s") or {}).items()},
        "ms_per_token": 1000 / b1 if b1 else None, "latency_skipped": lat.get("skipped"),
        "roofline": (lat.get("roofline_b1") or {}).get("percent_of_roofline"),
        "quantize_s": cost.get("quantize_wall_s"), "quantize_cpu_s": cost.get("quantize_cpu_s"),
        "training": cost.get("training"),
        "accuracy": run.get("accuracy") or {},
        "guard_ok": guard.get("ok", True), "guard_reasons": guard.get("reasons", []),
        "fit": fit if fit.get("applicable") else None,
    }


def _parts(c: dict | None) -> dict | None:
    if not c:
        return None
    return {"linear data": c["linear_data"], "scales": c["linear_scales"], "embed+head": c["embeddings"] + c["lm_head"],
            "norms etc": c["norms_biases_other"] + c["buffers"]}


def verdict(rows: list[dict], settings) -> dict:
    """The recipe with the least predicted GPU memory among those that fit the GPU, keep KLD within the
    tolerance and pass the garbage guard (ties: lower KLD)."""
    within = [r for r in rows if r["kld"] is not None and r["kld"] <= settings.max_kld and r["guard_ok"]]
    fitting = [r for r in within if r["fit"] and r["fit"]["fits"]]
    best = min(fitting, key=lambda r: (r["fit"]["total_bytes"], r["kld"]), default=None)
    return {"best": best, "within": [r["recipe"] for r in within], "fitting": [r["recipe"] for r in fitting],
            "unknown_fit": not any(r["fit"] for r in rows)}


def _mean_accuracy(acc: dict) -> float | None:
    values = []
    for info in (acc.get("tasks") or {}).values():
        metric = primary_metric(info)
        if metric and metric.startswith("acc"):
            values.append(info["metrics"][metric])
    return sum(values) / len(values) if values else None


def _charts(rows: list[dict], device: str, styles: dict, data: dict) -> list[dict]:
    where = "CPU, 1 thread" if as_device(device).is_cpu else "CUDA"
    mem = [r["weights"] / MIB if r["weights"] else None for r in rows]
    kld, top1 = _axis("kld_mean"), _axis("top1_agreement")
    specs = [
        ("kld", *kld, mem, "weight memory as loaded (MiB)", "KLD vs weight memory"),
        ("top1", *top1, mem, "weight memory as loaded (MiB)", "Top-1 agreement vs weight memory"),
        ("kld", *kld, [r["ms_per_token"] for r in rows], f"decode latency at batch 1 (ms/token, {where})",
         "KLD vs decode latency"),
        ("kld", *kld, [r["quantize_s"] for r in rows], "quantization cost (wall s, incl. training)",
         "KLD vs quantization cost"),
    ]
    accs = [_mean_accuracy(r["accuracy"]) for r in rows]
    if any(a is not None for a in accs):
        specs.insert(2, (None, "mean suite accuracy (↑ better)", True, mem,
                         "weight memory as loaded (MiB)", "Suite accuracy vs weight memory"))
    charts = []
    for key, ylabel, higher, xs, xlabel, title in specs:
        ys = accs if key is None else [r[key] for r in rows]
        points = [{"label": r["recipe"] + ("" if r["engine"] == "transformers" else f" [{r['engine']}]"),
                   "method": r["method"], "x": x, "y": y,
                   "tooltip": f"{r['recipe']}: {xlabel} = {_num(x)}; {ylabel.split(' (')[0].split(',')[0]} = {_num(y)}"}
                  for r, x, y in zip(rows, xs, ys)]
        if sum(1 for p in points if p["x"] is not None and p["y"] is not None) < 2:
            continue
        charts.append({"title": title, "svg": pareto_svg(points, xlabel, ylabel, title, higher, styles)})
    return charts


def _axis(name: str) -> tuple[str, bool]:
    """A metric's axis label with the way that is better, and whether higher is better (``quantlab.metrics``)."""
    metric = metrics.get_metric(name)
    higher = bool(metric.higher_is_better)
    return f"{metric.label or name} ({'↑' if higher else '↓'} better)", higher


def _memory_chart(rows: list[dict]) -> str | None:
    bars = [{"recipe": r["recipe"], "predicted": r["predicted_parts"], "measured": r["weights"]} for r in rows
            if r["weights"]]
    return memory_bars_svg(bars, MIB, "MiB") if bars else None


def _tasks(runs: list[dict]) -> list[str]:
    names = []
    for r in runs:
        for t in ((r.get("accuracy") or {}).get("tasks") or {}):
            if t not in names:
                names.append(t)
    return names


def _num(x) -> str:
    if x is None:
        return "—"
    return f"{x:.4g}"
