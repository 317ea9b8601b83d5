"""One job, start to finish: quantize -> fidelity -> (suite accuracy) -> bench, each step in a fresh process.

``run_job`` is what an executor runs (a thread of the local executor, or a Ray task); it returns the job's
record and writes nothing but the job cache, which appears whole or not at all: artifacts are renamed into
place by the quantize step, and the job directory (result.json, per-token values, per-sample scores) is
built in a temp dir and renamed. Until then each finished step is kept beside it (``<key>.steps/<step>/``,
each renamed into place whole), so a job stopped in its bench (hours for a torchao model on CPU) resumes
there instead of evaluating again; a step kept for another build of the artifact is computed again, and the
steps go once the job directory is in place. The record's provenance is taken here, by the process that ran
the job (on Ray, the node's), not by the driver. The store is written by the driver, one transaction per job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

from quantlab.evaluate.accuracy import split_samples
from quantlab.evaluate.text import SELF_SEED
from quantlab.fsutil import atomic_dir, atomic_write_json, cached_entry
from quantlab.gate.refs import write_samples
from quantlab.plan.steps import SKIPPED
from quantlab.provenance import provenance
from quantlab.records import make_record
from quantlab.steps.accuracy import accuracy_payload
from quantlab.steps.bench import bench_artifact, planned_bench
from quantlab.steps.fidelity import Candidate, fidelity_payload
from quantlab.steps.fit import ensure_recipe_artifact
from quantlab.steps.launcher import run_step
from quantlab.sweep.jobs import Job


def run_job_payload(payload: dict, force: bool = False) -> dict:
    """``run_job`` in a Ray task, which gets plain data: ``payload`` is ``Job.payload()``."""
    return run_job(Job.from_payload(payload), force)


def run_job(job: Job, force: bool = False) -> dict:
    """The job's record (cached when its key was finished before, unless ``force``)."""
    built = {}

    def build(tmp: Path) -> None:
        built["record"] = _compute(job, force, tmp)
        # the kept steps, now in the record, go under the job's lock: never those of another driver's run
        shutil.rmtree(_steps_dir(job), ignore_errors=True)

    # a second driver of the job waits, then reuses it
    if cached_entry(job.dir, build, is_complete=lambda d: (d / "result.json").is_file(), force=force):
        return {**json.loads((job.dir / "result.json").read_text()), "job_cached": True}
    return {**built["record"], "job_cached": False}


def _compute(job: Job, force: bool, tmp: Path) -> dict:
    """The job's record, its files written into ``tmp`` (the job directory's temp dir)."""
    art = ensure_recipe_artifact(job.model, job.recipe, job.device, job.threads, force=force, data_dir=job.data_dir,
                                 plan=job.step("quantize"))
    job = dataclasses.replace(job, recipe=art.pop("recipe"))  # a fit recipe with its allocation
    fit = art.pop("fit", None)
    build = hashlib.sha256(json.dumps(art["cost"], sort_keys=True, default=str).encode()).hexdigest()
    step = lambda name, compute: _kept_step(job, name, build, force, compute)  # noqa: E731
    fidelity, fid_dir = step("fidelity", lambda kept: _fidelity(job, art["artifact"], kept / "per_token.npz"))
    accuracy, acc_dir, skipped = None, None, None
    if job.suite and job.step("accuracy") and job.step("accuracy").mode == SKIPPED:
        skipped = job.step("accuracy").reason
    elif job.suite:
        accuracy, acc_dir = step("accuracy", lambda kept: _accuracy(job, art["artifact"], kept))
    bench, _ = step("bench", lambda kept: _bench(job, art["artifact"]))
    shutil.copy2(fid_dir / "per_token.npz", tmp / "per_token.npz")
    if accuracy:
        shutil.copy2(acc_dir / "samples.json.gz", tmp / "samples.json.gz")
    if skipped:  # a memory-budget decision, kept with the bench's (the memory column)
        bench = {**bench, "memory": {**bench["memory"], "accuracy_skipped": skipped}}
    record = {**make_record(job.recipe, art, fidelity, bench), "accuracy": accuracy, "job_key": job.key, "fit": fit,
              "model": {k: job.model.to_dict()[k] for k in ("ref", "fingerprint", "path", "note")},
              "provenance": job_provenance(job)}
    record["fidelity"]["per_token"] = str(job.dir / "per_token.npz")
    atomic_write_json(tmp / "result.json", record)
    return record


