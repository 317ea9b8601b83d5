"""A finished sweep's outputs per model: results.json (quantize-and-compare's shape, a gate reference) with
its per-token values and per-sample scores copied beside it, and the HTML report."""

from __future__ import annotations

import shutil
from pathlib import Path


def publish_sweep(run_set: str, store: str | None, jobs: list, out: Path, warnings: list[str]) -> list[str]:
    """Write ``out/results.json`` (one model) or ``out/<model>/results.json`` (several); returns their paths."""
    from quantlab import store as store_mod
    from quantlab.models import slug

    rows = {r["job_key"]: r for r in store_mod.list_runs(store, run_set)}
    models = list(dict.fromkeys(j.model["ref"] for j in jobs))
    paths = []
    for ref in models:
        mine = [j for j in jobs if j.model["ref"] == ref and j.key in rows]
        if mine:
            target = out if len(models) == 1 else out / slug(ref)
            paths.append(_publish_model(run_set, mine, rows, target, [w for w in warnings if w.startswith(ref + "@")]))
    return paths


def _publish_model(run_set: str, jobs: list, rows: dict, out: Path, warnings: list[str]) -> str:
    import os
    import tempfile

    from quantlab.fsutil import atomic_write_json
    from quantlab.models import count_params, load_config
    from quantlab.pipeline import DEFINITIONS, write_html_report

    if _up_to_date(out / "results.json", run_set, [j.key for j in jobs]):
        return str(out / "results.json")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sweep-", dir=out))
    try:
        runs = [_run(job, rows[job.key], staging, out) for job in jobs]
        for part in ("per_token", "samples"):  # replace the previous publication's files, then results.json
            if (staging / part).exists():
                if (out / part).exists():
                    shutil.rmtree(out / part)
                os.replace(staging / part, out / part)
        model = {**jobs[0].model, "params": count_params(load_config(jobs[0].model["path"]))}
        results = {"model": {k: model[k] for k in ("ref", "fingerprint", "path", "note", "params")},
                   "run_set": run_set, "text": jobs[0].text, "device": jobs[0].device, "definitions": DEFINITIONS,
                   "warnings": warnings, "runs": runs}
        atomic_write_json(out / "results.json", results)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_html_report(results, out)
    return str(out / "results.json")


def _up_to_date(path: Path, run_set: str, keys: list[str]) -> bool:
    """results.json already holds exactly these jobs of this run set (an unchanged rerun): nothing to write."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return data.get("run_set") == run_set and [r.get("job_key") for r in data.get("runs", [])] == keys \
        and (path.parent / "report.html").is_file()


def _run(job, row: dict, staging: Path, out: Path) -> dict:
    """The stored row as a results.json run, with its per-token and per-sample files staged for ``out``."""
    from quantlab.sweep.jobs import job_dir

    src, name = job_dir(job.key), job.recipe.name
    run = {k: row[k] for k in ("recipe", "method", "bits", "params", "artifact", "fidelity", "memory", "latency",
                               "cost", "accuracy", "provenance", "job_key")}
    run.update(guard=row["fidelity"].get("guard"), run_id=row["id"])
    if (src / "per_token.npz").is_file():
        (staging / "per_token").mkdir(exist_ok=True)
        shutil.copy2(src / "per_token.npz", staging / "per_token" / f"{name}.npz")
        run["fidelity"] = {**run["fidelity"], "per_token": str(out / "per_token" / f"{name}.npz")}
    if run.get("accuracy") and (src / "samples.json.gz").is_file():
        (staging / "samples").mkdir(exist_ok=True)
        shutil.copy2(src / "samples.json.gz", staging / "samples" / f"{name}.json.gz")
        run["accuracy"] = {**run["accuracy"], "samples_path": f"samples/{name}.json.gz"}
    return run
