"""The gate's error rates, measured: simulated candidates with known true drops on real per-document scores.

    .venv/bin/python scripts/bench_gate.py [--replicates 1000] [--sizes 100,300,1000] [--churn 0,0.1]
        [--recipes DIR]   # also: the real recipes' verdicts on disjoint 100-document slices

The baseline is SmolLM2-135M's fp run on the full arc_easy, hellaswag and piqa sets
(reports/smollm2-135m-suites/fp-*-full.json, per-document 0/1 scores). A candidate with true drop d is made
on the full set: round(d * N) of the documents fp answers correctly are flipped to wrong at random, and with
churn c another round(c * N / 2) correct ones are flipped to wrong and as many wrong ones to right (a real
quantized model changes answers both ways; its net drop stays d). Each replicate draws one random subset of
n documents per task (the same for both sides), runs the gate's tests of the policy's 0/1 metrics at their
margins, with Holm's correction across them, exactly as ``quantlab gate`` does, and counts a false fail when
any metric is judged a regression. Every metric carries the same true drop at once: the worst case for the
family-wise rate.

The policy's gold_logprob metrics are not simulated (flipping answers defines no log-likelihoods); with them
in the family Holm's correction only grows, so the rates here bound the full policy's false-fail rate.

With ``--recipes DIR`` (``quantlab eval ... --output DIR/<recipe>.json`` files, fp.json among them, each task
scored on the same first documents) the real recipes are gated against fp with the policy, exactly as
``quantlab gate`` does, on each disjoint slice of ``--slice`` documents and on all of them together: how stable
a verdict on one slice is. Rules of tasks the files lack are left out of the family.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlab.evaluate.flips import wilson  # noqa: E402
from quantlab.gate import compare, judge, margin, stats  # noqa: E402
from quantlab.gate.policy import BINARY, Policy, load_policy  # noqa: E402
from quantlab.gate.refs import load_ref  # noqa: E402
from quantlab.provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL = [ROOT / "reports/smollm2-135m-suites/fp-arc_easy-piqa-full.json",
        ROOT / "reports/smollm2-135m-suites/fp-hellaswag-full.json"]


def load_scores(paths) -> dict[str, list[dict]]:
    out = {}
    for path in paths:
        for task, rows in json.loads(path.read_text())["runs"][0]["accuracy"]["samples"].items():
            out[task] = rows
    return out


def candidate(correct, drop: float, churn: float, rng):
    """fp's 0/1 scores with round(drop * N) correct answers made wrong, plus churn both ways (net zero)."""
    import numpy as np

    n = correct.size
    right, wrong = np.flatnonzero(correct == 1), np.flatnonzero(correct == 0)
    swap = int(round(churn * n / 2))
    lose = int(round(drop * n)) + swap
    if lose > right.size or swap > wrong.size:
        raise SystemExit(f"drop {drop} with churn {churn} needs more documents than the task has")
    cand = correct.copy()
    cand[rng.choice(right, lose, replace=False)] = 0
    cand[rng.choice(wrong, swap, replace=False)] = 1
    return cand


def sliced(run: dict, docs: set) -> dict:
    """The run with only the documents ``docs`` of each task."""
    return {**run, "samples": {t: [r for r in rows if r["doc_id"] in docs] for t, rows in run["samples"].items()}}