def _steps_dir(job: Job) -> Path:
    return job.dir.with_name(f"{job.dir.name}.steps")


def _kept_step(job: Job, name: str, build: str, force: bool, compute) -> tuple:
    """``compute(dir)``'s result and the dir holding its files: kept from an earlier run of this job when it
    finished there on the same build of the artifact (and not ``force``), else computed into a temp dir that
    is renamed into place."""
    final = _steps_dir(job) / name
    if not force:
        try:
            kept = json.loads((final / "result.json").read_text())
        except (OSError, ValueError):
            kept = None
        if kept and kept.get("artifact_build") == build:
            return kept["result"], final
    with atomic_dir(final) as tmp:
        result = compute(tmp)
        atomic_write_json(tmp / "result.json", {"artifact_build": build, "result": result})
    return result, final


def _fidelity(job: Job, artifact: str, per_token: Path) -> dict:
    plans = {k: job.step(k) for k in ("reference", "fidelity") if job.step(k)}
    payload = fidelity_payload(job.model, job.text, job.fidelity, job.device, job.threads,
                               [Candidate(job.recipe, artifact, str(per_token))], plans)
    out = run_step("fidelity", payload)
    shown = {name: plan.to_dict() for name, plan in plans.items()} or None
    return {**out["results"][0], "step": {"memory": out.get("memory"), "wall_s": out.get("step_wall_s"),
                                          "reference_mode": out.get("reference_mode"), "plans": shown}}


def _bench(job: Job, artifact: str) -> dict:
    """The bench step, or, when the budget's plan skips it, the planner's memory and no latency."""
    plan = job.step("bench")
    if plan and plan.mode == SKIPPED:
        return planned_bench(plan, artifact, job.latency, job.threads)
    settings = job.latency
    if plan and plan.reason:  # the budget leaves the largest batch sizes out
        settings = dataclasses.replace(settings, batch_sizes=tuple(b for b in settings.batch_sizes if b <= plan.batch))
    out = bench_artifact(job.recipe, artifact, job.threads, settings, job.device, job.model.trust_remote_code,
                         budgeted=job.steps is not None)
    if plan and plan.reason:
        out["latency"] = {**out["latency"], "batches_skipped": plan.reason}
    return out


def _accuracy(job: Job, artifact: str, tmp: Path) -> dict:
    payload = accuracy_payload(job.suite, job.prepared, job.device, job.threads, [(job.recipe, artifact)],
                               job.model.trust_remote_code)
    result = run_step("accuracy", payload)["results"][0]
    write_samples(tmp / "samples.json.gz", split_samples(result))
    result.update(settings=job.suite.to_dict(), samples_path="samples.json.gz")
    return result


def job_provenance(job: Job) -> dict:
    """Versions, device, host, seeds, data sha256 and git sha of this process, with the job's settings."""
    data = {job.text.name: job.text.sha256, **(job.prepared.file_hashes() if job.prepared else {})}
    seeds = {"bootstrap": job.fidelity.seed, "latency_prompt": 0, "self_text": SELF_SEED}
    prov = provenance(job.device, seeds=seeds, data=data)
    prov["device"]["torch_threads"] = job.threads
    prov.update(text=job.text.to_dict(), fidelity_settings=job.fidelity.to_dict(),
                latency_settings=job.latency.to_dict())
    return prov
