"""A gate verdict as Markdown (fit for a CI job summary) and JSON."""

from __future__ import annotations

from quantlab.fsutil import atomic_write_json, atomic_write_text

ICON = {"pass": "PASS", "regression": "REGRESSION", "error": "ERROR"}


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def render_markdown(verdict: dict) -> str:
    lines = [f"## quantlab gate: {ICON[verdict['verdict']]}", "",
             f"Baseline `{verdict['baseline']}`, candidate `{verdict['candidate']}`; policy `{verdict['policy']}`. "
             "Drop = degradation in the metric's units (positive = worse); p = one-sided paired test that the "
             "candidate is worse; detectable = the drop this many documents detect at the policy's alpha with 80 % power.",
             ""]
    for comp in verdict["comparisons"]:
        lines += [f"### {comp['candidate']} vs {comp['baseline']}: {ICON[comp['verdict']]}", "",
                  "| metric | baseline | candidate | drop [95% CI] | p | test | n | detectable | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in comp["metrics"]:
            if "drop" not in m:
                lines.append(f"| {m['metric']} | | | | | | | | {ICON[m['verdict']]}: {m['reason']} |")
                continue
            lo, hi = m["ci95"]
            lines.append(f"| {m['metric']} | {_num(m['baseline'])} | {_num(m['candidate'])} | {_num(m['drop'])} "
                         f"[{_num(lo)}, {_num(hi)}] | {m['p_value']:.2g} | {m['test']} | {m['n']} | "
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
