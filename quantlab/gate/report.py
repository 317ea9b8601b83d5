"""A gate verdict as Markdown (fit for a CI job summary) and JSON."""

from __future__ import annotations

import json

from quantlab.outputs import check_output_file, write_output_file

ICON = {"pass": "PASS", "regression": "REGRESSION", "inconclusive": "INCONCLUSIVE"}  # an error is no verdict: stderr


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
            lo, hi = m["ci95"]
            lines.append(f"| {m['metric']} | {_num(m['baseline'])} | {_num(m['candidate'])} | {_num(m['drop'])} "
                         f"[{_num(lo)}, {_num(hi)}] | {_num(m['margin'])} | {m['p_value']:.2g} | {m['p_adjusted']:.2g} | "
                         f"{m['test']} | {m['n']} | "
                         f"{_num(m['detectable'])} | {ICON[m['verdict']]}: {m['reason']} |")
        lines.append("")
    return "\n".join(lines)


def check_verdict_outputs(summary: str | None, json_out: str | None) -> None:
    """Before the gate runs: each path asked for is one quantlab may write (new, or written by it before)."""
    for path, option in ((summary, "--summary"), (json_out, "--json-out")):
        if path:
            check_output_file(path, option)


def publish_verdict(verdict: dict, summary: str | None, json_out: str | None) -> str:
    """Write the Markdown summary and JSON where asked (atomically); return the Markdown for stdout."""
    text = render_markdown(verdict)
    if summary:
        write_output_file(summary, (text + "\n").encode(), "--summary")
    if json_out:
        write_output_file(json_out, (json.dumps(verdict, indent=2, default=str) + "\n").encode(), "--json-out")
    return text
