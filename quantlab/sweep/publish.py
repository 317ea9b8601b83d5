"""A finished run set's outputs per model: results.json (a gate reference; quantize-and-compare prints it)
with its per-token values and per-sample scores copied beside it, and the HTML report. The jobs' mutual
checks (garbage guard against peers, recoveries, calibration overlaps) are added here, see annotate.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from quantlab import store as store_mod
from quantlab.errors import MeasurementError, QuantlabError
from quantlab.evaluate.guard import nonfinite
from quantlab.fsutil import atomic_write_json, file_lock, naming_full_disk, remove_stale_temps, safe_name
from quantlab.outputs import claim_files, settle_files
from quantlab.home import quantlab_home
from quantlab.methods import get_method
from quantlab.models.load import load_config
from quantlab.models.shapes import count_params
from quantlab.models.source import slug
from quantlab.recipe import Recipe
from quantlab.records import definitions
from quantlab.report import ReportSettings, write_report
from quantlab.sweep.annotate import annotate, store_annotations


def publish_run_set(run_set: str, store: str | None, jobs: list, out: Path) -> list[dict]:
    """Write ``out/results.json`` (one model) or ``out/<model>/results.json`` (several); returns each model's
    results, with ``results_path`` and ``report_path`` added."""
    rows = {r["job_key"]: r for r in store_mod.list_runs(store, run_set)}
    models = list(dict.fromkeys(j.model.ref for j in jobs))
    published = []
    for ref in models:
        mine = [j for j in jobs if j.model.ref == ref and j.key in rows]
        refused = [refusal_record(j) for j in jobs if j.model.ref == ref and j.refused]
        if mine:
            target = out if len(models) == 1 else out / slug(ref)
            published.append(_publish_model(run_set, store, mine, rows, target, refused))
    return published


def refusal_record(job) -> dict:
    """A recipe the memory budget refused before work: why, and the planner's peak of each step."""
    return {"recipe": job.recipe.name, "method": job.recipe.method, "bits": job.recipe.bits, "reason": job.refused,
            "steps": {name: {"mode": p.mode, "peak_bytes": p.peak_bytes, "components": p.components}
                      for name, p in (job.steps or {}).items()}}


def _publish_model(run_set: str, store: str | None, jobs: list, rows: dict, out: Path, refused: list) -> dict:
    lock = quantlab_home() / "locks" / f"publish-{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]}.lock"
    with file_lock(lock):  # two drivers publishing into one dir take turns
        done = _up_to_date(out / "results.json", run_set, [j.key for j in jobs])
        if done:
            return {**done, "results_path": str(out / "results.json"), "report_path": str(out / "report.html")}
        with naming_full_disk(out, "results.json and its per-token and per-sample files"):
            return _write_model(run_set, store, jobs, rows, out, refused)


def _write_model(run_set: str, store: str | None, jobs: list, rows: dict, out: Path, refused: list) -> dict:
    """Stage the per-token and per-sample files, then replace only what quantlab's manifest in ``out`` lists
    (outputs.claim_files): a folder holding anyone else's files is refused before anything is written."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out / "publish")  # staging folders of publishers that were killed
    staging = Path(tempfile.mkdtemp(prefix=f".publish.{os.getpid()}.", suffix=".tmp", dir=out))
    try:
        runs = [_run(job, rows[job.key], staging, out) for job in jobs]
        warnings = annotate(jobs, runs)
        source = jobs[0].model
        params = count_params(load_config(source.path, source.trust_remote_code), source.trust_remote_code)
        results = {"model": {"ref": source.ref, "fingerprint": source.fingerprint, "path": source.path,
                             "note": source.note, "params": params, "trust_remote_code": source.trust_remote_code},
                   "run_set": run_set, "text": jobs[0].text.to_dict(), "device": jobs[0].device,
                   "definitions": definitions(any(r.get("accuracy") for r in runs), any(r.get("fit") for r in runs)),
                   "warnings": warnings, "runs": runs, "refused": refused,
                   "max_memory_bytes": jobs[0].budget}
        require_finite_results(results)
        store_annotations(store, runs)
        staged = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        previous = claim_files(out, ["results.json", "report.html", *staged])
        for name in staged:  # the per-token values and per-sample scores first, then results.json
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, out / name)
        atomic_write_json(out / "results.json", results)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report = write_html_report(results, out)
    settle_files(out, ["results.json", *staged] + (["report.html"] if report else []), previous)
    return {**results, "results_path": str(out / "results.json"), "report_path": report}


def _up_to_date(path: Path, run_set: str, keys: list[str]) -> dict | None:
    """results.json when it already holds exactly these jobs of this run set (an unchanged rerun)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = data.get("run_set") == run_set and [r.get("job_key") for r in data.get("runs", [])] == keys
    same = same and nonfinite(data) is None  # one written before NaN was refused is written again, or refused
    return data if same and (path.parent / "report.html").is_file() else None


def require_finite_results(results: dict) -> None:
    """Refuse results holding a NaN or infinite number, naming the field and its run's recipe: NaN is never a
    result (the steps refuse one where it is computed; a job stored before they did still holds it)."""
    found = nonfinite(results)
    if found is None:
        return
    field, value = found
    index = re.match(r"runs\[(\d+)\]", field)
    recipe = f" ({results['runs'][int(index.group(1))]['recipe']})" if index else ""
    raise MeasurementError(f"results.json field {field}{recipe} is {value}, not a number — nothing was published; "
                           "run that job again with --force")


def _run(job, row: dict, staging: Path, out: Path) -> dict:
    """The stored row as a results.json run, with its per-token and per-sample files staged for ``out``."""
    src, name = job.dir, safe_name(job.recipe.name)
    run = {k: row[k] for k in ("recipe", "method", "bits", "params", "artifact", "fidelity", "memory", "latency",
                               "cost", "step_wall_s", "accuracy", "provenance", "job_key")}
    recipe = Recipe.from_dict({"name": row["recipe"], "method": row["method"], "params": row["params"]})
    run.update(guard=row["fidelity"].get("guard"), run_id=row["id"],
               engine=get_method(recipe.method).layout(recipe.config).engines[0])
    if row.get("fit"):  # what chose a fit recipe's allocation
        run["fit"] = row["fit"]
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


def write_html_report(results: dict, out: Path) -> str | None:
    """``DIR/report.html`` for the default GPU (32 GB, context 4096); a failure is a warning, not a lost run."""
    try:
        return str(write_report({**results, "source": str(out / "results.json")}, out / "report.html",
                                ReportSettings()))
    except QuantlabError as exc:
        results["warnings"].append(f"report not written: {exc}")
        return None
