"""Plain-text tables for the terminal."""

from __future__ import annotations

from quantlab import metrics
from quantlab.evaluate.accuracy import primary_metric

MB = 1024 * 1024


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _rows_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _metric_cell(metric: metrics.Metric, fidelity: dict) -> str:
    """A metric as its ``table`` column shows it: scaled, formatted, with its interval when the column has one."""
    col, value = metric.table, fidelity.get(metric.name)
    ci = (fidelity.get("ci95") or {}).get(metric.name) if col.interval else None
    if value is None:
        return "—"
    return (format(col.scale * value, col.spec)
            + (f" [{format(col.scale * ci[0], col.spec)}, {format(col.scale * ci[1], col.spec)}]" if ci else ""))


def _metric_cells(fidelity: dict) -> list[str]:
    """The fidelity metrics' cells (``quantlab.metrics``), one per column; metrics sharing a column joined by '/'."""
    return ["/".join(_metric_cell(m, fidelity) for m in shown) for _, shown in metrics.table_columns()]


def render_table(results: dict) -> str:
    roofline = any(r["latency"].get("roofline_b1") for r in results["runs"])
    header = ["recipe", "bits", "engine", *(h for h, _ in metrics.table_columns()), "weights MiB", "disk MiB",
              "peak MiB", "prefill ms", "decode tok/s b1", "b8"]
    header += ["% roofline b1"] * roofline + ["quantize s"]
    rows = []
    for r in results["runs"]:
        f, m, lat, c = r["fidelity"], r["memory"], r["latency"], r["cost"]
        rows.append([
            r["recipe"], str(r["bits"]), r.get("engine", "transformers"), *_metric_cells(f),
            f"{m['weights_bytes'] / MB:.1f}" + ("*" if m.get("planned") else ""), f"{m['disk_bytes'] / MB:.1f}",
            _fmt(m["peak_bytes"] and m["peak_bytes"] / MB, ".0f"),
            _fmt(lat["prefill_ms"], ".1f"), _fmt(lat["decode_tok_s"].get("1"), ".1f"),
            _fmt(lat["decode_tok_s"].get("8"), ".1f"),
            *[_fmt((lat.get("roofline_b1") or {}).get("percent_of_roofline"), ".0f")] * roofline,
            _fmt(c.get("quantize_wall_s"), ".1f"),
        ])
    model = results["model"]
    notes = [f"model: {model['ref']} ({model['params'] / 1e6:.1f} M params, fingerprint {model['fingerprint'][:12]})"]
    if model.get("note"):
        notes.append(f"baseline: {model['note']}")
    base = results["runs"][0]["fidelity"]
    notes.append(f"text: {results['text']['name']} — {base['tokens']} tokens in {base['chunks']} windows; "
                 f"fp token-level ppl {base['ppl_baseline']:.2f}; device {results['device']}")
    notes.append("KLD nats/token; p99/max of per-token KLD; RMS Δp: root mean square of p_quant - p_fp of the next "
                 "token, percentage points; ln PPL ratio = ln(PPL_quant/PPL_fp); the full llama.cpp-style statistics "
                 "with intervals are in results.json and the report")
    if roofline:
        notes.append("% roofline b1: batch-1 decode's weight bytes per step x steps/s over the GPU's HBM bandwidth")
    for r in results["runs"]:
        notes.extend(_run_notes(r))
    if results.get("max_memory_bytes"):
        notes.append(f"memory budget (--max-memory): {results['max_memory_bytes'] / 1e9:.2f} GB per step")
    for r in results["runs"]:
        check = r["memory"].get("budget") or {}
        for step in check.get("over", []):
            notes.append(f"{r['recipe']}: OVER BUDGET — its {step} step held "
                         f"{check['held_bytes'][step] / 1e9:.2f} GB > {check['max_memory_bytes'] / 1e9:.2f} GB")
    for r in results.get("refused", []):
        notes.append(f"{r['recipe']}: refused before work — {r['reason']}")
    notes.append(f"results: {results.get('results_path', '')}")
    suite = render_accuracy(results["runs"])
    return _rows_table(header, rows) + ("\n\n" + suite if suite else "") + "\n\n" + "\n".join(notes)


