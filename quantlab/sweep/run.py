"""One job, start to finish: quantize -> fidelity -> (suite accuracy) -> bench, each in a fresh process.

``run_job`` is what an executor runs (a thread of the local executor, or a Ray task); it returns the job's
record and writes nothing but the job cache, which appears whole or not at all: artifacts are renamed into
place by the quantize step, and the job directory (result.json, per-token values, per-sample scores) is
built in a temp dir and renamed. The store is written by the sweep's driver, one transaction per job.
"""

from __future__ import annotations

import json
from pathlib import Path


def run_job(payload: dict, force: bool = False) -> dict:
    """The job's record (cached when its key was finished before, unless ``force``)."""
    from quantlab.fsutil import file_lock
    from quantlab.sweep.jobs import job_dir

    final = job_dir(payload["key"])
    with file_lock(final.with_name(f".{final.name}.lock")):  # a second driver of the job waits, then reuses it
        if not force and (final / "result.json").is_file():
            record = json.loads((final / "result.json").read_text())
            return {**record, "job_cached": True}
        record = _compute(payload, final, force)
    return {**record, "job_cached": False}


def _compute(payload: dict, final: Path, force: bool) -> dict:
    from quantlab.artifacts import ensure_artifact
    from quantlab.fsutil import atomic_dir, atomic_write_json
    from quantlab.models import ModelSource
    from quantlab.pipeline import bench_artifact, make_record
    from quantlab.recipe import Recipe

    source = ModelSource.from_dict(payload["model"])
    recipe = Recipe.from_dict(payload["recipe"])
    device, threads = payload["device"], payload["threads"]
    art = ensure_artifact(source, recipe, device, threads, force=force)
    with atomic_dir(final) as tmp:
        fidelity = _fidelity(payload, source, recipe, art["artifact"], tmp / "per_token.npz")
        accuracy = _accuracy(payload, recipe, art["artifact"], tmp)
        bench = bench_artifact(recipe, art["artifact"], threads, payload["latency"], device, source.trust_remote_code)
        record = {**make_record(recipe, art, fidelity, bench), "accuracy": accuracy, "job_key": payload["key"],
                  "model": {k: source.to_dict()[k] for k in ("ref", "fingerprint", "path", "note")}}
        record["fidelity"]["per_token"] = str(final / "per_token.npz")
        atomic_write_json(tmp / "result.json", record)
    return record


def _fidelity(payload: dict, source, recipe, artifact: str, per_token: Path) -> dict:
    from quantlab.evaluate import guard
    from quantlab.measure.runner import run_isolated

    result = run_isolated("fidelity", {"baseline": source.to_dict(), "text": payload["text"], "device": payload["device"],
                                       "threads": payload["threads"], "settings": payload["fidelity"],
                                       "candidates": [{"recipe": recipe.to_dict(), "artifact": artifact,
                                                       "per_token_path": str(per_token)}]})["results"][0]
    # The job's own signals (repetition, top-1 floor); the comparison with RTN's KLD at the same bits needs
    # the sweep's other jobs and is added by the driver when the sweep ends.
    run = {"method": recipe.method, "bits": recipe.bits, "fidelity": result}
    reasons = result.pop("guard_reasons", []) + guard.fidelity_reasons(run, [])
    result["guard"] = {"ok": not reasons, "reasons": reasons}
    return result


def _accuracy(payload: dict, recipe, artifact: str, tmp: Path) -> dict | None:
    if not payload.get("suite"):
        return None
    from quantlab.evaluate.accuracy import split_samples
    from quantlab.gate.refs import write_samples
    from quantlab.measure.runner import run_isolated

    result = run_isolated("accuracy", {"settings": payload["suite"], "prepared": payload["prepared"],
                                       "device": payload["device"], "threads": payload["threads"],
                                       "candidates": [{"recipe": recipe.to_dict(), "artifact": artifact}],
                                       "trust_remote_code": payload["model"].get("trust_remote_code", False)})["results"][0]
    write_samples(tmp / "samples.json.gz", split_samples(result))
    result.update(settings=payload["suite"], samples_path="samples.json.gz")
    return result
