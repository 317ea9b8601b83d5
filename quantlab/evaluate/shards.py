"""Merge ``quantlab eval --shard I/N --output`` files into one output, as if run unsharded.

Shards of one task run on disjoint documents (i, i+n, ...), so per-document scores concatenate, and each
metric is aggregated from them the way lm-eval aggregates it (the function each task names, recorded per task
as ``aggregation``; lm_eval/api/metrics.py):

- ``mean`` (acc, acc_norm, ...): the mean over documents, stderr sample standard deviation / sqrt(n);
- ``perplexity`` (lambada_openai): exp(-mean per-document log-likelihood of the target), stderr lm-eval's own
  bootstrap of it (the same draws as an unsharded run: ``bootstrap_iters``, seeded per chunk);
- ``weighted_perplexity`` (word_perplexity, byte_perplexity) and ``bits_per_byte`` (loglikelihood_rolling tasks):
  exp(-Σ log-likelihood / Σ words or bytes) and -Σ log-likelihood / (Σ bytes · ln 2), no stderr (lm-eval gives
  none).

A metric aggregated otherwise, or without its per-document values, is an error naming the task. Everything
else must agree across shards: model, artifact, tasks, settings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from quantlab.errors import UsageError
from quantlab.evaluate.accuracy import SUITE_DEFINITIONS
from quantlab.evaluate.harness import COUNTS, HarnessSettings, lm_eval_tasks_dir, offline_env
from quantlab.fsutil import atomic_write_json

# lm-eval's default aggregation of the metrics quantlab's built-in tasks report, for outputs written before the
# aggregation was recorded per task
_DEFAULT_AGGREGATION = {"acc": "mean", "acc_norm": "mean", "perplexity": "perplexity",
                        "word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
                        "bits_per_byte": "bits_per_byte"}
_SAME = ("tasks", "batch_size", "max_length", "num_fewshot", "bootstrap_iters", "data_dir", "include_path")


def merge_shard_files(paths: list[str], output: str) -> dict:
    merged = merge_shards([_read(p) for p in paths], paths)
    atomic_write_json(output, merged)
    return merged


def _read(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
        return data if data["runs"][0]["accuracy"]["settings"] else {}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise UsageError(f"{path} is not a `quantlab eval --output` file with suite accuracy — give the shard outputs") from None


def merge_shards(outputs: list[dict], names: list[str]) -> dict:
    runs = [o["runs"][0] for o in outputs]
    settings = [r["accuracy"]["settings"] for r in runs]
    shards = sorted(tuple(s.get("shard") or ()) for s in settings)
    n = shards[0][1] if shards and shards[0] else len(runs)
    if shards != [(i, n) for i in range(n)]:
        have = [f"{a}/{b}" for a, b in (s for s in shards if s)]
        missing = [f"{i}/{n}" for i in range(n) if (i, n) not in shards]
        raise UsageError(f"The outputs {', '.join(names)} are shards {', '.join(have) or 'none'}, which do not cover "
                         f"0/{n}..{n - 1}/{n} exactly once (missing: {', '.join(missing) or 'none'}) — give every "
                         "shard's output once")
    for key in ("artifact", "recipe"):
        if len({r[key] for r in runs}) > 1:
            raise UsageError(f"The shards disagree on {key} — merge outputs of one model only")
    for key in _SAME:
        if len({json.dumps(s.get(key)) for s in settings}) > 1:
            raise UsageError(f"The shards disagree on {key} — rerun them with the same options")
    acc = {**runs[0]["accuracy"], "settings": {**settings[0], "shard": None, "merged_from": len(runs)},
           "wall_s": sum(r["accuracy"].get("wall_s") or 0 for r in runs),
           "cpu_s": sum(r["accuracy"].get("cpu_s") or 0 for r in runs)}
    acc["samples"], acc["tasks"] = {}, {}
    for task, info in runs[0]["accuracy"]["tasks"].items():
        rows = sorted((row for r in runs for row in r["accuracy"]["samples"][task]), key=lambda row: row["doc_id"])
        acc["samples"][task] = rows
        acc["tasks"][task] = _merged_task(task, info, rows, settings[0].get("bootstrap_iters", HarnessSettings.bootstrap_iters))
    # Each shard's own provenance (they may have run from different checkouts or machines).
    provs = [r.get("provenance") or {} for r in runs]
    prov = {**provs[0], "shards": [
        {"output": name, "shard": f"{s['shard'][0]}/{s['shard'][1]}", "git_sha": pr.get("git_sha"),
         "versions": pr.get("versions"), "device": pr.get("device"), "wall_s": r["accuracy"].get("wall_s")}
        for name, s, r, pr in zip(names, settings, runs, provs)]}
    return {**outputs[0], "runs": [{**runs[0], "accuracy": acc, "provenance": prov}], "merged_from": names,
            "definitions": {**(outputs[0].get("definitions") or {}), **SUITE_DEFINITIONS}}


def _merged_task(task: str, info: dict, rows: list[dict], bootstrap_iters: int) -> dict:
    metrics, stderr = {}, {}
    for metric in info["metrics"]:
        how = (info.get("aggregation") or {}).get(metric) or _DEFAULT_AGGREGATION.get(metric)
        if how is None:
            raise UsageError(f"{task}'s {metric} has no recorded aggregation (an output from before quantlab kept "
                             "lm-eval's) — evaluate the shards again, or run that task unsharded")
        metrics[metric], stderr[metric] = _aggregate(task, metric, how, rows, bootstrap_iters)
    return {**info, "metrics": metrics, "stderr": stderr, "n": len(rows),
            "n_total": info["n_total"]}


def _aggregate(task: str, metric: str, how: str, rows: list[dict], bootstrap_iters: int):
    """(value, stderr) of one metric over the documents' rows, as lm-eval aggregates it (stderr None where
    lm-eval gives none: one document, no bootstrap iterations, or a weighted perplexity)."""
    if how in ("weighted_perplexity", "bits_per_byte"):
        count = COUNTS.get(metric)
        if count is None or any(not isinstance(row.get(k), (int, float)) for row in rows for k in ("ll", count)):
            raise UsageError(f"{task}'s {metric} needs each document's log-likelihood and {count or 'count'}, which "
                             "the shards do not hold — evaluate them again, or run that task unsharded")
        per_count = -sum(row["ll"] for row in rows) / sum(row[count] for row in rows)
        return (math.exp(per_count) if how == "weighted_perplexity" else per_count / math.log(2)), None
    if how not in ("mean", "perplexity"):
        raise UsageError(f"{task}'s {metric} is aggregated by lm-eval's {how}, which quantlab cannot rebuild from "
                         "shards — run that task unsharded")
    values = [row.get(metric) for row in rows]
    if any(not isinstance(v, (int, float)) for v in values):
        raise UsageError(f"{task}'s {metric} lacks per-document values in the shards, so they cannot be merged — "
                         "evaluate them again, or run that task unsharded")
    mean = sum(values) / len(values)
    if bootstrap_iters <= 0 or len(values) < 2:
        return (mean if how == "mean" else math.exp(-mean)), None
    if how == "mean":
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    return math.exp(-mean), _bootstrap_perplexity(values, bootstrap_iters)


def _bootstrap_perplexity(lls: list[float], iters: int) -> float:
    """lm-eval's bootstrap standard error of exp(-mean ll), its own function on the documents in order."""
    import contextlib
    import io

    lm_eval_tasks_dir()  # lm-eval installed, or the error saying how
    offline_env()
    from lm_eval.api.metrics import bootstrap_stderr, perplexity

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return bootstrap_stderr(perplexity, lls, iters)
