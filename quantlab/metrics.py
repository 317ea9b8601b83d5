"""The metric registry: each fidelity metric declared once, and read by everything that shows or judges it.

A ``Metric`` says what a number is (name, definition, unit, which way is better), how the fidelity step computes
it from the per-token values (``compute``) and its interval (``interval``), the per-window values a gate pairs
(``windows``), and how each table shows it (``table``, ``report``, ``distribution``). The fidelity step
(``quantlab.evaluate.fidelity``), the terminal table (``quantlab.table``), the report (``quantlab.report``), the
gate's policy (``quantlab.gate``) and results.json's ``definitions`` (``quantlab.records``) read it here.
lm-evaluation-harness declares its metrics the same way (``register_metric(metric=..., higher_is_better=...,
aggregation=...)``). The built-ins below register through ``register_metric``, as another metric would:

    register_metric(Metric("kld_p50_x2", "twice the median per-token KL(fp || quant), nats", "nats",
                           higher_is_better=False, compute=lambda t: 2 * Quantile("kl", 50)(t),
                           distribution=Column("2 x KLD median", ".4f")))

A metric registered at run time exists in that process only; the fidelity step runs in a process of its own, so a
metric every run computes is declared in this module. Nothing here imports numpy at import time: ``compute``
receives ``Tokens`` (numpy arrays) and imports what it needs when called.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from quantlab.errors import UsageError

BOOTSTRAP = "bootstrap"  # chunk bootstrap over text windows (percentile method), as fidelity.summarize draws it
WILSON = "wilson"  # a Wilson score interval of a share of independent documents
NONE = "none"  # no interval
INTERVALS = (BOOTSTRAP, WILSON, NONE)
WINDOW_TESTS = ("mean", "perplexity")


@dataclass(frozen=True)
class Tokens:
    """The per-token values a metric is computed from: 1-D over the tokens of the windows drawn (``Metric.compute``),
    or (windows, tokens) (``Windows.compute``). kl: KL(fp || quant); agree: 1 where both argmaxes agree; nll and
    nll_baseline: each model's negative log-likelihood of the next token; dp: p_quant - p_fp of that token."""

    kl: Any
    agree: Any
    nll: Any
    nll_baseline: Any
    dp: Any


@dataclass(frozen=True)
class Quantile:
    """The ``q``-th percentile of one array of ``Tokens`` (linear interpolation, numpy's default). The fidelity step
    computes every quantile of one array in one call; called alone it computes its own."""

    of: str
    q: float

    def __call__(self, tokens: Tokens) -> float:
        import numpy as np

        return np.percentile(getattr(tokens, self.of), self.q)


@dataclass(frozen=True)
class Column:
    """How a table shows a metric: header, format spec, scale (100: a probability in percentage points), whether
    the cell carries the 95 % interval (``value [low, high]``, the terminal table), and the column's place among the
    metric columns, left to right (the terminal table; ties keep declaration order). Metrics whose columns share a
    header share a column, their values joined by '/' (``KLD p99/max``)."""

    header: str
    spec: str
    scale: float = 1
    interval: bool = False
    place: int = 0


@dataclass(frozen=True)
class Windows:
    """A metric's value per text window, in window order: what a gate pairs (the windows are its paired items).
    ``test``: "mean" pairs the window values' mean; "perplexity" pairs exp(mean NLL), the values being NLLs.
    ``what`` names a window's value in the gate's messages."""

    key: str
    definition: str
    compute: Callable[[Tokens], Any]
    what: str
    test: str = "mean"


