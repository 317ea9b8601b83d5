"""The report page: inline CSS and inline SVG only, no scripts, no external assets."""

from __future__ import annotations

from html import escape

from quantlab import metrics
from quantlab.evaluate.accuracy import primary_metric
from quantlab.plan import GB

MIB = 2**20

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#1b1b1b;margin:0;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:32px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#555;margin:0 0 14px}.note{color:#555;font-size:12.5px;margin:6px 0}
.verdict{border-left:6px solid #0072B2;background:#eef5fb;padding:12px 16px;margin:16px 0;font-size:15px}
.verdict.none{border-color:#D55E00;background:#fdf1ea}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:18px}
figure{margin:0;border:1px solid #e4e4e4;border-radius:6px;padding:8px;background:#fff}
figure svg{width:100%;height:auto;display:block}figure.wide{max-width:760px}
td.wrap{white-space:normal;text-align:left;max-width:320px}figcaption{font-size:12.5px;color:#444;margin-top:4px}
table{border-collapse:collapse;margin:8px 0 4px;font-size:13px;font-variant-numeric:tabular-nums}
th,td{padding:4px 9px;border-bottom:1px solid #e6e6e6;text-align:right;white-space:nowrap}
th{background:#f2f2f2;font-weight:600}td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fbfbfb}.yes{color:#0a5c9c;font-weight:600}.no{color:#b34700;font-weight:600}
.best td{background:#e3f0fa !important}code{font-size:12.5px;background:#f3f3f3;padding:1px 4px;border-radius:3px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:3px 14px;font-size:12.5px}dt{font-weight:600}dd{margin:0;word-break:break-all}
"""


def render(view: dict) -> str:
    data = view["data"]
    model = data.get("model") or {}
    title = f"quantlab report — {model.get('ref', '?')}"
    body = [
        f"<h1>{escape(title)}</h1>",
        f"<p class='sub'>run set <code>{escape(str(data.get('run_set', '')))}</code> · measured on "
        f"{escape(str(data.get('device', '')))} · {len(view['rows'])} recipes · source {escape(str(data.get('source', '')))}</p>",
    ]
    if model.get("note"):
        body.append(f"<p class='note'><b>Baseline:</b> {escape(model['note'])}</p>")
    body += [_verdict(view), _charts(view), _memory(view), _fit(view), _budget_fits(view), _metrics(view),
             _accuracy(view), _definitions(view), _provenance(view)]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body><main>\n"
            + "\n".join(b for b in body if b) + "\n</main></body></html>\n")


def _f(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _ci(value, ci, spec: str) -> str:
    if value is None:
        return "—"
    return format(value, spec) + (f" [{format(ci[0], spec)}, {format(ci[1], spec)}]" if ci else "")


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None, wrap_last: bool = False) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    last = len(header) - 1 if wrap_last else -1
    body = "".join(f"<tr class='{c}'>" + "".join(f"<td class='wrap'>{cell}</td>" if k == last else f"<td>{cell}</td>"
                                                 for k, cell in enumerate(r)) + "</tr>"
                   for r, c in zip(rows, classes or [""] * len(rows)))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _verdict(view: dict) -> str:
    v, s = view["verdict"], view["settings"]
    gpu = f"{s.gpu_mem / GB:g} GB GPU at context {s.context} × batch {s.batch}"
    if v["best"]:
        b = v["best"]
        text = (f"<b>{escape(b['recipe'])}</b> is the best recipe that fits a {gpu}: predicted "
                f"{b['fit']['total_bytes'] / GB:.2f} GB in all ({b['fit']['headroom_bytes'] / GB:.2f} GB headroom), "
                f"KLD {b['kld']:.4f} nats/token ≤ tolerance {s.max_kld:g}, top-1 agreement {_f(b['top1'], '.3f')}.")
        cls = "verdict"
    elif v["unknown_fit"]:
        text, cls = f"No verdict: {escape(view['plan_note'])}.", "verdict none"
    else:
        text = (f"No recipe both fits a {gpu} and keeps KLD ≤ {s.max_kld:g} nats/token "
                f"(within tolerance: {', '.join(v['within']) or 'none'}).")
        cls = "verdict none"
    rule = ("Rule: among recipes that pass the garbage guard, keep KLD mean ≤ the tolerance and whose predicted "
            "total (weights + KV cache + prefill activations + CUDA runtime) fits the GPU, the one with the least "
            "predicted memory. "
            f"Within tolerance: {', '.join(v['within']) or 'none'}; of those fitting: {', '.join(v['fitting']) or 'none'}.")
    return f"<div class='{cls}'>{text}</div><p class='note'>{escape(rule)}</p>"


def _charts(view: dict) -> str:
    if not view["charts"]:
        return ""
    figs = "".join(f"<figure>{c['svg']}<figcaption>{escape(c['title'])}: frontier points (black outline, bold) are "
                   "not beaten on both axes by any other recipe; hover a point for its values.</figcaption></figure>"
                   for c in view["charts"])
    return f"<h2>Quality against cost</h2><div class='grid'>{figs}</div>"


def _memory(view: dict) -> str:
    rows, classes = [], []
    for r in view["rows"]:
        diff = 100 * (r["predicted"] - r["weights"]) / r["weights"] if r["predicted"] and r["weights"] else None
        rows.append([escape(r["recipe"]), _f(r["predicted"] and r["predicted"] / MIB, ".2f"),
                     _f(r["weights"] and r["weights"] / MIB, ".2f"), _f(diff, "+.3f"),
                     _f(r["disk"] and r["disk"] / MIB, ".1f"), _f(r["peak"] and r["peak"] / MIB, ".0f")])
        classes.append("")
    chart = f"<figure class='wide'>{view['memory_chart']}</figure>" if view["memory_chart"] else ""
    return ("<h2>Memory: predicted beside measured</h2>" + chart
            + _table(["recipe", "predicted MiB", "measured MiB", "diff %", "disk MiB", "peak MiB"], rows, classes)
            + f"<p class='note'>Predicted: <code>quantlab plan</code> from the config alone ({escape(view['plan_note'])}), "
              f"for {view['device']}. Measured: every parameter and buffer as loaded, quantization statistics included. "
              "Peak: the bench process's peak RSS on CPU (load + latency runs, libraries included) or max reserved "
              "CUDA memory.</p>")


def _fit(view: dict) -> str:
    s, rows, classes = view["settings"], [], []
    best = view["verdict"]["best"]
    for r in view["rows"]:
        fit = r["fit"]
        if not fit:
            continue
        c = fit["components"]
        rows.append([escape(r["recipe"]), f"{fit['weights_bytes'] / GB:.2f}", f"{c['kv_cache'] / GB:.2f}",
                     f"{c['activations'] / GB:.2f}", f"{c['runtime'] / GB:.2f}", f"{fit['total_bytes'] / GB:.2f}",
                     "<span class='yes'>yes</span>" if fit["fits"] else "<span class='no'>NO</span>",
                     f"{fit['headroom_bytes'] / GB:.2f}", str(fit["max_context"])])
        classes.append("best" if best and best["recipe"] == r["recipe"] else "")
    if not rows:
        return ""
    advice = "".join(f"<p class='note'>{escape(a)}</p>" for a in view["plan_gpu"].get("advice", []))
    return (f"<h2>Fit on a {s.gpu_mem / GB:g} GB GPU at context {s.context}, batch {s.batch}</h2>"
            + _table(["recipe", "weights GB", "KV cache GB", "activations GB", "runtime GB", "total GB", "fits",
                      "headroom GB", "max context"], rows, classes)
            + "<p class='note'>Predicted for CUDA (unquantized parts in bf16) from the config; GB = 10^9 bytes. "
              "Run <code>quantlab plan MODEL --json</code> for every term's definition.</p>" + advice)


def _budget_fits(view: dict) -> str:
    """Each fit run's sensitivity table (heat map) and one table of its predictions beside its measurements."""
    fits = view["fits"]
    if not fits:
        return ""
    figs = "".join(f"<figure>{f['svg']}<figcaption>{escape(f['title'])} ({escape(str(f['granularity']))} units, "
                   f"{len(f['units'])} × {len(f['formats'])}): log10 of the KLD with only that unit in that format, "
                   f"on {escape(str(f['text'].get('name', 'the sensitivity text')))}; black outline: the format the "
                   "fit chose; white: fp (KLD 0). Hover a cell for its value.</figcaption></figure>"
                   for f in fits if f["svg"])
    mib = lambda b: "—" if b is None else f"{b / MIB:.2f}<br><small>{b:,} B</small>"  # noqa: E731
    rows = []
    for f in fits:
        ratio = f["measured_kld"] / f["predicted_kld"] if f["measured_kld"] is not None and f["predicted_kld"] else None
        rows.append([escape(f["recipe"]), mib(f["budget_bytes"]), mib(f["predicted_bytes"]), mib(f["measured_bytes"]),
                     _f(f["predicted_kld"], ".4f"), _ci(f["measured_kld"], f["measured_kld_ci"], ".4f"),
                     _f(ratio, ".2f"), escape(", ".join(f"{k} {v}" for k, v in f["units_per_format"].items()))])
    return ("<h2>Fit to a budget</h2>" + (f"<div class='grid'>{figs}</div>" if figs else "")
            + _table(["recipe", "budget MiB", "predicted MiB", "measured MiB", "predicted KLD", "measured KLD [95% CI]",
                      "measured ÷ predicted", "units per format"], rows, wrap_last=True)
            + "<p class='note'>Budget: the weights budget the allocation keeps. Predicted: the planner's exact weight "
              "bytes of the allocation, and the sum over the units of their chosen formats' KLDs in the sensitivity "
              "table (each measured with only that unit quantized, against fp, on the sensitivity text: the first "
              "windows of the calibration text). Measured: the weights as loaded, and KLD mean on the reference text "
              "(the fidelity table's). A fit sits on the Pareto plots above as any other recipe.</p>")


def _distribution(view: dict) -> str:
    """llama.cpp's --kl-divergence statistics, each with its chunk-bootstrap interval (a results.json written before
    they existed has none, and its rows are left out)."""
    shown = [m for m in metrics.metrics() if m.distribution]
    rows = []
    for r in view["rows"]:
        f = r["fidelity"]
        if "kld_median" not in f:
            continue
        ci = f.get("ci95") or {}
        cells = [escape(r["recipe"])]
        for m in shown:
            col, (lo, hi) = m.distribution, ci.get(m.name) or (None, None)
            cells.append(_f(_scaled(f.get(m.name), col), col.spec)
                         + (f"<br><small>[{format(col.scale * lo, col.spec)}, {format(col.scale * hi, col.spec)}]"
                            "</small>" if lo is not None else ""))
        rows.append(cells)
    if not rows:
        return ""
    return ("<h3>Distribution of the per-token differences (as llama.cpp's <code>--kl-divergence</code> reports them)</h3>"
            + _table(["recipe"] + [m.distribution.header for m in shown], rows)
            + "<p class='note'>KLD in nats per token. Δp = p_quant − p_fp of the reference (next) token, in percentage "
              "points; its percentiles show the tokens the quantized model got most wrong (low) and most right (high). "
              "Percentiles interpolate linearly between order statistics. Intervals: bootstrap over text windows; for "
              "p99.9 and max they show how much a few windows drive the value, not a coverage guarantee.</p>")


def _metrics(view: dict) -> str:
    fid, perf, shown = [], [], [m for m in metrics.metrics() if m.report]
    for r in view["rows"]:
        fid.append([escape(r["recipe"]), str(r["bits"]), escape(r["engine"]),
                    *(_metric_ci(m, r["fidelity"]) for m in shown),
                    "ok" if r["guard_ok"] else "<span class='no'>FAILED: " + escape("; ".join(r["guard_reasons"])) + "</span>"])
        dec = {b: f"{v:.1f} ± {i / 2:.1f}" if i is not None else f"{v:.1f}" for b, (v, i) in r["decode"].items() if v}
        perf.append([escape(r["recipe"]),
                     _f(r["prefill_ms"], ".1f") + (f" ± {r['prefill_iqr'] / 2:.1f}" if r["prefill_iqr"] else ""),
                     *(dec.get(b, "—") for b in ("1", "8")), _f(r["roofline"], ".0f"), _f(r["quantize_s"], ".1f"),
                     _f(r["quantize_cpu_s"], ".1f"), escape(r["latency_skipped"] or "")])
    base = next((r["ppl_baseline"] for r in view["rows"] if r["ppl_baseline"]), None)
    return ("<h2>Fidelity against the fp baseline</h2>"
            + _table(["recipe", "bits", "engine", *(m.report.header for m in shown), "guard"], fid, wrap_last=True)
            + f"<p class='note'>fp token-level perplexity {_f(base, '.2f')}. Intervals: bootstrap over text windows.</p>"
            + _distribution(view)
            + "<h2>Latency and cost</h2>"
            + _table(["recipe", "prefill ms", "decode tok/s b1", "decode tok/s b8", "% of HBM roofline b1",
                      "quantize wall s", "quantize CPU s", "latency note"], perf, wrap_last=True)
            + "<p class='note'>Medians of the timed repetitions ± half the interquartile range. % of HBM roofline "
              "(CUDA only): batch-1 decode's bytes read per step (the weights) × steps/s over the GPU's HBM "
              "bandwidth; — on CPU or on a GPU missing from the bandwidth table.</p>")


def _metric_ci(metric: metrics.Metric, fidelity: dict) -> str:
    """A metric as the report's fidelity table shows it (its ``report`` column): value [95% CI]."""
    col, ci = metric.report, (fidelity.get("ci95") or {}).get(metric.name)
    return _ci(_scaled(fidelity.get(metric.name), col), ci and [col.scale * x for x in ci], col.spec)


def _scaled(value, column: metrics.Column):
    return None if value is None else column.scale * value


def _accuracy(view: dict) -> str:
    tasks = view["tasks"]
    if not tasks:
        return ""
    rows = []
    for r in view["rows"]:
        cells = [escape(r["recipe"])]
        for t in tasks:
            info = (r["accuracy"].get("tasks") or {}).get(t)
            metric = info and primary_metric(info)
            if not metric:
                cells.append("—")
                continue
            err = info["stderr"].get(metric)
            cells.append(f"{info['metrics'][metric]:.4f}" + (f" ± {1.96 * err:.4f}" if err else ""))
        rows.append(cells)
    first = next(r["accuracy"] for r in view["rows"] if r["accuracy"].get("tasks"))
    header = ["recipe"] + [f"{t} {primary_metric(first['tasks'][t]) if t in first['tasks'] else ''}" for t in tasks]
    n = ", ".join(f"{t} {i['n']}/{i['n_total']}" for t, i in first["tasks"].items())
    return ("<h2>Suite accuracy (lm-eval)</h2>" + _table(header, rows)
            + f"<p class='note'>± = 1.96 × lm-eval's stderr (a 95 % interval); documents {escape(n)}.</p>"
            + _flips(view, tasks))


def _flips(view: dict, tasks: list[str]) -> str:
    """Each recipe's flips against fp per task: the share of documents whose correctness changed."""
    rows = []
    for r in view["rows"]:
        flips = r["accuracy"].get("flips") or {}
        if not flips:
            continue
        cells = [escape(r["recipe"])]
        for t in tasks:
            f = flips.get(t)
            cells.append("—" if not f or not f.get("documents") else
                         f"{f['flips']:.1%} [{f['ci95']['flips'][0]:.1%}, {f['ci95']['flips'][1]:.1%}]<br><small>"
                         f"{f['right_to_wrong']:.1%} right→wrong, {f['wrong_to_right']:.1%} wrong→right</small>")
        rows.append(cells)
    if not rows:
        return ""
    return ("<h3>Flips against fp</h3>" + _table(["recipe"] + tasks, rows)
            + "<p class='note'>The share of documents whose 0/1 score (acc_norm where lm-eval has it, else acc) "
              "differs from fp's, over the documents both scored, with 95 % Wilson intervals. Accuracy can stay level "
              "while answers change; flips show it (arXiv 2407.09141).</p>")


def _definitions(view: dict) -> str:
    defs = dict(view["data"].get("definitions") or {})
    defs.update({f"plan: {k}": v for k, v in (view["plan_gpu"].get("definitions") or {}).items()})
    if not defs:
        return ""
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in defs.items())
    return f"<h2>Definitions</h2><dl>{items}</dl>"


def _provenance(view: dict) -> str:
    data = view["data"]
    run = data["runs"][0]
    prov = run.get("provenance") or {}
    model = data.get("model") or {}
    items = {"model": model.get("ref"), "fingerprint": model.get("fingerprint"), "git sha": prov.get("git_sha"),
             "versions": prov.get("versions"), "device": prov.get("device"), "seeds": prov.get("seeds"),
             "data sha256": prov.get("data_sha256"), "text": data.get("text"),
             "fidelity settings": prov.get("fidelity_settings"), "latency settings": prov.get("latency_settings")}
    body = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in items.items() if v)
    return f"<h2>Provenance</h2><dl>{body}</dl>"
