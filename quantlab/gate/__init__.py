"""Baseline vs candidate -> a CI verdict from paired tests on per-sample scores.

``run_gate`` loads both references (a results.json, a run id or a run set from the store; ``REF@recipe``
picks one recipe), pairs candidate runs with baseline runs, checks each pair is comparable (one model, the same
task data, settings and text: ``quantlab.gate.comparable``) and that every metric, task and sample the policy
needs is there on both sides (``MissingData``, a QuantlabError: the gate fails closed with exit 1, before any
test), then tests each policy metric on the documents both sides scored and returns a verdict: ``pass``,
``regression`` (exit 3) or ``inconclusive`` (exit 0, or 3 when the policy says ``inconclusive: fail``).

Each metric tests the null "true degradation ≤ margin" (the rule's max_drop or what its min_recovery allows; 0
without either), so a candidate within tolerance fails with probability ≤ alpha; Holm's correction across the
policy's metrics makes that hold for the whole comparison (family-wise). scripts/bench_gate.py measures it.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from quantlab import metrics
from quantlab.errors import QuantlabError, UsageError
from quantlab.evaluate.accuracy import primary_metric
from quantlab.evaluate.flips import binary_metric
from quantlab.evaluate.harness import COUNTS
from quantlab.gate import stats
from quantlab.gate.comparable import check_comparable
from quantlab.gate.policy import (BINARY, DERIVED, FIDELITY_TASK, FLIPS, Policy, check_metrics, default_policy,
                                  load_policy)
from quantlab.gate.refs import chunk_kld, load_ref, ref_file

EXIT_CODES = {"pass": 0, "regression": 3, "inconclusive": 0}  # inconclusive: 3 when the policy says fail
# metrics computed from per-document log-likelihoods, and the count each is normalised by (None: documents)
PER_DOCUMENT = {"perplexity": None, **COUNTS}


def run_gate(baseline: str, candidate: str, policy_path: str | None = None, store: str | None = None,
             seed: int = 0, allow_other_model: bool = False, outputs: dict[str, str | None] | None = None) -> dict:
    """The verdict; ``outputs`` (option -> path: where the CLI will write it) must name none of the inputs."""
    check_outputs_apart(outputs or {}, {"--baseline": baseline, "--candidate": candidate, "--policy": policy_path})
    base_runs = load_ref(baseline, store)
    cand_runs = load_ref(candidate, store)
    pairs = pair_runs(base_runs, cand_runs)
    first = base_runs[0].get("accuracy") or {}
    policy = load_policy(policy_path) if policy_path else default_policy(first.get("tasks", {}))
    check_metrics(policy, first.get("tasks", {}))
    if not policy.rules:  # fail closed: a gate that tests nothing must not pass
        raise UsageError(f"{baseline} has no suite accuracy for the default policy to test — evaluate with "
                         "--tasks/--suite, or give --policy (e.g. metric: fidelity/kld_mean)")
    check_comparable(pairs, policy.rules, allow_other_model)
    planned = [plan_tests(b, c, policy, seed) for b, c in pairs]  # every pair's inputs checked before any test
    comparisons = [compare(b, c, policy, seed, tests) for (b, c), tests in zip(pairs, planned)]
    verdict = _worst(c["verdict"] for c in comparisons)
    code = EXIT_CODES["regression"] if verdict == "inconclusive" and policy.inconclusive == "fail" else EXIT_CODES[verdict]
    return {"verdict": verdict, "exit_code": code, "policy": policy.name, "alpha": policy.alpha,
            "inconclusive": policy.inconclusive, "baseline": baseline, "candidate": candidate,
            "comparisons": comparisons}


def check_outputs_apart(outputs: dict[str, str | None], inputs: dict[str, str | None]) -> None:
    """No output may replace an input (a verdict written over the baseline it was judged against) or another
    output."""
    seen: dict[Path, str] = {}
    for option, ref in inputs.items():
        if ref:
            path = ref_file(ref)
            if path is not None:
                seen.setdefault(path.resolve(), option)
    for option, out in outputs.items():
        if not out:
            continue
        path = Path(out).resolve()
        if path in seen:
            raise UsageError(f"{option} {out} is the file given as {seen[path]} — give {option} another path")
        seen[path] = option


def pair_runs(base: list[dict], cand: list[dict]) -> list[tuple[dict, dict]]:
    """One baseline run gates every candidate run; otherwise runs pair by recipe name. When the baseline holds
    several models (a sweep's run set), runs pair within a model, never across: by (model, recipe), or each
    candidate with its model's one baseline run."""
    if len({r.get("model") for r in base}) > 1:
        return _pair_by_model(base, cand)
    if len(base) == 1:
        return [(base[0], c) for c in cand]
    by_recipe = {r["recipe"]: r for r in base}
    missing = [c["recipe"] for c in cand if c["recipe"] not in by_recipe]
    if missing:
        raise UsageError(f"Baseline has no run of {', '.join(missing)} — pick one baseline run with REF@recipe "
                         f"(recipes there: {', '.join(by_recipe)})")
    return [(by_recipe[c["recipe"]], c) for c in cand]


def _pair_by_model(base: list[dict], cand: list[dict]) -> list[tuple[dict, dict]]:
    per_model: dict = {}
    for r in base:
        per_model.setdefault(r.get("model"), []).append(r)
    one_each = all(len(runs) == 1 for runs in per_model.values())
    pairs = []
    for c in cand:
        runs = per_model.get(c.get("model"), [])
        match = runs if one_each else [r for r in runs if r["recipe"] == c["recipe"]]
        if not match:
            raise UsageError(f"Baseline has no run of {c.get('model')}@{c['recipe']} — the baseline holds models "
                             f"{', '.join(map(str, per_model))}; gate runs of the same models")
        pairs.append((match[0], c))
    return pairs


def plan_tests(base: dict, cand: dict, policy: Policy, seed: int) -> list:
    """(rule, test) for every policy metric: the inputs found and checked, the test not yet run. Raises
    MissingData for the first metric, task or sample a side lacks."""
    return [(rule, plan_test(base, cand, rule, seed)) for rule in policy.rules]


def compare(base: dict, cand: dict, policy: Policy, seed: int, tests: list | None = None) -> dict:
    """Every policy metric of one candidate against its baseline: each metric's test at its margin, Holm's
    correction across the metrics tested (one family per comparison), then each metric's verdict."""
    tested = [(rule, run()) for rule, run in (tests or plan_tests(base, cand, policy, seed))]
    for rule, test in tested:
        _finite_result(rule, test, base, cand)
    adjusted = stats.holm([t.p_value for _, t in tested])
    results = [judge(rule, test, p, policy, len(tested)) for (rule, test), p in zip(tested, adjusted)]
    return {"baseline": base["label"], "candidate": cand["label"], "verdict": _worst(r["verdict"] for r in results),
            "metrics": results}


def _worst(verdicts) -> str:
    """regression over inconclusive over pass."""
    found = set(verdicts)
    return next((v for v in ("regression", "inconclusive") if v in found), "pass")


class MissingData(QuantlabError):
    """A metric, task or per-sample record the policy needs is absent or unusable: the gate fails closed (exit 1,
    the reason on stderr), before any test runs."""


def _finite_result(rule, test, base: dict, cand: dict) -> None:
    """A test whose numbers are not numbers (a perplexity over zero words, an overflow) is no verdict."""
    values = (test.baseline, test.candidate, test.drop, test.p_value)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise MissingData(f"{rule.name}: {base['label']} against {cand['label']} gives baseline {test.baseline}, "
                          f"candidate {test.candidate}, drop {test.drop} — not numbers, so no verdict; check both "
                          "sides' per-sample scores, or gate on another metric")


def margin(rule, baseline: float) -> float:
    """The degradation the rule tolerates: max_drop, or what min_recovery allows at this baseline (the smaller
    when both are given), 0 when neither is."""
    limits = [] if rule.max_drop is None else [rule.max_drop]
    if rule.min_recovery is not None:
        allowed = (1 - rule.min_recovery) * baseline if rule.higher_is_better else baseline * (1 / rule.min_recovery - 1)
        limits.append(max(allowed, 0.0))
    return min(limits) if limits else 0.0


def judge(rule, test, p_adjusted: float, policy: Policy, family: int) -> dict:
    """regression when Holm's adjusted p < alpha; inconclusive when not, but the test cannot tell a degradation
    of twice the margin from the margin with 80 % power (see ``stats.detectable``, at Holm's first-step level
    alpha / family); else pass. Sides that agree on every document (no spread) are exact there: pass."""
    alpha = policy.alpha
    found = stats.detectable(test, alpha / max(family, 1), rule.metric in BINARY)
    null = f"drop ≤ {test.margin:.4g}"
    ps = f"p = {test.p_value:.2g}, Holm p = {p_adjusted:.2g}"
    if p_adjusted < alpha:
        verdict, reason = "regression", f"drop {test.drop:.4g} beyond {null}: {ps} < {alpha:g}"
    elif test.margin > 0 and test.se is not None and found > 2 * test.margin:
        verdict = "inconclusive"
        reason = (f"{ps}, but {test.n} documents detect a drop of {found:.4g} (> 2 x {test.margin:.4g}) with 80 % "
                  "power — use more documents")
    else:
        verdict, reason = "pass", f"{null} not rejected ({ps} ≥ {alpha:g})"
    return {"metric": rule.name, "verdict": verdict, "reason": reason, "max_drop": rule.max_drop,
            "min_recovery": rule.min_recovery, "higher_is_better": rule.higher_is_better, "p_adjusted": p_adjusted,
            "detectable": found, **test.to_dict()}


def plan_test(base: dict, cand: dict, rule, seed: int):
    """The test of ``rule`` on the documents (or windows) both sides scored, ready to run: a callable returning
    ``stats.Paired``. Every input is found and checked here (MissingData), so nothing is tested on half the data."""
    if rule.task == FIDELITY_TASK:
        return _fidelity_test(base, cand, rule, seed)
    b_rows, c_rows = _rows(base, rule.task), _rows(cand, rule.task)
    common = sorted(set(b_rows) & set(c_rows))
    lost = len(b_rows) - len(common)
    if not common or lost:
        raise MissingData(f"{rule.task}: candidate {cand['label']} lacks {lost} of the baseline's "
                          f"{len(b_rows)} documents — evaluate both with the same tasks and --limit")
    b, c = [b_rows[i] for i in common], [c_rows[i] for i in common]
    if rule.metric in DERIVED:
        return _derived_test(b, c, rule, seed)
    if rule.metric == FLIPS:
        return _flips_test(base, b, c, rule, seed)
    if rule.metric in PER_DOCUMENT:
        return _per_document_test(b, c, rule, seed)
    if any(rule.metric not in r for r in b + c):
        side = base if any(rule.metric not in r for r in b) else cand
        have = sorted({k for r in b + c for k in r if k not in SAMPLE_FIELDS})
        raise MissingData(f"{rule.name}: the per-sample scores of {side['label']} have no '{rule.metric}' — "
                          f"metrics there: {', '.join(have) or 'none'}")
    values_b, values_c = [r[rule.metric] for r in b], [r[rule.metric] for r in c]
    tolerated = margin(rule, sum(values_b) / len(values_b))
    if rule.metric in BINARY:
        _zero_one(values_b + values_c, rule)
        return functools.partial(stats.paired_binary, values_b, values_c, tolerated, seed)
    return functools.partial(stats.paired_mean, values_b, values_c, tolerated, rule.higher_is_better, seed)


SAMPLE_FIELDS = ("doc_id", "ll", "gold", "choice_len", "greedy", "words", "bytes")


def _zero_one(values: list, rule) -> None:
    if any(v not in (0, 1) for v in values):
        raise MissingData(f"{rule.name} needs 0/1 per-sample scores, and some are not 0 or 1 — evaluate both sides "
                          "again with quantlab eval")


def _per_document_test(b: list[dict], c: list[dict], rule, seed: int):
    """A perplexity (or bits per byte) over documents from each document's log-likelihood and count."""
    key = PER_DOCUMENT[rule.metric]
    if any(not _is_number(r.get("ll")) or (key and not _is_number(r.get(key))) for r in b + c):
        raise MissingData(f"{rule.name} needs per-document log-likelihoods{f' and {key}' if key else ''}")
    counts = [r[key] if key else 1 for r in b]
    if any(n <= 0 for n in counts) or any(r[key] != n for r, n in zip(c, counts) if key):
        raise MissingData(f"{rule.name}: the documents' {key} are not positive or differ between the sides — the "
                          "documents are not the same; evaluate both on the same data")
    lls = [[r["ll"] for r in rows] for rows in (b, c)]
    bits = rule.metric == "bits_per_byte"
    value = stats.perplexity(lls[0], counts, bits)
    return functools.partial(stats.paired_perplexity, lls[0], lls[1], counts, margin(rule, value), seed, bits=bits)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _derived_test(b: list[dict], c: list[dict], rule, seed: int):
    """gold_logprob (length-normalised) and gold_logprob_sum from the choices' log-likelihoods."""
    if any(not isinstance(r.get("ll"), list) or r.get("gold") is None for r in b + c):
        raise MissingData(f"{rule.name} needs multiple-choice log-likelihoods with a gold index")
    if rule.metric == "gold_logprob" and any("choice_len" not in r for r in b + c):
        raise MissingData(f"{rule.name} needs each choice's length, which samples from before quantlab kept "
                          "them lack — evaluate again, or gate on gold_logprob_sum")
    for rb, rc in zip(b, c):
        lengths = {len(rb["ll"]), len(rc["ll"])} | ({len(r["choice_len"]) for r in (rb, rc)}
                                                    if rule.metric == "gold_logprob" else set())
        if len(lengths) != 1 or rb["gold"] != rc["gold"] or not 0 <= rb["gold"] < len(rb["ll"]):
            raise MissingData(f"{rule.task} document {rb['doc_id']}: the sides' choices or gold answer differ or do "
                              "not fit — the documents are not the same; evaluate both on the same data")
    if rule.metric == "gold_logprob":
        values = [[stats.gold_logprob(r["ll"], r["gold"], r["choice_len"]) for r in rows] for rows in (b, c)]
    else:
        values = [[stats.gold_logprob_sum(r["ll"], r["gold"]) for r in rows] for rows in (b, c)]
    return functools.partial(stats.paired_mean, values[0], values[1], margin(rule, 0.0), True, seed)


def _flips_test(base: dict, b: list[dict], c: list[dict], rule, seed: int):
    """Flips on the task's primary 0/1 metric (acc_norm, else acc), as results.json counts them."""
    info = ((base.get("accuracy") or {}).get("tasks") or {}).get(rule.task)
    metric = binary_metric(b, primary_metric(info) if info else None)
    if metric is None or binary_metric(c, metric) != metric:
        raise MissingData(f"{rule.name} needs 0/1 per-sample scores (acc_norm or acc) on both sides")
    values = [[r[metric] for r in rows] for rows in (b, c)]
    _zero_one(values[0] + values[1], rule)

    def run():
        test = stats.paired_flips(values[0], values[1], margin(rule, 0.0), seed)
        test.detail["metric"] = metric
        return test
    return run


def _rows(run: dict, task: str) -> dict:
    samples = run.get("samples") or {}
    if task not in samples:
        have = ", ".join(sorted(samples)) or "none"
        raise MissingData(f"{run['label']} has no per-sample scores for task '{task}' (tasks there: {have}) — "
                          f"evaluate it with --tasks {task}, or leave {task} out of the policy")
    rows = {r["doc_id"]: r for r in samples[task]}
    if not rows:
        raise MissingData(f"{run['label']} has an empty list of per-sample scores for task '{task}' — evaluate it "
                          "again")
    if len(rows) != len(samples[task]):
        raise MissingData(f"{run['label']} holds a document of task '{task}' more than once — a shard merged twice? "
                          "Evaluate it again, or merge its shards with quantlab merge-shards")
    return rows


def _fidelity_test(base: dict, cand: dict, rule, seed: int):
    """A fidelity metric pairs its per-window values (``quantlab.metrics``: fidelity/kld_mean the per-window mean
    KLD, fidelity/ppl the per-window mean NLL, the token-level perplexity with every window the same number of
    tokens). Text windows are the paired items."""
    import numpy as np

    metric = metrics.get_metric(rule.metric)
    key, what = metric.windows.key, metric.windows.what
    arrays = []
    for run in (base, cand):
        values = (run.get("per_window") or {}).get(key)
        if not values and key == "kld_per_window" and run.get("per_token"):  # a results.json from before runs kept it
            values = chunk_kld(run["per_token"])
        if not values:
            raise MissingData(f"{run['label']} has no per-window {what} for {rule.name} — its record predates it or "
                              "holds no fidelity; run the comparison again (or eval --baseline)")
        arrays.append(np.asarray(values, float))
    if arrays[0].shape != arrays[1].shape or arrays[0].ndim != 1:
        raise MissingData(f"{rule.name}: baseline and candidate scored different tokens — use the same text and windows")
    if not all(np.isfinite(a).all() for a in arrays):
        raise MissingData(f"{rule.name}: a per-window {what} is not a number — rerun that comparison")
    if metric.windows.test == "mean":
        return functools.partial(stats.paired_mean, arrays[0], arrays[1], margin(rule, float(arrays[0].mean())),
                                 metric.higher_is_better, seed)
    counts = np.ones_like(arrays[0])  # ll = -mean NLL per window, one count per window: exp(mean NLL)
    value = float(stats.perplexity(-arrays[0], counts))
    return functools.partial(stats.paired_perplexity, -arrays[0], -arrays[1], counts, margin(rule, value), seed)
