"""One job, start to finish: quantize -> fidelity -> (suite accuracy) -> bench, each step in a fresh process.

``run_job`` is what an executor runs (a thread of the local executor, or a Ray task); it returns the job's
record and writes nothing but the job cache, which appears whole or not at all: artifacts are renamed into
place by the quantize step, and the job directory (result.json, per-token values, per-sample scores) is
built in a temp dir and renamed. The record's provenance is taken here, by the process that ran the job
(on Ray, the node's), not by the driver. The store is written by the driver, one transaction per job.
"""

from __future__ import annotations

import json
from pathlib import Path

from quantlab.evaluate.accuracy import split_samples
from quantlab.evaluate.text import SELF_SEED
from quantlab.fsutil import atomic_dir, atomic_write_json, file_lock
from quantlab.gate.refs import write_samples
from quantlab.plan.steps import SKIPPED
from quantlab.provenance import provenance
from quantlab.records import make_record
from quantlab.steps.accuracy import accuracy_payload
from quantlab.steps.bench import bench_artifact, planned_bench
from quantlab.steps.fidelity import Candidate, fidelity_payload
from quantlab.steps.launcher import run_step
from quantlab.steps.quantize import ensure_artifact
from quantlab.sweep.jobs import Job


def run_job(payload: dict, force: bool = False) -> dict:
    """The job's record (cached when its key was finished before, unless ``force``); ``payload`` is
    ``Job.payload()``, so a Ray task gets plain data."""
    job = Job.from_payload(payload)
    with file_lock(job.dir.with_name(f".{job.dir.name}.lock")):  # a second driver of the job waits, then reuses it
        if not force and (job.dir / "result.json").is_file():
            return {**json.loads((job.dir / "result.json").read_text()), "job_cached": True}
        record = _compute(job, force)
    return {**record, "job_cached": False}


def _compute(job: Job, force: bool) -> dict:
    art = ensure_artifact(job.model, job.recipe, job.device, job.threads, force=force, data_dir=job.data_dir,
                          plan=job.step("quantize"))
    with atomic_dir(job.dir) as tmp:
        fidelity = _fidelity(job, art["artifact"], tmp / "per_token.npz")
        accuracy = _accuracy(job, art["artifact"], tmp)
        bench = _bench(job, art["artifact"])
        record = {**make_record(job.recipe, art, fidelity, bench), "accuracy": accuracy, "job_key": job.key,
                  "model": {k: job.model.to_dict()[k] for k in ("ref", "fingerprint", "path", "note")},
                  "provenance": job_provenance(job)}
        record["fidelity"]["per_token"] = str(job.dir / "per_token.npz")
        atomic_write_json(tmp / "result.json", record)
    return record


def _fidelity(job: Job, artifact: str, per_token: Path) -> dict:
    plans = {k: job.step(k) for k in ("reference", "fidelity") if job.step(k)}
    payload = fidelity_payload(job.model, job.text, job.fidelity, job.device, job.threads,
                               [Candidate(job.recipe, artifact, str(per_token))], plans)
    out = run_step("fidelity", payload)
    return {**out["results"][0], "step": {"memory": out.get("memory"), "wall_s": out.get("step_wall_s"),
                                          "reference_mode": out.get("reference_mode"), "plans": plans or None}}


def _bench(job: Job, artifact: str) -> dict:
    """The bench step, or, when the budget's plan skips it, the planner's memory and no latency."""
    plan = job.step("bench")
    if plan and plan["mode"] == SKIPPED:
        return planned_bench(plan, artifact, job.latency, job.threads)
    return bench_artifact(job.recipe, artifact, job.threads, job.latency, job.device, job.model.trust_remote_code,
                          budgeted=job.steps is not None)


def _accuracy(job: Job, artifact: str, tmp: Path) -> dict | None:
    if not job.suite:
        return None
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