@dataclass(frozen=True)
class Metric:
    """One fidelity metric. ``positive``: a positive score whose ratio to the baseline's means something (a gate's
    min_recovery applies). ``label``: the metric on a chart's axis. ``table``: its column in the terminal table;
    ``report``: in the report's fidelity table (with its interval); ``distribution``: in the report's table of
    llama.cpp's --kl-divergence statistics."""

    name: str
    definition: str
    unit: str
    higher_is_better: bool | None  # None: a signed difference, best at 0
    compute: Callable[[Tokens], float]
    interval: str = BOOTSTRAP
    windows: Windows | None = None
    positive: bool = False
    label: str = ""
    table: Column | None = None
    report: Column | None = None
    distribution: Column | None = None

    def __post_init__(self):
        if not self.name.isidentifier():
            raise UsageError(f"Metric name {self.name!r} is not an identifier — use letters, digits and _ (kld_p50)")
        if self.interval not in INTERVALS:
            raise UsageError(f"Metric {self.name}: interval {self.interval!r} is none of {', '.join(INTERVALS)} — "
                             f"e.g. interval={BOOTSTRAP!r}")
        if self.windows and self.higher_is_better is None:
            raise UsageError(f"Metric {self.name}: a gate pairs its windows, so it needs a direction — give "
                             "higher_is_better=True or False")
        if self.windows and self.windows.test not in WINDOW_TESTS:
            raise UsageError(f"Metric {self.name}: window test {self.windows.test!r} is none of "
                             f"{', '.join(WINDOW_TESTS)} — e.g. test='mean'")


_REGISTRY: dict[str, Metric] = {}
#: results.json's definitions that are no metric's: how the numbers above are computed
NOTES = {
    "percentiles": "linear interpolation between order statistics (numpy's default, as llama.cpp's --kl-divergence)",
    "ci95": "bootstrap 95% interval resampling text chunks; for p99.9 and max it says how much a few chunks drive "
            "them and is no coverage guarantee",
}


#: the other fields of a run's fidelity record (fidelity.summarize's and the fidelity step's): no metric's name
RECORD_FIELDS = {"tokens", "chunks", "ci95", "ppl_kind", "kld_unit", "ci_method", "baseline_recipe", "baseline_cached",
                 "per_token", "generation", "guard", "step", "recovery"}


def register_metric(metric: Metric) -> Metric:
    """Add ``metric``; a name or window key already taken (or a field of the fidelity record) is refused."""
    taken = ({m.name for m in _REGISTRY.values()} | {m.windows.key for m in _REGISTRY.values() if m.windows}
             | set(NOTES) | RECORD_FIELDS)
    keys = [metric.name] + ([metric.windows.key] if metric.windows else [])
    clash = [k for k in keys if k in taken]
    if clash or len(set(keys)) < len(keys):
        raise UsageError(f"Metric {metric.name}: {', '.join(clash or keys[1:])} already taken (a metric's name or "
                         "window key, or a field of the fidelity record) — pick another name (unregister_metric first "
                         "to replace a metric)")
    _REGISTRY[metric.name] = metric
    return metric


def unregister_metric(name: str) -> None:
    get_metric(name)
    del _REGISTRY[name]


def get_metric(name: str) -> Metric:
    """The metric called ``name``; an unknown name gets a did-you-mean answer."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
        guess = f"Did you mean '{close[0]}'? " if close else ""
        raise UsageError(f"Unknown metric '{name}' — {guess}Available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def metrics() -> tuple[Metric, ...]:
    """Every metric, in declaration order (the order of results.json's fields and of the report's tables)."""
    return tuple(_REGISTRY.values())


def gated() -> tuple[Metric, ...]:
    """The metrics a gate can test: those with per-window values to pair."""
    return tuple(m for m in _REGISTRY.values() if m.windows)


def definitions() -> dict[str, str]:
    """results.json's definitions of the fidelity numbers: each metric's, each per-window list's, then ``NOTES``."""
    return {**{m.name: m.definition for m in metrics()}, **{m.windows.key: m.windows.definition for m in gated()},
            **NOTES}


def table_columns() -> list[tuple[str, list[Metric]]]:
    """The terminal table's metric columns, left to right: (header, the metrics it shows)."""
    columns: dict[str, list[Metric]] = {}
    for m in sorted((m for m in metrics() if m.table), key=lambda m: m.table.place):
        columns.setdefault(m.table.header, []).append(m)
    return list(columns.items())


def _mean(of: str) -> Callable[[Tokens], float]:
    return lambda t: getattr(t, of).mean()


def _window_mean(of: str) -> Callable[[Tokens], Any]:
    return lambda t: getattr(t, of).mean(axis=1)


def _rms_dp(t: Tokens) -> float:
    import numpy as np

    return np.sqrt(np.mean(t.dp * t.dp))


def _ppl(of: str) -> Callable[[Tokens], float]:
    def ppl(t: Tokens) -> float:
        import numpy as np

        return np.exp(getattr(t, of).mean())
    return ppl


