"""How much of its PTQ twin's damage a trained (QAT) recipe recovers, with a paired bootstrap interval.

recovered = (PTQ − QAT) / (PTQ − fp), torchao's definition, for mean KLD (fp's is 0) and token-level
perplexity. Both recipes were scored on the same text chunks, so the interval resamples chunks jointly.
"""

from __future__ import annotations

from pathlib import Path

from quantlab.evaluate.accuracy import primary_metric
from quantlab.methods import get_method

DEFINITION = ("recovered fraction = (PTQ - QAT) / (PTQ - fp) of the PTQ twin's degradation (same format, no "
              "training), for mean KLD (fp = 0) and token-level perplexity; 1 = all recovered, 0 = none, "
              "< 0 = worse than PTQ; 95 % interval from a paired bootstrap over text chunks")


def _fractions(q: dict, p: dict, rows) -> dict:
    import numpy as np

    kl_q, kl_p = q["kl"][rows].mean(), p["kl"][rows].mean()
    ppl_q, ppl_p = np.exp(q["nll"][rows].mean()), np.exp(p["nll"][rows].mean())
    ppl_fp = np.exp(p["nll_baseline"][rows].mean())
    return {"kld": float((kl_p - kl_q) / kl_p) if kl_p > 0 else None,
            "ppl": float((ppl_p - ppl_q) / (ppl_p - ppl_fp)) if ppl_p > ppl_fp else None}


def recovery(trained_npz: str | Path, twin_npz: str | Path, twin: str, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Recovered fractions of ``trained`` over ``twin`` from their per-token fidelity files."""
    import numpy as np

    q, p = (dict(np.load(str(f))) for f in (trained_npz, twin_npz))
    n = q["kl"].shape[0]
    point = _fractions(q, p, np.arange(n))
    rng = np.random.default_rng(seed)
    samples = [_fractions(q, p, rng.integers(0, n, size=n)) for _ in range(bootstrap)]
    ci = {}
    for key in point:  # undefined when the twin is not worse than fp (nothing to recover)
        values = [s[key] for s in samples if s[key] is not None]
        ci[key] = ([float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
                   if point[key] is not None and values else None)
    return {"twin": twin, **point, "ci95": ci, "definition": DEFINITION}


ACCURACY_DEFINITION = ("recovered fraction = (QAT - PTQ) / (fp - PTQ) of the task metric the PTQ twin lost; 95 % "
                       "interval from a paired bootstrap over documents (fp, PTQ and QAT scored the same documents)")


def accuracy_recovery(fp_rows: list[dict], twin_rows: list[dict], trained_rows: list[dict], metric: str,
                      twin: str, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Recovered fraction of a per-document 0/1 (or mean) task metric, e.g. hellaswag acc_norm."""
    import numpy as np

    by_doc = [{r["doc_id"]: r[metric] for r in rows} for rows in (fp_rows, twin_rows, trained_rows)]
    docs = sorted(set(by_doc[0]) & set(by_doc[1]) & set(by_doc[2]))
    f, p, q = (np.array([d[i] for i in docs], float) for d in by_doc)

    def frac(rows):
        lost = f[rows].mean() - p[rows].mean()
        return float((q[rows].mean() - p[rows].mean()) / lost) if lost > 0 else None

    n = len(docs)
    point = frac(np.arange(n))
    rng = np.random.default_rng(seed)
    values = [v for v in (frac(rng.integers(0, n, size=n)) for _ in range(bootstrap)) if v is not None]
    ci = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if point is not None and values else None
    return {"twin": twin, "metric": metric, "recovered": point, "ci95": ci, "documents": n,
            "definition": ACCURACY_DEFINITION}


def add_recoveries(recipes: list, fids: list[dict], npz: dict[str, str], settings) -> None:
    """Each trained recipe's recovered fraction over its PTQ twin, into its fidelity record."""
    for recipe, fid in zip(recipes, fids):
        twin = get_method(recipe.method).ptq_twin(recipe.config)
        if twin and twin in npz:
            fid["recovery"] = recovery(npz[recipe.name], npz[twin], twin, settings.bootstrap, settings.seed)


def add_accuracy_recoveries(recipes: list, accs: list, samples: list) -> None:
    """Each trained recipe's recovered fraction of its twin's lost task accuracy (primary metric per task)."""
    index = {r.name: i for i, r in enumerate(recipes)}
    fp = next((i for i, r in enumerate(recipes) if r.method == "fp"), None)
    for i, recipe in enumerate(recipes):
        twin = get_method(recipe.method).ptq_twin(recipe.config)
        if fp is None or twin not in index or not accs[i]:
            continue
        out = {}
        for task, info in accs[i]["tasks"].items():
            metric = primary_metric(info)
            if metric in ("acc", "acc_norm"):
                out[task] = accuracy_recovery(samples[fp][task], samples[index[twin]][task], samples[i][task],
                                              metric, twin)
        accs[i]["recovery"] = out
