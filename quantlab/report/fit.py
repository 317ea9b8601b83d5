"""The report's fits to a budget: for each fit run (``quantlab.methods.fit``), the sensitivity table its allocation
was chosen from as a heat map, and its predictions (the planner's bytes, the sum of the units' KLDs) beside what
the run measured (weights as loaded, KLD on the reference text).

The fit dict is the run's ``fit`` field (``quantlab.fit.allocate.DEFINITION``); a run without one is no fit.
"""

from __future__ import annotations

from quantlab.report.plots import sensitivity_heatmap_svg


def fit_views(runs: list[dict], rows: list[dict]) -> list[dict]:
    """One view per fit run, in the runs' order; ``rows``: the report's rows of the same runs (``view._row``)."""
    return [fit_view(run["recipe"], run["fit"], row) for run, row in zip(runs, rows) if run.get("fit")]


def fit_view(recipe: str, fit: dict, row: dict) -> dict:
    """What the page shows of one fit: its table's units × formats and chosen formats, the heat map, and the
    predicted numbers beside the measured ones."""
    sens = fit.get("sensitivity") or {}
    units = [u["name"] if isinstance(u, dict) else str(u) for u in sens.get("units") or []]
    formats = [str(f) for f in sens.get("formats") or []]
    chosen = fit.get("unit_formats") or {}
    title = f"{recipe}: sensitivity per unit and format"
    return {
        "recipe": recipe, "units": units, "formats": formats, "chosen": chosen,
        "granularity": sens.get("granularity"), "text": sens.get("text") or {},
        "units_per_format": fit.get("units_per_format") or {},
        "budget_bytes": fit.get("budget_bytes"), "predicted_bytes": fit.get("predicted_bytes"),
        "measured_bytes": row.get("weights"),
        "predicted_kld": fit.get("predicted_kld"), "measured_kld": row.get("kld"), "measured_kld_ci": row.get("kld_ci"),
        "title": title,
        "svg": sensitivity_heatmap_svg(units, formats, sens.get("kld") or {}, chosen, title) if units and formats
        else None,
    }