def render_accuracy(runs: list[dict]) -> str:
    """Suite accuracy per recipe: each task's primary metric ± 1.96 x lm-eval's stderr (a 95 % interval)."""
    runs = [r for r in runs if r.get("accuracy")]
    if not runs:
        return ""
    tasks = runs[0]["accuracy"]["tasks"]
    header = ["recipe"] + [f"{t} {primary_metric(info)}" for t, info in tasks.items()]
    rows = []
    for r in runs:
        cells = [r["recipe"]]
        for t in tasks:
            info = r["accuracy"]["tasks"].get(t)
            metric = info and primary_metric(info)
            if not metric:
                cells.append("—")
                continue
            value, err = info["metrics"][metric], info["stderr"].get(metric)
            cells.append(f"{value:.4f}" + (f" ± {1.96 * err:.4f}" if err else ""))
        rows.append(cells)
    n = ", ".join(f"{t} {info['n']}/{info['n_total']}" for t, info in tasks.items())
    notes = [f"suite (lm-eval {runs[0]['accuracy']['lm_eval']['version']}, batch "
             f"{runs[0]['accuracy']['lm_eval']['batch_size']}): documents {n}; ± = 1.96 x lm-eval stderr"]
    notes += [f"{t}: {info['note']}" for t, info in tasks.items() if info.get("note")]
    notes += _flips_notes(runs)
    for r in runs:
        parts = [f"{t} {rec['metric']} {_fmt(rec['recovered'], '.0%')}"
                 + (f" [{rec['ci95'][0]:.0%}, {rec['ci95'][1]:.0%}]" if rec.get("ci95") else "")
                 for t, rec in (r["accuracy"].get("recovery") or {}).items()]
        if parts:
            twin = next(iter(r["accuracy"]["recovery"].values()))["twin"]
            notes.append(f"{r['recipe']}: recovers {', '.join(parts)} of the accuracy {twin} lost")
    return _rows_table(header, rows) + "\n" + "\n".join(notes)


def _flips_notes(runs: list[dict]) -> list[str]:
    """Per recipe, each task's flips against fp: the share of documents whose correctness changed."""
    notes = []
    for r in runs:
        flips = r["accuracy"].get("flips") or {}
        parts = [f"{t} {f['flips']:.1%} [{f['ci95']['flips'][0]:.1%}, {f['ci95']['flips'][1]:.1%}] "
                 f"({f['right_to_wrong']:.1%} right→wrong, {f['wrong_to_right']:.1%} wrong→right)"
                 for t, f in flips.items() if f.get("documents")]
        if parts:
            notes.append(f"{r['recipe']}: flips vs fp {'; '.join(parts)}")
    if notes:
        notes.insert(0, "flips: share of documents whose 0/1 score (acc_norm, else acc) differs from fp's; "
                        "95 % Wilson intervals")
    return notes


def render_runs(rows: list[dict]) -> str:
    header = ["id", "run set", "created", "model", "recipe", "KLD mean", "top-1", "weights MiB"]
    body = []
    for r in rows:
        f, m = r.get("fidelity") or {}, r.get("memory") or {}
        body.append([r["id"][:12], r["run_set"], r["created_at"], r["model_ref"], r["recipe"],
                     _fmt(f.get("kld_mean"), ".4f"), _fmt(f.get("top1_agreement"), ".3f"),
                     _fmt(m.get("weights_bytes") and m["weights_bytes"] / MB, ".1f")])
    return _rows_table(header, body) if body else "No runs stored yet — run quantlab quantize-and-compare"


