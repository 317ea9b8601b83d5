"""Paired tests for baseline-vs-candidate on the same documents (or tokens).

Every function takes per-item values of both sides in the same order and returns the candidate's
degradation (positive = worse) with a one-sided p-value for "the candidate is worse", a 95 % bootstrap
interval of the degradation and the smallest degradation the test would detect with 80 % power.
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
    p_value: float  # one-sided: P(a drop this large | no true change)
    test: str
    detectable: float | None  # drop detectable at this alpha with 80 % power, from the observed spread
    # (None when both sides are identical and the spread is zero)
    n: int
    detail: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _z(alpha: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - alpha)


def binomial_tail(k: int, n: int) -> float:
    """P(X ≥ k) for X ~ Binomial(n, 1/2), exactly."""
    if k <= 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def _bootstrap(values, stat, seed: int):
    """Percentile 95 % interval of ``stat`` over resampled item indices; also returns the replicate array."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(values[0])
    reps = np.empty(BOOTSTRAP)
    for b in range(BOOTSTRAP):
        idx = rng.integers(0, n, n)
        reps[b] = stat(*(v[idx] for v in values))
    return (float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5))), reps


def paired_binary(base, cand, alpha: float, seed: int = 0) -> Paired:
    """0/1 scores (accuracy): exact one-sided McNemar on the discordant items."""
    import numpy as np

    b, c = np.asarray(base, float), np.asarray(cand, float)
    lost = int(((b == 1) & (c == 0)).sum())
    gained = int(((b == 0) & (c == 1)).sum())
    n = len(b)
    ci, _ = _bootstrap((b, c), lambda x, y: x.mean() - y.mean(), seed)
    discordant = (lost + gained) / n if n else 0.0
    # McNemar needs at least k lost documents (and none gained) with 0.5**k < alpha, whatever the spread
    floor = math.ceil(math.log2(1 / alpha)) / n if n else None
    detectable = max((_z(alpha) + Z_POWER) * math.sqrt(discordant / n), floor) if n else None
    return Paired(baseline=float(b.mean()), candidate=float(c.mean()), drop=float(b.mean() - c.mean()), ci95=ci,
                  p_value=binomial_tail(lost, lost + gained), test="McNemar exact, one-sided",
                  detectable=detectable, n=n, detail={"lost": lost, "gained": gained})


def paired_mean(base, cand, alpha: float, higher_is_better: bool = True, seed: int = 0) -> Paired:
    """Per-item values whose mean is the metric (gold log-probability, per-token KLD): paired bootstrap.

    p-value: share of bootstrap replicates of the mean degradation at or below zero (one-sided), +1 smoothed.
    """
    import numpy as np

    b, c = np.asarray(base, float), np.asarray(cand, float)
    sign = 1.0 if higher_is_better else -1.0
    d = sign * (b - c)  # per-item degradation
    ci, reps = _bootstrap((d,), lambda x: x.mean(), seed)
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    se = se or None  # identical sides: no spread to size a detectable drop from
    return Paired(baseline=float(b.mean()), candidate=float(c.mean()), drop=float(d.mean()), ci95=ci,
                  p_value=float(((reps <= 0).sum() + 1) / (len(reps) + 1)), test="paired bootstrap of the mean",
                  detectable=(_z(alpha) + Z_POWER) * se if se is not None else None, n=n, detail={})


def paired_perplexity(ll_base, ll_cand, counts, alpha: float, seed: int = 0, bits: bool = False) -> Paired:
    """Perplexity exp(-Σ ll / Σ count) over documents (words, bytes or tokens), or with ``bits`` the bits per
    count -Σ ll / (Σ count · ln 2) (lm-eval's bits_per_byte): paired document bootstrap."""
    import numpy as np

    b, c, w = (np.asarray(x, float) for x in (ll_base, ll_cand, counts))
    if bits:
        ppl = lambda ll, cnt: -ll.sum() / cnt.sum() / math.log(2)  # noqa: E731
    else:
        ppl = lambda ll, cnt: math.exp(-ll.sum() / cnt.sum())  # noqa: E731
    ci, reps = _bootstrap((b, c, w), lambda x, y, z: ppl(y, z) - ppl(x, z), seed)
    se = float(reps.std(ddof=1))
    return Paired(baseline=ppl(b, w), candidate=ppl(c, w), drop=ppl(c, w) - ppl(b, w), ci95=ci,
                  p_value=float(((reps <= 0).sum() + 1) / (len(reps) + 1)), test="paired document bootstrap",
                  detectable=(_z(alpha) + Z_POWER) * se if se else None, n=len(b), detail={})


def gold_logprob(ll: list[float], gold: int) -> float:
    """log P(gold | choices): log softmax over the choices' summed log-likelihoods."""
    top = max(ll)
    return ll[gold] - (top + math.log(sum(math.exp(x - top) for x in ll)))
