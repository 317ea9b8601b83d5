"""Gate policies are data: a YAML file listing metrics, their direction and how much loss each tolerates.

    alpha: 0.05                       # family-wise: the chance that a candidate within tolerance fails
    inconclusive: pass                # or fail: what an underpowered metric does to the exit code
    metrics:
      - metric: arc_easy/acc          # <task>/<metric> from the suite, or fidelity/kld_mean, fidelity/ppl
                                      # (the fidelity metrics with per-window values: quantlab.metrics)
        max_drop: 0.03                # absolute, in the metric's units
        min_recovery: 0.95            # candidate/baseline (baseline/candidate when lower is better)
      - metric: arc_easy/gold_logprob
        max_drop: 0.05
      - metric: arc_easy/flips          # share of documents whose correctness changed (quantlab.evaluate.flips)
        max_drop: 0.10                # the share tolerated; without it any flip fails

Each metric tests the null "the true degradation is at most the tolerance" (max_drop, or what min_recovery
allows at the baseline's value, the smaller of the two; 0 with neither); Holm's correction across the metrics
keeps the chance that any of them fails a candidate within tolerance at most alpha. A metric whose documents
are too few to tell a degradation of twice its tolerance from the tolerance (80 % power) is inconclusive. The
default is to pass it, with the verdict saying so and the degradation it could detect: a gate on a small suite
should still let a good candidate through, and its false-fail rate is what alpha promises; a release gate that
must not pass untested quality says ``inconclusive: fail``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path

from quantlab import metrics
from quantlab.errors import UsageError
from quantlab.fsutil import load_yaml

# the suite's metrics (lm-eval's and quantlab's flips); a fidelity metric's direction is its declaration's
# (quantlab.metrics)
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "flips"}
BINARY = {"acc", "acc_norm", "exact_match"}
DERIVED = {"gold_logprob", "gold_logprob_sum"}  # computed from multiple-choice log-likelihoods
FLIPS = "flips"  # computed from both sides' 0/1 scores
FIDELITY_TASK = "fidelity"  # the task name of the fidelity metrics a gate can test: quantlab.metrics.gated()
_METRIC_KEYS = {"metric", "direction", "max_drop", "min_recovery"}
_POLICY_KEYS = {"description", "alpha", "inconclusive", "metrics"}


@dataclass(frozen=True)
class MetricRule:
    task: str
    metric: str
    higher_is_better: bool
    max_drop: float | None = None
    min_recovery: float | None = None

    @property
    def name(self) -> str:
        return f"{self.task}/{self.metric}"


@dataclass(frozen=True)
class Policy:
    name: str
    alpha: float
    rules: tuple[MetricRule, ...]
    inconclusive: str = "pass"  # or "fail"


def default_policy(tasks: dict[str, dict], alpha: float = 0.05) -> Policy:
    """Without --policy: every 0/1 accuracy and the gold log-probability of every multiple-choice task,
    any significant degradation failing."""
    rules = []
    for task, info in sorted(tasks.items()):
        for metric in info.get("metrics", {}):
            if metric in BINARY or metric in LOWER_IS_BETTER:
                rules.append(MetricRule(task, metric, metric not in LOWER_IS_BETTER))
        if info.get("output_type") == "multiple_choice":
            rules.append(MetricRule(task, "gold_logprob", True))
    return Policy("default (any significant degradation)", alpha, tuple(rules))


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    data = load_yaml(path, "Gate policy", "give a YAML like experiments/gates/default.yaml")
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), list) or not data["metrics"]:
        raise UsageError(f"Gate policy {path} needs a non-empty 'metrics:' list")
    _unknown(set(data) - _POLICY_KEYS, f"Gate policy {path}", _POLICY_KEYS)
    if not isinstance(data.get("description", ""), str):
        raise UsageError(f"Gate policy {path}: description must be text (got {_shown(data['description'])}) — quote it")
    alpha = _number(data.get("alpha", 0.05), f"Gate policy {path}: alpha", "in (0, 1)", lambda x: 0 < x < 1,
                    "alpha: 0.05")
    inconclusive = data.get("inconclusive", "pass")
    if inconclusive not in ("pass", "fail") or isinstance(inconclusive, bool):
        raise UsageError(f"Gate policy {path}: inconclusive must be 'pass' or 'fail' (got {_shown(inconclusive)}) — "
                         "e.g. inconclusive: fail")
    rules = tuple(_rule(entry, path, n) for n, entry in enumerate(data["metrics"], 1))
    seen: dict[str, int] = {}
    for n, rule in enumerate(rules, 1):
        if rule.name in seen:  # two rules of one metric: Holm would count it twice and the verdict show it twice
            raise UsageError(f"Gate policy {path}: metric {rule.name} is listed twice (entries {seen[rule.name]} and "
                             f"{n}) — keep one entry, with both max_drop and min_recovery if you need both")
        seen[rule.name] = n
    return Policy(str(path), float(alpha), rules, inconclusive)


def known_metrics(info: dict) -> list[str]:
    """The metrics a task's results can be gated on: its own, the derived ones of a multiple-choice task, and
    flips where it has a 0/1 accuracy."""
    derived = sorted(DERIVED) if info.get("output_type") == "multiple_choice" else []
    flips = [FLIPS] if {"acc", "acc_norm"} & set(info.get("metrics", {})) else []
    return sorted(info.get("metrics", {})) + derived + flips


def check_metrics(policy: Policy, tasks: dict[str, dict]) -> None:
    """Each rule's metric is one its task has (``tasks``: the baseline's accuracy tasks) — a typo is named with
    the task's metrics, not reported later as missing scores."""
    for rule in policy.rules:
        info = tasks.get(rule.task)
        if rule.task == FIDELITY_TASK or info is None or not info.get("metrics"):
            continue
        known = known_metrics(info)
        if rule.metric not in known:
            close = difflib.get_close_matches(rule.metric, known, n=1)
            hint = f"Did you mean '{rule.task}/{close[0]}'? " if close else ""
            raise UsageError(f"Gate policy {policy.name}: unknown metric '{rule.name}' — {hint}{rule.task}'s metrics: "
                             f"{', '.join(known)}")