def _off_base(unit_formats: dict[str, str], most: int = 12) -> list[str]:
    """One line per format but the most common: the units in it (the first ``most``; the manifest lists all)."""
    by_format: dict[str, list[str]] = {}
    for unit, fmt in unit_formats.items():
        by_format.setdefault(fmt, []).append(unit)
    if len(by_format) < 2:
        return []
    base = max(by_format, key=lambda f: len(by_format[f]))
    lines = []
    for fmt, units in by_format.items():
        if fmt != base:
            more = (f", … {len(units) - most} more (the artifact's quantlab.json lists every unit)"
                    if len(units) > most else "")
            lines.append(f"  {fmt}: {', '.join(units[:most])}{more}")
    return [f"units not in {base}:", *lines]


def render_fit(result: dict) -> str:
    """``quantlab fit``'s answer: the allocation, its predicted and measured bytes, predicted and measured KLD."""
    fit, fid = result["fit"], result["fidelity"]
    lo, hi = fid["ci95"]["kld_mean"]
    per = ", ".join(f"{f} {n}" for f, n in fit["units_per_format"].items())
    ok = "within" if result["measured_bytes"] <= fit["budget_bytes"] else "OVER"
    return "\n".join([
        f"{result['recipe']}: {len(fit['unit_formats'])} units — {per}", *_off_base(fit["unit_formats"]),
        f"bytes: budget {fit['budget_bytes']:,}, predicted {fit['predicted_bytes']:,}, measured {result['measured_bytes']:,} "
        f"({ok} the budget; weights as loaded, every tensor)",
        f"KLD: predicted {fit['predicted_kld']:.4g} (sum of the units' sensitivities on the calibration text), "
        f"measured {fid['kld_mean']:.4g} [{lo:.4g}, {hi:.4g}] nats/token on {result['text']['name']}",
        *([f"KV cache: {fit['kv_cache']} (keys/values), {fit['kv_bytes']:,} bytes at the plan's context, KLD "
           f"{fit['kv_table']['kld'][fit['kv_cache']]:.4g} against the F16 cache (with {fit['kv_table']['weights']}'s "
           "weights); in the bytes above"] if fit.get("kv_cache") and fit.get("kv_table") else []),
        f"load: {result['loader']}",
        *([f"vllm: {result['vllm']}"] if result.get("vllm") else []),
        f"artifact: {result['artifact']}",
    ])


def _run_notes(r: dict) -> list[str]:
    """The notes under the table about one run: guard failures, recoveries, what was not measured and why."""
    notes = []
    if r.get("guard") and not r["guard"]["ok"]:
        notes.append(f"{r['recipe']}: FAILED the garbage guard — {'; '.join(r['guard']['reasons'])}")
    rec = r["fidelity"].get("recovery")
    if rec:
        ci = rec["ci95"]
        parts = [f"{k.upper()} {_fmt(rec[k], '.0%')}" + (f" [{ci[k][0]:.0%}, {ci[k][1]:.0%}]" if ci.get(k) else "")
                 for k in ("kld", "ppl")]
        train = (r["cost"].get("training") or {})
        notes.append(f"{r['recipe']}: recovers {', '.join(parts)} of {rec['twin']}'s degradation; training "
                     f"{train.get('steps')} steps, {_fmt(train.get('train_cpu_s'), '.0f')} CPU-s, "
                     f"{train.get('tokens_seen')} tokens")
    if r["latency"].get("skipped"):
        notes.append(f"{r['recipe']}: latency not measured — {r['latency']['skipped']}")
    elif (r["latency"].get("detail") or {}).get("batches_skipped"):
        notes.append(f"{r['recipe']}: {r['latency']['detail']['batches_skipped']}")
    if r["memory"].get("accuracy_skipped"):
        notes.append(f"{r['recipe']}: accuracy not measured — {r['memory']['accuracy_skipped']}")
    if r["memory"].get("planned"):
        notes.append(f"{r['recipe']}: * weights are the planner's — bench {r['memory']['peak_kind'].removeprefix('not measured — ')}")
    return notes
