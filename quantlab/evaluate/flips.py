"""Flips: the documents whose correctness changed against fp, which a suite's accuracy hides.

Two models can score the same accuracy while answering different documents correctly; the share of documents
whose 0/1 score changed tracks how far a quantized model moved from its baseline (KLD does, accuracy does not;
Dutta et al. 2024, "Accuracy is Not All You Need", arXiv 2407.09141). Per task, on the task's primary 0/1 metric
(acc_norm where lm-eval has it, else acc), over the documents both models scored:

- right_to_wrong: the share fp scored 1 and the candidate 0;
- wrong_to_right: the share fp scored 0 and the candidate 1;
- flips: their sum.

Each share's 95 % interval is Wilson's score interval over documents (the documents are the independent unit;
both models scored the same ones, so the shares are paired by construction).
"""

from __future__ import annotations

import math

from quantlab.evaluate.accuracy import primary_metric

DEFINITION = ("flips = share of documents whose 0/1 score on the task's primary metric differs from fp's "
              "(right_to_wrong + wrong_to_right), over the documents both scored; 95 % Wilson score intervals")
BINARY_METRICS = ("acc_norm", "acc")
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> list[float]:
    """Wilson's score interval for a binomial share k / n."""
    if not n:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half)]


def binary_metric(rows: list[dict], preferred: str | None = None) -> str | None:
    """The 0/1 metric flips count: ``preferred`` (the task's primary metric) when it is 0/1 and scored, else
    acc_norm, else acc."""
    names = ([preferred] if preferred in BINARY_METRICS else []) + list(BINARY_METRICS)
    return next((m for m in names if rows and all(m in r for r in rows)), None)


def changed(base_rows: list[dict], cand_rows: list[dict], metric: str) -> tuple[list[int], list[int]]:
    """The two sides' 0/1 scores on the documents both scored, in doc_id order."""
    b = {r["doc_id"]: r[metric] for r in base_rows}
    c = {r["doc_id"]: r[metric] for r in cand_rows}
    docs = sorted(set(b) & set(c))
    return [int(b[d]) for d in docs], [int(c[d]) for d in docs]


def flips(base_rows: list[dict], cand_rows: list[dict], metric: str) -> dict:
    b, c = changed(base_rows, cand_rows, metric)
    n = len(b)
    lost = sum(1 for x, y in zip(b, c) if x == 1 and y == 0)
    gained = sum(1 for x, y in zip(b, c) if x == 0 and y == 1)
    shares = {"right_to_wrong": lost, "wrong_to_right": gained, "flips": lost + gained}
    return {"metric": metric, "documents": n, **{k: v / n if n else None for k, v in shares.items()},
            "counts": shares, "ci95": {k: wilson(v, n) for k, v in shares.items()}, "definition": DEFINITION}


def add_flips(recipes: list, accs: list, samples: list) -> None:
    """Each non-fp run's flips against the comparison's fp run, per task, into its accuracy record
    (``accuracy["flips"][task]``)."""
    fp = next((i for i, r in enumerate(recipes) if r.method == "fp"), None)
    if fp is None or not accs[fp]:
        return
    for i, acc in enumerate(accs):
        if i == fp or not acc:
            continue
        out = {}
        for task, info in acc["tasks"].items():
            base, cand = samples[fp].get(task), samples[i].get(task)
            metric = binary_metric(cand or [], primary_metric(info))
            if base and cand and metric and binary_metric(base, metric) == metric:
                out[task] = flips(base, cand, metric)
        acc["flips"] = out
