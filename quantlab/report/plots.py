"""Inline SVG charts from matplotlib's object API (no pyplot state), with ``<title>`` tooltips.

Every chart returns an ``<svg>`` string: text stays text (``svg.fonttype: none``), ids are salted so
the output is byte-stable, and each point or bar carries a ``<title>`` the browser shows on hover.
"""

from __future__ import annotations

import html
import io
import os
import re

from quantlab.report.pareto import pareto_front

# Okabe & Ito's colour-blind-safe palette, one colour per method.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")
PART_COLOURS = {"linear data": "#0072B2", "scales": "#E69F00", "embed+head": "#009E73", "norms etc": "#CC79A7",
                "measured": "#555555"}


def method_style(methods: list[str]) -> dict[str, tuple[str, str]]:
    ordered = list(dict.fromkeys(methods))
    return {m: (PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(ordered)}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasSVG(fig)
    return fig


def _to_svg(fig, tooltips: dict[str, str]) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "quantlab", "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    for gid, text in tooltips.items():
        svg = svg.replace(f'<g id="{gid}">', f'<g id="{gid}"><title>{html.escape(text)}</title>', 1)
    return svg


def pareto_svg(points: list[dict], xlabel: str, ylabel: str, title: str, higher_is_better: bool,
               styles: dict[str, tuple[str, str]]) -> str:
    """Quality (y) against a cost (x, lower is better). ``points``: label, method, x, y, tooltip.
    Frontier points are joined and labelled in bold; the others are labelled in grey."""
    fig = _figure(6.2, 4.0)
    ax = fig.add_subplot()
    front = pareto_front([(p["x"], p["y"]) for p in points], higher_is_better)
    if len(front) > 1:
        ax.plot([points[i]["x"] for i in front], [points[i]["y"] for i in front], color="#999999", lw=1.2,
                ls="--", zorder=1, label="Pareto frontier")
    tips, seen = {}, set()
    for i, p in enumerate(points):
        if p["x"] is None or p["y"] is None:
            continue
        colour, marker = styles[p["method"]]
        gid = f"pt-{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}-{i}"
        ax.scatter([p["x"]], [p["y"]], color=colour, marker=marker, s=60 if i in front else 36, zorder=3,
                   edgecolors="black" if i in front else "none", gid=gid,
                   label=p["method"] if p["method"] not in seen else None)
        seen.add(p["method"])
        tips[gid] = p["tooltip"]
    offsets = _label_offsets(ax, points)
    for i, p in enumerate(points):
        if i in offsets:
            ax.annotate(p["label"], (p["x"], p["y"]), xytext=offsets[i], textcoords="offset points", fontsize=7.5,
                        color="black" if i in front else "#777777", fontweight="bold" if i in front else "normal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="best", frameon=False)
    return _to_svg(fig, tips)


def _label_offsets(ax, points: list[dict]) -> dict[int, tuple[float, float]]:
    """Label offsets (points) that keep labels of nearby markers from printing over each other: labels are
    placed top to bottom and pushed down while one already placed sits within ~4 % of the axes."""
    ax.autoscale_view()
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    placed: list[tuple[float, float]] = []
    out = {}
    order = sorted((i for i, p in enumerate(points) if p["x"] is not None and p["y"] is not None),
                   key=lambda i: -points[i]["y"])
    for i in order:
        fx = (points[i]["x"] - x0) / ((x1 - x0) or 1)
        fy = (points[i]["y"] - y0) / ((y1 - y0) or 1)
        for dy in (4.0, -9.0, 13.0, -18.0, 22.0, -27.0, 31.0):  # alternate below and above the marker
            if not any(abs(fx - px) < 0.18 and abs(fy + dy / 280 - py) < 0.035 for px, py in placed):
                break
        placed.append((fx, fy + dy / 280))
        out[i] = (5.0, dy)
    return out


def memory_bars_svg(rows: list[dict], unit: float, unit_name: str) -> str:
    """Per recipe: the predicted weight bytes stacked by component beside the measured bytes.
    ``rows``: recipe, predicted {part: bytes} (or None), measured bytes."""
    fig = _figure(6.8, 0.5 + 0.55 * len(rows))
    ax = fig.add_subplot()
    tips = {}
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        left = 0.0
        for j, (part, value) in enumerate((r["predicted"] or {}).items()):
            gid = f"bar-{i}-{j}"
            ax.barh(y + 0.2, value / unit, left=left, height=0.38, color=PART_COLOURS[part], gid=gid,
                    label=f"predicted: {part}" if i == 0 else None)
            tips[gid] = f"{r['recipe']} predicted {part}: {value / unit:.2f} {unit_name}"
            left += value / unit
        gid = f"bar-{i}-m"
        ax.barh(y - 0.2, r["measured"] / unit, height=0.38, color=PART_COLOURS["measured"], gid=gid,
                label="measured (as loaded)" if i == 0 else None)
        tips[gid] = f"{r['recipe']} measured: {r['measured'] / unit:.2f} {unit_name}"
    ax.set_yticks(range(len(rows)), [r["recipe"] for r in reversed(rows)], fontsize=8)
    ax.set_xlabel(f"weight memory ({unit_name})")
    ax.set_title("Weight memory: predicted from the config (stacked) vs measured", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", frameon=False)
    return _to_svg(fig, tips)


def sensitivity_heatmap_svg(units: list[str], formats: list[str], kld: dict, chosen: dict[str, str], title: str) -> str:
    """A fit's sensitivity table: units (rows, model order from the top) × formats (columns), each cell coloured by
    log10 of the unit's KLD in that format, the chosen format of each unit outlined in black. ``kld``: unit ->
    format -> nats/token; a KLD of 0 (fp) has no logarithm and is drawn white, a missing one grey."""
    import math

    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle
    from matplotlib.patheffects import Normal, Stroke

    value = lambda u, f: (kld.get(u) or {}).get(f)  # noqa: E731
    logs = [math.log10(v) for u in units for f in formats if (v := value(u, f)) is not None and v > 0]
    lo, hi = (min(logs), max(logs)) if logs else (-6.0, 0.0)
    norm, cmap = Normalize(lo - 0.5 * (hi == lo), hi + 0.5 * (hi == lo)), colormaps["viridis"]
    n, prefix, slug = len(units), _common_prefix(units), re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    fig = _figure(2.2 + 1.0 * len(formats), min(18.0, 1.3 + 0.24 * n))
    ax = fig.add_subplot()
    tips, halo = {}, [Stroke(linewidth=3.4, foreground="white"), Normal()]  # visible on dark and light cells
    for i, u in enumerate(units):
        y = n - 1 - i
        for j, f in enumerate(formats):
            v = value(u, f)
            colour = "#dddddd" if v is None else "#ffffff" if v <= 0 else cmap(norm(math.log10(v)))
            gid = f"heat-{slug}-{i}-{j}"
            ax.add_patch(Rectangle((j, y), 1, 1, facecolor=colour, edgecolor="#bbbbbb", lw=0.4, gid=gid))
            tips[gid] = f"{u} in {f}: KLD {_kld_text(v)} nats/token" + (" (chosen)" if chosen.get(u) == f else "")
        if chosen.get(u) in formats:
            gid = f"chosen-{slug}-{i}"
            ax.add_patch(Rectangle((formats.index(chosen[u]) + 0.08, y + 0.08), 0.84, 0.84, fill=False,
                                   edgecolor="black", lw=1.6, gid=gid, path_effects=halo))
            tips[gid] = f"{u}: chosen {chosen[u]}, KLD {_kld_text(value(u, chosen[u]))} nats/token"
    ax.set_xlim(0, len(formats))
    ax.set_ylim(0, n)
    ax.xaxis.tick_top()
    ax.set_xticks([j + 0.5 for j in range(len(formats))], formats, fontsize=8)
    ax.set_yticks([n - 0.5 - i for i in range(n)], [u[len(prefix):] for u in units],
                  fontsize=8 if n <= 40 else max(3.0, 320 / n))
    ax.set_ylabel(f"unit ({prefix}…)" if prefix else "unit")
    ax.set_title(title, fontsize=10, pad=18)
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=ax, fraction=0.08, pad=0.04)
    bar.solids.set_rasterized(False)  # vector, like the rest: no embedded bitmap
    bar.set_label("log10 KLD, nats/token", fontsize=8)
    return _to_svg(fig, tips)


def _common_prefix(names: list[str]) -> str:
    """The dotted module path all ``names`` share (``model.layers.``), left off the row labels."""
    shared = os.path.commonprefix(names) if names else ""
    return shared[:shared.rfind(".") + 1]


def _kld_text(value) -> str:
    return "—" if value is None else f"{value:.3g}"
