"""Paired tests for baseline-vs-candidate on the same documents (or text windows).

Every test takes per-item values of both sides in the same order and a ``margin``: the degradation the
policy tolerates. It tests the null "the candidate's true degradation is at most ``margin``" (positive =
worse, in the metric's units) against "it is more", one-sided, so a candidate within tolerance fails with
probability at most the level the p-value is compared to. It returns the degradation, its 95 % bootstrap
interval, that p-value and the degradation's standard error (from which the gate sizes the degradation the
test detects).

- 0/1 scores at margin 0: McNemar's exact test on the discordant documents.
- Everything else: a paired bootstrap whose replicates are recentred on the null (translation; Efron and
  Tibshirani 1993, section 16.4): p = (1 + #{rep - estimate >= estimate - margin}) / (B + 1). The replicates'
  spread about the estimate stands in for the estimate's spread about the truth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z_POWER = 0.8416  # z of 80 % power
BOOTSTRAP = 2000


@dataclass
class Paired:
    baseline: float
    candidate: float
    drop: float  # degradation in the metric's units: baseline - candidate if higher is better
    ci95: tuple[float, float]
    margin: float  # the null: true degradation <= margin
    p_value: float  # one-sided: P(a degradation this far beyond the margin | the true one is the margin)
    test: str
    se: float | None  # standard error of ``drop`` (None: both sides identical, no spread)
    n: int
    detail: dict

    def to_dict(self) -> dict:
        return asdict(self)


def z(level: float) -> float:
    """The standard normal's upper ``level`` quantile."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - level)


def binomial_upper(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p), exactly (a sum of terms computed in log space)."""
    if k <= 0 or p >= 1:
        return 1.0
    if p <= 0 or k > n:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def shifted_p(reps, estimate: float, margin: float) -> float:
    """One-sided bootstrap p-value of "true degradation <= margin" from replicates of the degradation,
    recentred on the null: the share of replicates at least as far above the estimate as the estimate is
    above the margin, +1 smoothed."""
    import numpy as np

    reps = np.asarray(reps, float)
    return float((np.count_nonzero(reps - estimate >= estimate - margin - 1e-12) + 1) / (reps.size + 1))


def _bootstrap(values, stat, seed: int):
    """Percentile 95 % interval of ``stat`` over resampled item indices; also returns the replicate array.
    ``stat`` maps arrays of shape (replicates, items) to one value per replicate."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(values[0])
    idx = rng.integers(0, n, (BOOTSTRAP, n))
    reps = np.asarray(stat(*(np.asarray(v)[idx] for v in values)), float)
    return (float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5))), reps


def _bootstrap_discordant(lost: int, gained: int, n: int, seed: int):
    """The document bootstrap of a paired 0/1 difference, drawn as what it is: resampling n documents draws
    (lost*, gained*, rest) ~ Multinomial(n; lost/n, gained/n, rest/n), and the replicate is (lost* - gained*) / n."""
    import numpy as np

    if not n:
        return (0.0, 0.0), np.zeros(BOOTSTRAP)
    rng = np.random.default_rng(seed)
    shares = np.array([lost, gained, n - lost - gained], float) / n
    counts = rng.multinomial(n, shares, size=BOOTSTRAP)
    reps = (counts[:, 0] - counts[:, 1]) / n
    return (float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5))), reps


def _se(reps) -> float | None:
    import numpy as np

    se = float(np.std(reps, ddof=1))
    return se or None


def paired_binary(base, cand, margin: float = 0.0, seed: int = 0) -> Paired:
    """0/1 scores (accuracy): McNemar's exact one-sided test at margin 0, else the recentred bootstrap."""
    import numpy as np

    b, c = np.asarray(base, float), np.asarray(cand, float)
    lost = int(((b == 1) & (c == 0)).sum())
    gained = int(((b == 0) & (c == 1)).sum())
    n = len(b)
    ci, reps = _bootstrap_discordant(lost, gained, n, seed)
    drop = float(b.mean() - c.mean())
    if margin > 0:
        p, test = shifted_p(reps, drop, margin), "paired bootstrap, recentred on the null"
    else:
        p, test = binomial_upper(lost, lost + gained, 0.5), "McNemar exact, one-sided"
    se = math.sqrt(max((lost + gained) / n - drop ** 2, 0.0) / n) if n else None
    return Paired(baseline=float(b.mean()), candidate=float(c.mean()), drop=drop, ci95=ci, margin=margin,
                  p_value=p, test=test, se=se or None, n=n, detail={"lost": lost, "gained": gained})