KL = "KL(fp || quant)"
for _metric in (
    Metric("kld_mean", f"mean over predicted tokens of {KL} over the full vocabulary, nats/token", "nats/token",
           False, _mean("kl"), label="KLD mean, nats/token",
           windows=Windows("kld_per_window", f"mean per-token {KL} of each text window, in window order (what a "
                           "fidelity/kld_mean gate pairs)", _window_mean("kl"), "KLD"),
           table=Column("KLD mean [95% CI]", ".4f", interval=True, place=1), report=Column("KLD mean [95% CI]", ".4f")),
    Metric("kld_median", f"median of per-token {KL}, nats", "nats", False, Quantile("kl", 50),
           distribution=Column("KLD median", ".4f")),
    Metric("kld_p90", f"90th percentile of per-token {KL}, nats", "nats", False, Quantile("kl", 90),
           distribution=Column("KLD p90", ".4f")),
    Metric("kld_p99", f"99th percentile of per-token {KL}, nats", "nats", False, Quantile("kl", 99),
           table=Column("KLD p99/max", ".3f", place=2), distribution=Column("KLD p99", ".4f")),
    Metric("kld_p999", f"99.9th percentile of per-token {KL}, nats", "nats", False, Quantile("kl", 99.9),
           distribution=Column("KLD p99.9", ".3f")),
    Metric("kld_max", f"largest per-token {KL}, nats", "nats", False, lambda t: t.kl.max(),
           table=Column("KLD p99/max", ".2f", place=2), distribution=Column("KLD max", ".3f")),
    Metric("dp_mean", "mean over tokens of Δp = p_quant(reference token) - p_fp(reference token), a probability "
           "difference", "probability", None, _mean("dp"), distribution=Column("Δp mean %", "+.3f", 100)),
    Metric("dp_rms", "root mean square of Δp", "probability", False, _rms_dp,
           table=Column("RMS Δp %", ".2f", 100, place=3), distribution=Column("RMS Δp %", ".3f", 100)),
    Metric("dp_p999", "99.9th percentile of Δp", "probability", None, Quantile("dp", 99.9),
           distribution=Column("Δp p99.9 %", "+.2f", 100)),
    Metric("dp_p99", "99th percentile of Δp", "probability", None, Quantile("dp", 99),
           distribution=Column("Δp p99 %", "+.2f", 100)),
    Metric("dp_p1", "1st percentile of Δp", "probability", None, Quantile("dp", 1),
           distribution=Column("Δp p1 %", "+.2f", 100)),
    Metric("dp_p01", "0.1th percentile of Δp", "probability", None, Quantile("dp", 0.1),
           distribution=Column("Δp p0.1 %", "+.2f", 100)),
    Metric("top1_agreement", "fraction of tokens where quant's argmax equals fp's argmax (llama.cpp's 'same top p')",
           "share of tokens", True, _mean("agree"), positive=True, label="top-1 agreement with fp",
           table=Column("top-1", ".3f", place=5), report=Column("same top-1 [95% CI]", ".3f")),
    Metric("ln_ppl_ratio", "ln(PPL_quant / PPL_fp) = mean NLL_quant - mean NLL_fp over the same tokens, nats/token",
           "nats/token", False, lambda t: t.nll.mean() - t.nll_baseline.mean(),
           table=Column("ln PPL ratio", "+.4f", place=4), distribution=Column("ln(PPL_q/PPL_fp)", "+.4f")),
    Metric("ppl", "token-level perplexity exp(mean NLL) of the quantized model on the reference text", "perplexity",
           False, _ppl("nll"), positive=True,
           windows=Windows("nll_per_window", "mean NLL of the quantized model's next tokens in each text window, "
                           "nats/token (what a fidelity/ppl gate pairs; every window has the same number of tokens)",
                           _window_mean("nll"), "NLL", test="perplexity"),
           table=Column("ppl (token)", ".2f", place=6), report=Column("ppl [95% CI]", ".2f")),
    Metric("ppl_baseline", "token-level perplexity of the fp baseline on the same tokens", "perplexity", False,
           _ppl("nll_baseline"), positive=True),
):
    register_metric(_metric)