def _rule(entry, path: Path, n: int) -> MetricRule:
    where = f"Gate policy {path} metric {n}"
    if not isinstance(entry, dict) or "metric" not in entry:
        raise UsageError(f"{where}: each entry needs 'metric: <task>/<metric>', e.g. metric: arc_easy/acc")
    if "alpha" in entry:
        raise UsageError(f"{where}: alpha is the policy's, family-wise across its metrics (Holm) — set it once at "
                         "the top of the policy")
    _unknown(set(entry) - _METRIC_KEYS, where, _METRIC_KEYS)
    name = entry["metric"]
    task, sep, metric = name.partition("/") if isinstance(name, str) else ("", "", "")
    if not sep or not task or not metric:
        raise UsageError(f"{where}: {_shown(name)} is not <task>/<metric> — e.g. arc_easy/acc or fidelity/kld_mean")
    lower = _fidelity_lower(metric, where) if task == FIDELITY_TASK else metric in LOWER_IS_BETTER
    where = f"{where} ({name})"
    direction = entry.get("direction", "lower" if lower else "higher")
    if direction not in ("higher", "lower") or isinstance(direction, bool):
        raise UsageError(f"{where}: direction must be 'higher' or 'lower' (got {_shown(direction)}) — e.g. "
                         "direction: lower")
    share = metric in BINARY | {FLIPS}  # a 0/1 accuracy or a share of documents: a drop beyond 1 cannot happen
    max_drop, min_rec = entry.get("max_drop"), entry.get("min_recovery")
    if max_drop is not None:
        max_drop = _number(max_drop, f"{where}: max_drop", "in [0, 1] (a share)" if share else "≥ 0",
                           (lambda x: 0 <= x <= 1) if share else (lambda x: x >= 0),
                           "max_drop: 0.03 for 3 %" if share else "max_drop: 0.03")
    if min_rec is not None:
        if metric in DERIVED | {FLIPS} or (task == FIDELITY_TASK and not metrics.get_metric(metric).positive):
            raise UsageError(f"{where}: {metric} is not a positive score, so min_recovery does not apply — use "
                             "max_drop")
        min_rec = _number(min_rec, f"{where}: min_recovery", "in (0, 1] (the share of the baseline kept)",
                          lambda x: 0 < x <= 1, "min_recovery: 0.95")
    return MetricRule(task, metric, direction == "higher", max_drop, min_rec)


def _fidelity_lower(metric: str, where: str) -> bool:
    """Whether lower is better for a fidelity metric a gate can test (one with per-window values to pair)."""
    gated = [m.name for m in metrics.gated()]
    if metric not in gated:
        names = [f"{FIDELITY_TASK}/{n}" for n in gated]
        listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        raise UsageError(f"{where}: unknown fidelity metric '{metric}' — use {listed}")
    return not metrics.get_metric(metric).higher_is_better


def _number(value, where: str, allowed: str, ok, example: str) -> float:
    """A policy's numeric field: a finite int or float (YAML's true/false, .nan, .inf and quoted numbers are
    refused: each compared as a number would pass or fail everything) that ``ok`` accepts."""
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int beyond any float
        number = math.inf
    if not math.isfinite(number) or not ok(number):
        raise UsageError(f"{where} must be {allowed}, a finite number (got {_shown(value)}) — e.g. {example}")
    return number


def _shown(value) -> str:
    """A YAML value as the policy's author wrote it: true, .nan, '3%'."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value != value:
        return ".nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _unknown(keys: set, where: str, allowed: set) -> None:
    if keys:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(keys))} — allowed: {', '.join(sorted(allowed))}")