def real_recipes(folder: Path, policy: Policy, size: int, seed: int) -> None:
    """Each recipe's verdict against fp on each disjoint slice of ``size`` documents, and on all of them."""
    runs = {p.stem: load_ref(str(p))[0] for p in sorted(folder.glob("*.json"))}
    fp = runs.pop("fp")
    tasks = set(fp["samples"])
    rules = tuple(r for r in policy.rules if r.task in tasks)
    family = Policy(policy.name, policy.alpha, rules, policy.inconclusive)
    n = min(len(rows) for rows in fp["samples"].values())
    docs = sorted({r["doc_id"] for r in next(iter(fp["samples"].values()))})[:n]
    slices = [set(docs[i:i + size]) for i in range(0, n - size + 1, size)] + [set(docs)]
    print(f"\nReal recipes against fp ({folder}): {', '.join(sorted(tasks))}, {n} documents each; the policy's "
          f"{len(rules)} metrics of those tasks ({', '.join(r.name for r in rules)}), Holm across them; "
          f"left out: {', '.join(r.name for r in policy.rules if r not in rules) or 'none'}")
    print(f"slice k = documents {size}k .. {size}(k+1) - 1 of each task (disjoint); 'all' = the {n} together. "
          "Per metric: P pass, I inconclusive, R regression, E error; then the comparison's verdict")
    labels = [f"slice {k}" for k in range(len(slices) - 1)] + ["all"]
    print(f"{'recipe':<14}" + "".join(f"{label:>{len(rules) + 15}}" for label in labels))
    for name, run in runs.items():
        cells = []
        for part in slices:
            comp = compare(sliced(fp, part), sliced(run, part), family, seed)
            by_name = {m["metric"]: m["verdict"] for m in comp["metrics"]}
            code = "".join(by_name[r.name][0].upper() for r in rules)
            cells.append(f"{code} {comp['verdict']:<12}")
        print(f"{name:<14}" + "".join(f"{c:>{len(rules) + 15}}" for c in cells))


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default=str(ROOT / "experiments/gates/default.yaml"))
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--sizes", default="100,300,1000")
    ap.add_argument("--churn", default="0,0.1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", type=Path, default=None, help="folder of eval outputs, fp.json among them")
    ap.add_argument("--slice", type=int, default=100)
    args = ap.parse_args()
    policy = load_policy(args.policy)
    scores = load_scores(FULL)
    rules = [r for r in policy.rules if r.metric in BINARY and r.task in scores]
    left = [r.name for r in policy.rules if r not in rules]
    tolerances = {r.max_drop for r in rules}
    if len(tolerances) != 1 or None in tolerances:
        raise SystemExit("this bench needs the policy's 0/1 metrics to share one max_drop")
    tol = tolerances.pop()
    sizes = [int(x) for x in args.sizes.split(",")]
    churns = [float(x) for x in args.churn.split(",")]
    drops = [0.0, tol / 2, tol, 2 * tol]
    base = {r.name: np.array([row[r.metric] for row in scores[r.task]], float) for r in rules}
    print(f"$ .venv/bin/python scripts/bench_gate.py {' '.join(sys.argv[1:])}")
    print(f"policy {args.policy}: alpha {policy.alpha:g} family-wise (Holm), inconclusive {policy.inconclusive}; "
          f"simulated metrics {', '.join(r.name for r in rules)} (max_drop {tol:g} each); not simulated: "
          f"{', '.join(left) or 'none'}")
    print("baseline: " + ", ".join(f"{name} {v.mean():.4f} over {v.size} documents" for name, v in base.items()))
    print(f"{args.replicates} replicates per row; a replicate draws one random subset of n documents per task")
    print("fail = any metric judged a regression (family-wise); ± = Wilson 95 % interval of the rate; "
          "inconclusive = share of replicates with a metric judged inconclusive; detectable = median over replicates "
          "of the first metric's detectable drop")
    print(f"{'churn':>6}{'n':>6}{'true drop':>11}  {'fail rate':<22}{'per metric':<26}{'inconclusive':>13}{'detectable':>12}")
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    rows = []
    for churn in churns:
        for n in sizes:
            for drop in drops:
                fails, per_metric, inconclusive, found = 0, [0] * len(rules), 0, []
                for rep in range(args.replicates):
                    tested = []
                    for rule in rules:
                        fp = base[rule.name]
                        cand = candidate(fp, drop, churn, rng)
                        pick = rng.choice(fp.size, n, replace=False)
                        b, c = fp[pick], cand[pick]
                        tested.append((rule, stats.paired_binary(b, c, margin(rule, b.mean()), seed=rep)))
                    adjusted = stats.holm([t.p_value for _, t in tested])
                    verdicts = [judge(rule, t, p, policy, len(tested)) for (rule, t), p in zip(tested, adjusted)]
                    bad = [v["verdict"] == "regression" for v in verdicts]
                    fails += any(bad)
                    per_metric = [k + x for k, x in zip(per_metric, bad)]
                    inconclusive += any(v["verdict"] == "inconclusive" for v in verdicts)
                    found.append(verdicts[0]["detectable"])
                rate = fails / args.replicates
                lo, hi = wilson(fails, args.replicates)
                kind = "false fail" if drop <= tol + 1e-12 else "power"
                shares = "/".join(f"{k / args.replicates:.3f}" for k in per_metric)
                print(f"{churn:>6g}{n:>6}{drop:>11.4g}  {rate:.3f} [{lo:.3f}, {hi:.3f}] {kind:<6}  {shares:<26}"
                      f"{inconclusive / args.replicates:>13.3f}{float(np.median(found)):>12.4f}")
                rows.append({"churn": churn, "n": n, "drop": drop, "rate": rate, "kind": kind, "ci95": [lo, hi]})
    worst = max((r for r in rows if r["kind"] == "false fail"), key=lambda r: r["rate"])
    print(f"highest false-fail rate at a true drop ≤ max_drop: {worst['rate']:.3f} [{worst['ci95'][0]:.3f}, "
          f"{worst['ci95'][1]:.3f}] (churn {worst['churn']:g}, n {worst['n']}, drop {worst['drop']:g}); alpha "
          f"{policy.alpha:g}")
    for churn in churns:
        reach = [r["n"] for r in rows if r["churn"] == churn and r["kind"] == "power" and r["rate"] >= 0.8]
        print(f"churn {churn:g}: power ≥ 0.8 at 2 x max_drop from n = {min(reach) if reach else 'none of ' + args.sizes}")
    files = FULL + (sorted(args.recipes.glob("*.json")) if args.recipes else [])
    if args.recipes:
        real_recipes(args.recipes, policy, args.slice, args.seed)
    prov = provenance("cpu", seeds={"bench": args.seed}, data={p.name: _sha(p) for p in files})
    print(f"wall {time.perf_counter() - started:.0f} s; versions numpy {np.__version__}; git {prov.get('git_sha')}; "
          f"data sha256 {', '.join(f'{k} {v[:12]}' for k, v in prov['data_sha256'].items())}")


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    main()
