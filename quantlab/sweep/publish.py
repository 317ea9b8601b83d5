"""A finished run set's outputs per model: results.json (a gate reference; quantize-and-compare prints it)
with its per-token values and per-sample scores copied beside it, and the HTML report. The jobs' mutual
checks (garbage guard against peers, recoveries, calibration overlaps) are added here, see annotate.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def publish_run_set(run_set: str, store: str | None, jobs: list, out: Path) -> list[dict]:
    """Write ``out/results.json`` (one model) or ``out/<model>/results.json`` (several); returns each model's
    results, with ``results_path`` and ``report_path`` added."""
    from quantlab import store as store_mod
    from quantlab.models import slug

    rows = {r["job_key"]: r for r in store_mod.list_runs(store, run_set)}
    models = list(dict.fromkeys(j.model["ref"] for j in jobs))
    published = []
    for ref in models:
        mine = [j for j in jobs if j.model["ref"] == ref and j.key in rows]
        if mine:
            target = out if len(models) == 1 else out / slug(ref)
            published.append(_publish_model(run_set, store, mine, rows, target))
    return published


def _publish_model(run_set: str, store: str | None, jobs: list, rows: dict, out: Path) -> dict:
    import hashlib

    from quantlab.fsutil import file_lock
    from quantlab.models import quantlab_home

    lock = quantlab_home() / "locks" / f"publish-{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]}.lock"
    with file_lock(lock):  # two drivers publishing into one dir take turns
        done = _up_to_date(out / "results.json", run_set, [j.key for j in jobs])
        if done:
            return {**done, "results_path": str(out / "results.json"), "report_path": str(out / "report.html")}
        return _write_model(run_set, store, jobs, rows, out)


def _write_model(run_set: str, store: str | None, jobs: list, rows: dict, out: Path) -> dict:
    import os
    import tempfile

    from quantlab.evaluate.accuracy import SUITE_DEFINITIONS
    from quantlab.fsutil import atomic_write_json
    from quantlab.models import count_params, load_config
    from quantlab.pipeline import DEFINITIONS, write_html_report
    from quantlab.sweep.annotate import annotate, store_annotations

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=out))
    try:
        runs = [_run(job, rows[job.key], staging, out) for job in jobs]
        warnings = annotate(jobs, runs)
        store_annotations(store, runs)
        for part in ("per_token", "samples"):  # replace the previous publication's files, then results.json
            if (staging / part).exists():
                if (out / part).exists():
                    shutil.rmtree(out / part)
                os.replace(staging / part, out / part)
        model = {**jobs[0].model, "params": count_params(load_config(jobs[0].model["path"],
                                                                       jobs[0].model.get("trust_remote_code", False)))}
        suite = any(r.get("accuracy") for r in runs)
        results = {"model": {k: model[k] for k in ("ref", "fingerprint", "path", "note", "params")},
                   "run_set": run_set, "text": jobs[0].text, "device": jobs[0].device,
                   "definitions": {**DEFINITIONS, **(SUITE_DEFINITIONS if suite else {})},
                   "warnings": warnings, "runs": runs}
        atomic_write_json(out / "results.json", results)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**results, "results_path": str(out / "results.json"), "report_path": write_html_report(results, out)}


def _up_to_date(path: Path, run_set: str, keys: list[str]) -> dict | None:
    """results.json when it already holds exactly these jobs of this run set (an unchanged rerun)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = data.get("run_set") == run_set and [r.get("job_key") for r in data.get("runs", [])] == keys
    return data if same and (path.parent / "report.html").is_file() else None


def _run(job, row: dict, staging: Path, out: Path) -> dict:
    """The stored row as a results.json run, with its per-token and per-sample files staged for ``out``."""
    from quantlab.sweep.jobs import job_dir

    src, name = job_dir(job.key), job.recipe.name
    run = {k: row[k] for k in ("recipe", "method", "bits", "params", "artifact", "fidelity", "memory", "latency",
                               "cost", "accuracy", "provenance", "job_key")}
    run.update(guard=row["fidelity"].get("guard"), run_id=row["id"])
    try:  # what the job knew beside its stored columns
        record = json.loads((src / "result.json").read_text())
        run.update({k: record[k] for k in ("artifact_cached", "threads") if k in record})
    except (OSError, ValueError):
        pass
    if (src / "per_token.npz").is_file():
        (staging / "per_token").mkdir(exist_ok=True)
        shutil.copy2(src / "per_token.npz", staging / "per_token" / f"{name}.npz")
        run["fidelity"] = {**run["fidelity"], "per_token": str(out / "per_token" / f"{name}.npz")}
    if run.get("accuracy") and (src / "samples.json.gz").is_file():
        (staging / "samples").mkdir(exist_ok=True)
        shutil.copy2(src / "samples.json.gz", staging / "samples" / f"{name}.json.gz")
        run["accuracy"] = {**run["accuracy"], "samples_path": f"samples/{name}.json.gz"}
    return run
