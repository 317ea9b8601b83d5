"""Baseline vs candidate -> a CI verdict from paired tests on per-sample scores.

``run_gate`` loads both references (a results.json, a run id or a run set from the store; ``REF@recipe``
picks one recipe), pairs candidate runs with baseline runs, tests each policy metric on the documents both
sides scored, and returns a verdict: ``pass``, ``regression`` (exit 3) or ``error`` (exit 1, fail closed:
a metric, task or sample the policy needs is missing).
"""

from __future__ import annotations

from quantlab.errors import UsageError
from quantlab.gate import stats
from quantlab.gate.policy import BINARY, Policy, default_policy, load_policy
from quantlab.gate.refs import load_ref

EXIT_CODES = {"pass": 0, "regression": 3, "error": 1}
# metrics computed from per-document log-likelihoods, and the count each is normalised by (None: documents)
PER_DOCUMENT = {"perplexity": None, "word_perplexity": "words", "byte_perplexity": "bytes", "bits_per_byte": "bytes"}


def run_gate(baseline: str, candidate: str, policy_path: str | None = None, store: str | None = None,
             seed: int = 0) -> dict:
    base_runs = load_ref(baseline, store)
    cand_runs = load_ref(candidate, store)
    pairs = pair_runs(base_runs, cand_runs)
    first = base_runs[0].get("accuracy") or {}
    policy = load_policy(policy_path) if policy_path else default_policy(first.get("tasks", {}))
    if not policy.rules:  # fail closed: a gate that tests nothing must not pass
        raise UsageError(f"{baseline} has no suite accuracy for the default policy to test — evaluate with "
                         "--tasks/--suite, or give --policy (e.g. metric: fidelity/kld_mean)")
    comparisons = [compare(b, c, policy, seed) for b, c in pairs]
    verdicts = {c["verdict"] for c in comparisons}
    verdict = "error" if "error" in verdicts else "regression" if "regression" in verdicts else "pass"
    return {"verdict": verdict, "exit_code": EXIT_CODES[verdict], "policy": policy.name, "alpha": policy.alpha,
            "baseline": baseline, "candidate": candidate, "comparisons": comparisons}


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


def compare(base: dict, cand: dict, policy: Policy, seed: int) -> dict:
    results = []
    for rule in policy.rules:
        try:
            results.append(judge(rule, test_metric(base, cand, rule, seed)))
        except MissingData as exc:
            results.append({"metric": rule.name, "verdict": "error", "reason": str(exc)})
    verdicts = {r["verdict"] for r in results}
    verdict = "error" if "error" in verdicts else "regression" if "regression" in verdicts else "pass"
    return {"baseline": base["label"], "candidate": cand["label"], "verdict": verdict, "metrics": results}


class MissingData(Exception):
    """A metric, task or per-sample record the policy needs is absent (the gate fails closed)."""


def judge(rule, test) -> dict:
    drop, base = test.drop, test.baseline
    reasons = []
    if rule.max_drop is not None and drop > rule.max_drop + 1e-12:  # float noise: a drop of exactly max_drop passes
        reasons.append(f"drop {drop:.4g} > max_drop {rule.max_drop:g}")
    if rule.min_recovery is not None:
        recovery = test.candidate / base if rule.higher_is_better else base / test.candidate
        if recovery < rule.min_recovery:
            reasons.append(f"recovery {recovery:.3f} < min_recovery {rule.min_recovery:g}")
    if rule.max_drop is None and rule.min_recovery is None and drop > 0:
        reasons.append(f"degraded by {drop:.4g}")
    significant = test.p_value < rule.alpha
    if reasons and significant:
        verdict, reason = "regression", f"{'; '.join(reasons)}, p = {test.p_value:.2g} < {rule.alpha:g}"
    elif reasons:
        verdict, reason = "pass", f"{'; '.join(reasons)} but not significant (p = {test.p_value:.2g} ≥ {rule.alpha:g})"
    else:
        verdict, reason = "pass", "within the policy"
    return {"metric": rule.name, "verdict": verdict, "reason": reason, "max_drop": rule.max_drop,
            "min_recovery": rule.min_recovery, "higher_is_better": rule.higher_is_better, **test.to_dict()}


def test_metric(base: dict, cand: dict, rule, seed: int):
    if rule.task == "fidelity":
        return _fidelity_test(base, cand, rule, seed)
    b_rows, c_rows = _rows(base, rule.task), _rows(cand, rule.task)
    common = sorted(set(b_rows) & set(c_rows))
    lost = len(b_rows) - len(common)
    if not common or lost:
        raise MissingData(f"{rule.task}: candidate {cand['label']} lacks {lost} of the baseline's "
                          f"{len(b_rows)} documents — evaluate both with the same tasks and --limit")
    b, c = [b_rows[i] for i in common], [c_rows[i] for i in common]
    if rule.metric == "gold_logprob":
        if any("ll" not in r or r.get("gold") is None for r in b + c):
            raise MissingData(f"{rule.task}/gold_logprob needs multiple-choice log-likelihoods with a gold index")
        return stats.paired_mean([stats.gold_logprob(r["ll"], r["gold"]) for r in b],
                                 [stats.gold_logprob(r["ll"], r["gold"]) for r in c], rule.alpha, True, seed)
    if rule.metric in PER_DOCUMENT:
        key = PER_DOCUMENT[rule.metric]
        if any("ll" not in r or (key and key not in r) for r in b + c):
            raise MissingData(f"{rule.name} needs per-document log-likelihoods{f' and {key}' if key else ''}")
        return stats.paired_perplexity([r["ll"] for r in b], [r["ll"] for r in c], [r[key] if key else 1 for r in b],
                                       rule.alpha, seed, bits=rule.metric == "bits_per_byte")
    if any(rule.metric not in r for r in b + c):
        raise MissingData(f"{rule.name}: the per-sample scores have no '{rule.metric}' — "
                          f"metrics there: {', '.join(sorted(k for k in b[0] if k not in ('doc_id', 'll', 'gold')))}")
    values_b, values_c = [r[rule.metric] for r in b], [r[rule.metric] for r in c]
    if rule.metric in BINARY:
        return stats.paired_binary(values_b, values_c, rule.alpha, seed)
    return stats.paired_mean(values_b, values_c, rule.alpha, rule.higher_is_better, seed)


def _rows(run: dict, task: str) -> dict:
    samples = run.get("samples") or {}
    if task not in samples:
        have = ", ".join(sorted(samples)) or "none"
        raise MissingData(f"{run['label']} has no per-sample scores for task '{task}' (tasks there: {have})")
    return {r["doc_id"]: r for r in samples[task]}


def _fidelity_test(base: dict, cand: dict, rule, seed: int):
    import numpy as np

    arrays = []
    for run in (base, cand):
        kld = run.get("per_chunk_kld")
        if kld is None:
            raise MissingData(f"{run['label']} has no per-token KLD (fidelity per_token file) for {rule.name}")
        arrays.append(np.asarray(kld))
    if arrays[0].shape != arrays[1].shape:
        raise MissingData(f"{rule.name}: baseline and candidate scored different tokens — use the same text and windows")
    return stats.paired_mean(arrays[0], arrays[1], rule.alpha, False, seed)  # over text windows
