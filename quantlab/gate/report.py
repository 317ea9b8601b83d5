"""A gate verdict as Markdown (fit for a CI job summary) and JSON."""

from __future__ import annotations

from quantlab.fsutil import atomic_write_json, atomic_write_text

ICON = {"pass": "PASS", "regression": "REGRESSION", "error": "ERROR", "inconclusive": "INCONCLUSIVE"}


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def render_markdown(verdict: dict) -> str:
    lines = [f"## quantlab gate: {ICON[verdict['verdict']]}", "",
             f"Baseline `{verdict['baseline']}`, candidate `{verdict['candidate']}`; policy `{verdict['policy']}`, "
             f"alpha {verdict['alpha']:g} family-wise, inconclusive metrics {verdict.get('inconclusive', 'pass')}. "
             "Drop = degradation in the metric's units (positive = worse); null = the degradation tolerated; "
             "p = one-sided paired test of the null, Holm p = adjusted across the comparison's metrics (regression "
             "when < alpha); detectable = the true drop this many documents detect with 80 % power at alpha / metrics.",
             ""]
    for comp in verdict["comparisons"]:
        lines += [f"### {comp['candidate']} vs {comp['baseline']}: {ICON[comp['verdict']]}", "",
                  "| metric | baseline | candidate | drop [95% CI] | null: drop ≤ | p | Holm p | test | n | detectable "
                  "| verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in comp["metrics"]:
            if "drop" not in m:
                lines.append(f"| {m['metric']} | | | | | | | | | | {ICON[m['verdict']]}: {m['reason']} |")
                continue
            lo, hi = m["ci95"]
            lines.append(f"| {m['metric']} | {_num(m['baseline'])} | {_num(m['candidate'])} | {_num(m['drop'])} "
                         f"[{_num(lo)}, {_num(hi)}] | {_num(m['margin'])} | {m['p_value']:.2g} | {m['p_adjusted']:.2g} | "
                         f"{m['test']} | {m['n']} | "
                         f"{_num(m['detectable'])} | {ICON[m['verdict']]}: {m['reason']} |")
        lines.append("")
    return "\n".join(lines)


def publish_verdict(verdict: dict, summary: str | None, json_out: str | None) -> str:
    """Write the Markdown summary and JSON where asked (atomically); return the Markdown for stdout."""
    text = render_markdown(verdict)
    if summary:
        atomic_write_text(summary, text + "\n")
    if json_out:
        atomic_write_json(json_out, verdict)
    return text
