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
else must agree across shards, or the merge is refused before anything is written, naming two shard files that
differ: the model (recipe and artifact), the tasks and settings, each task's data (the sha256 of its files),
lm-eval task version, few-shot count and size. The shards must be one --shard I/N each of 0..N-1, each holding
only its own documents, together every document once. ``--output`` must be none of the shards and a file quantlab
may replace (``quantlab.outputs.check_output_file``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from quantlab import resultfile as rf
from quantlab.errors import UsageError
from quantlab.evaluate.accuracy import SUITE_DEFINITIONS
from quantlab.evaluate.harness import COUNTS, HarnessSettings, lm_eval_tasks_dir, offline_env
from quantlab.outputs import check_output_file, write_output_file

# lm-eval's default aggregation of the metrics quantlab's built-in tasks report, for outputs written before the
# aggregation was recorded per task
_DEFAULT_AGGREGATION = {"acc": "mean", "acc_norm": "mean", "perplexity": "perplexity",
                        "word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
                        "bits_per_byte": "bits_per_byte"}
_SAME = ("tasks", "batch_size", "max_length", "num_fewshot", "bootstrap_iters", "data_dir", "include_path", "limit")
# what each task's record must agree on across shards: the documents (data, size) and how they are scored
_SAME_TASK = (("files", "data"), ("n_total", "document count"), ("version", "lm-eval task version"),
              ("num_fewshot", "few-shot count"), ("output_type", "output type"))
WHAT = "a `quantlab eval --shard I/N --output` file"
# what the merge reads of a shard output (quantlab.resultfile checks it on load)
_SHARD_ACCURACY = rf.Fields({**rf.ACCURACY.fields, "tasks": rf.Values(rf.Fields(rf.TASK.fields,
                                                                                required=("metrics", "n_total"))),
                             "wall_s": rf.Opt(rf.NUMBER), "cpu_s": rf.Opt(rf.NUMBER)},
                            required=("tasks", "samples", "settings"))
SHARD = rf.Fields({"runs": rf.Each(rf.Fields({"recipe": rf.TEXT, "artifact": rf.Opt(rf.TEXT),
                                              "provenance": rf.Opt(rf.MAPPING), "accuracy": _SHARD_ACCURACY},
                                             required=("recipe", "accuracy")))}, required=("runs",))


def merge_shard_files(paths: list[str], output: str) -> dict:
    """Read, check and merge the shard files; write the merged output to ``output``, which is checked first."""
    _check_paths(paths, output)
    merged = merge_shards([_read(p) for p in paths], paths)
    write_output_file(output, (json.dumps(merged, indent=2, default=str) + "\n").encode(), "--output")
    return merged


def _check_paths(paths: list[str], output: str) -> None:
    """No shard given twice, --output none of them (the merge would replace a shard it read) and a file quantlab
    may write."""
    seen: dict[Path, str] = {}
    for p in paths:
        key = Path(p).resolve()
        if key in seen:
            raise UsageError(f"{p} is given twice{f' (as {seen[key]})' if seen[key] != p else ''} — give each "
                             "shard's output once")
        seen[key] = p
    if Path(output).resolve() in seen:
        raise UsageError(f"--output {output} is one of the shards being merged — write the merged output elsewhere")
    check_output_file(output, "--output")


def _read(path: str) -> dict:
    """A shard output whose fields the merge reads have their types (one-line error naming the field)."""
    data = rf.read_json(path, WHAT)
    rf.check(data, SHARD, path)
    if len(data["runs"]) != 1:
        raise UsageError(f"{path} holds {len(data['runs'])} runs, where a shard output holds one — give {WHAT}")
    return data


def merge_shards(outputs: list[dict], names: list[str]) -> dict:
    runs = [o["runs"][0] for o in outputs]
    settings = [r["accuracy"]["settings"] for r in runs]
    _check_indices([s.get("shard") for s in settings], names)
    _check_same(runs, names)
    acc = {**runs[0]["accuracy"], "settings": {**settings[0], "shard": None, "merged_from": len(runs)},
           "wall_s": sum(r["accuracy"].get("wall_s") or 0 for r in runs),
           "cpu_s": sum(r["accuracy"].get("cpu_s") or 0 for r in runs)}
    acc["samples"], acc["tasks"] = {}, {}
    for task, info in runs[0]["accuracy"]["tasks"].items():
        rows = _task_rows(task, info, runs, names)
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


def _check_indices(shards: list, names: list[str]) -> None:
    """Each file one shard I/N of the same N, together 0..N-1 once each."""
    for name, shard in zip(names, shards):
        if not shard:
            raise UsageError(f"{name} is not a shard output (it ran without --shard) — give only the outputs of "
                             "quantlab eval --shard I/N")
        if not (shard[1] >= 2 and 0 <= shard[0] < shard[1]):
            raise UsageError(f"{name} says it is shard {shard[0]}/{shard[1]}, which is not a shard — rerun it")
    n = shards[0][1]
    by_index: dict[int, str] = {}
    for name, (i, count) in zip(names, shards):
        if count != n:
            raise UsageError(f"{names[0]} is shard {shards[0][0]}/{n}, {name} is shard {i}/{count} — merge the shards "
                             "of one split (the same N)")
        if i in by_index:
            raise UsageError(f"{by_index[i]} and {name} are both shard {i}/{n} — give each shard's output once")
        by_index[i] = name
    missing = [f"{i}/{n}" for i in range(n) if i not in by_index]
    if missing:
        raise UsageError(f"Shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing: the outputs "
                         f"{', '.join(names)} do not cover 0/{n}..{n - 1}/{n} — give every shard's output once")


def _check_same(runs: list[dict], names: list[str]) -> None:
    """Every shard of one model, with the same settings, tasks and, per task, the same data and scoring."""
    first, name0 = runs[0], names[0]
    for run, name in zip(runs[1:], names[1:]):
        for key, what in (("recipe", "recipe"), ("artifact", "model (artifact)")):
            if run.get(key) != first.get(key):
                raise UsageError(f"{name0} and {name} are of different models ({what} {first.get(key)} vs "
                                 f"{run.get(key)}) — merge the shards of one model only")
        a, b = first["accuracy"], run["accuracy"]
        for key in _SAME:
            if json.dumps(a["settings"].get(key)) != json.dumps(b["settings"].get(key)):
                raise UsageError(f"{name0} and {name} ran with different {key} ({a['settings'].get(key)} vs "
                                 f"{b['settings'].get(key)}) — rerun the shards with the same options")
        for holds in ("tasks", "samples"):
            if set(a[holds]) != set(b[holds]) or set(a[holds]) != set(a["tasks"]):
                raise UsageError(f"{name0} and {name} hold {holds} of different tasks ({', '.join(sorted(a[holds]))} "
                                 f"vs {', '.join(sorted(b[holds]))}) — rerun the shards with the same --tasks")
        for task in a["tasks"]:
            for key, what in _SAME_TASK:
                x, y = _task_fact(a["tasks"][task], key), _task_fact(b["tasks"][task], key)
                if x != y:
                    raise UsageError(f"{name0} and {name} scored {task} with different {what} ({_fact(x)} vs "
                                     f"{_fact(y)}) — rerun the shards on the same data and lm-eval")


def _task_fact(info: dict, key: str):
    if key == "files":  # the data's sha256, not its paths: shards may run on machines that keep it elsewhere
        return sorted((info.get("files") or {}).values())
    return info.get(key)


def _fact(value) -> str:
    if isinstance(value, list):  # the data's sha256
        return "sha256 " + (", ".join(str(v)[:12] for v in value) or "none")
    return str(value)


def _task_rows(task: str, info: dict, runs: list[dict], names: list[str]) -> list[dict]:
    """The task's rows of every shard in doc_id order: each shard holds only its own documents (i, i+n, ...), each
    once, and together every document of the task."""
    rows, seen = [], set()
    for run, name in zip(runs, names):
        i, n = run["accuracy"]["settings"]["shard"]
        for row in run["accuracy"]["samples"][task]:
            doc = row["doc_id"]
            if doc % n != i:
                raise UsageError(f"{name} is shard {i}/{n} but holds document {doc} of {task}, which belongs to shard "
                                 f"{doc % n}/{n} — rerun it")
            if doc in seen:
                raise UsageError(f"{name} holds document {doc} of {task} twice — rerun that shard")
            seen.add(doc)
            rows.append(row)
    if info.get("n_total") is not None and len(rows) != info["n_total"]:
        raise UsageError(f"The shards hold {len(rows)} of {task}'s {info['n_total']} documents — a shard output is "
                         "incomplete; rerun it")
    return sorted(rows, key=lambda row: row["doc_id"])


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
