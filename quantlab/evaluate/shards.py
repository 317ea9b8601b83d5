"""Merge ``quantlab eval --shard I/N --output`` files into one output, as if run unsharded.

Shards of one task run on disjoint documents (i, i+n, ...), so per-document scores concatenate. A mean
metric (acc, acc_norm, ...) is recomputed from them with lm-eval's own standard error (sample standard
deviation / sqrt(n)); a metric lm-eval aggregates otherwise (perplexities) cannot be rebuilt from shards and
is an error naming the task. Everything else must agree across shards: model, artifact, tasks, settings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from quantlab.errors import UsageError
from quantlab.fsutil import atomic_write_json

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
        acc["tasks"][task] = _merged_task(task, info, rows)
    # Each shard's own provenance (they may have run from different checkouts or machines).
    provs = [r.get("provenance") or {} for r in runs]
    prov = {**provs[0], "shards": [
        {"output": name, "shard": f"{s['shard'][0]}/{s['shard'][1]}", "git_sha": pr.get("git_sha"),
         "versions": pr.get("versions"), "device": pr.get("device"), "wall_s": r["accuracy"].get("wall_s")}
        for name, s, r, pr in zip(names, settings, runs, provs)]}
    return {**outputs[0], "runs": [{**runs[0], "accuracy": acc, "provenance": prov}], "merged_from": names}


def _merged_task(task: str, info: dict, rows: list[dict]) -> dict:
    metrics, stderr = {}, {}
    for metric in info["metrics"]:
        values = [row.get(metric) for row in rows]
        if any(not isinstance(v, (int, float)) for v in values):
            raise UsageError(f"{task}'s {metric} is not a per-document mean, so shards cannot be merged — "
                             "run that task unsharded")
        mean = sum(values) / len(values)
        metrics[metric] = mean
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        stderr[metric] = math.sqrt(var / len(values))
    return {**info, "metrics": metrics, "stderr": stderr, "n": len(rows),
            "n_total": info["n_total"]}