def paired_mean(base, cand, margin: float = 0.0, higher_is_better: bool = True, seed: int = 0) -> Paired:
    """Per-item values whose mean is the metric (gold log-probability, per-window KLD): the recentred paired
    bootstrap of the mean degradation."""
    import numpy as np

    b, c = np.asarray(base, float), np.asarray(cand, float)
    d = (1.0 if higher_is_better else -1.0) * (b - c)  # per-item degradation
    ci, reps = _bootstrap((d,), lambda x: x.mean(axis=1), seed)
    drop = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
    return Paired(baseline=float(b.mean()), candidate=float(c.mean()), drop=drop, ci95=ci, margin=margin,
                  p_value=shifted_p(reps, drop, margin), test="paired bootstrap of the mean, recentred on the null",
                  se=se or None, n=len(d), detail={})


def paired_flips(base, cand, margin: float = 0.0, seed: int = 0) -> Paired:
    """The share of documents whose 0/1 score changed (``quantlab.evaluate.flips``) against the null "true share
    ≤ margin": exact one-sided binomial test, p = P(Binomial(n, margin) ≥ changed). The baseline's share against
    itself is 0, so the degradation is the share."""
    import numpy as np

    b, c = np.asarray(base, float), np.asarray(cand, float)
    n = len(b)
    lost, gained = int(((b == 1) & (c == 0)).sum()), int(((b == 0) & (c == 1)).sum())
    share = (lost + gained) / n if n else 0.0
    reps = np.random.default_rng(seed).binomial(n, share, BOOTSTRAP) / n if n else np.zeros(BOOTSTRAP)
    se = math.sqrt(share * (1 - share) / n) if n else None
    return Paired(baseline=0.0, candidate=share, drop=share,
                  ci95=(float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5))), margin=margin,
                  p_value=binomial_upper(lost + gained, n, margin), test="exact binomial, one-sided", se=se or None,
                  n=n, detail={"lost": lost, "gained": gained})


def perplexity(ll, counts, bits: bool = False):
    """exp(-Σ ll / Σ count) over the last axis, or with ``bits`` -Σ ll / (Σ count · ln 2) (lm-eval's
    bits_per_byte)."""
    import numpy as np

    ll, counts = np.asarray(ll, float), np.asarray(counts, float)
    per_count = -ll.sum(axis=-1) / counts.sum(axis=-1)
    return per_count / math.log(2) if bits else np.exp(per_count)


def paired_perplexity(ll_base, ll_cand, counts, margin: float = 0.0, seed: int = 0, bits: bool = False) -> Paired:
    """``perplexity`` over documents (words, bytes or tokens), or bits per count: the recentred paired document
    bootstrap of its degradation."""
    import numpy as np

    b, c, w = (np.asarray(x, float) for x in (ll_base, ll_cand, counts))
    ci, reps = _bootstrap((b, c, w), lambda x, y, z: perplexity(y, z, bits) - perplexity(x, z, bits), seed)
    base, cand = float(perplexity(b, w, bits)), float(perplexity(c, w, bits))
    return Paired(baseline=base, candidate=cand, drop=cand - base, ci95=ci, margin=margin,
                  p_value=shifted_p(reps, cand - base, margin), test="paired document bootstrap, recentred on the null",
                  se=_se(reps), n=len(b), detail={})


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values: reject where adjusted p < alpha and the family-wise error rate is at
    most alpha, whatever the tests' dependence."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def detectable(test: Paired, level: float, binary: bool) -> float | None:
    """The true degradation this test detects with 80 % power at ``level``: margin + (z(level) + z(0.8)) · se.
    0/1 scores need at least ceil(log2(1/level)) lost documents whatever the spread."""
    if not test.n:
        return None
    floor = math.ceil(math.log2(1 / level)) / test.n if binary else None
    if test.se is None:
        return test.margin + floor if floor is not None else None
    found = test.margin + (z(level) + Z_POWER) * test.se
    return max(found, test.margin + floor) if floor is not None else found


def _log_softmax_at(scores: list[float], i: int) -> float:
    top = max(scores)
    return scores[i] - (top + math.log(sum(math.exp(x - top) for x in scores)))


def gold_logprob(ll: list[float], gold: int, lengths: list[int]) -> float:
    """log of the gold choice's share of a softmax over the choices' length-normalised log-likelihoods
    ll_j / len_j, len_j the length of choice j's text as lm-eval's acc_norm divides by it: acc_norm's argmax made
    soft. Chance is log(1 / choices)."""
    return _log_softmax_at([x / max(n, 1) for x, n in zip(ll, lengths)], gold)


def gold_logprob_sum(ll: list[float], gold: int) -> float:
    """log P(gold | choices) over the choices' summed log-likelihoods (acc's argmax made soft). Long choices
    dominate it: a choice of many tokens has a far lower sum whatever its per-token fit."""
    return _log_softmax_at(ll, gold)
