"""``quantlab sweep``: every job of a sweep file, cached by content, resumable, locally or on Ray.

The sweep's run set is named after the file and its job keys, so running the same sweep again continues
it: jobs already stored are skipped, jobs finished but not stored (killed between the two) are stored
from their cache, and only the rest run. Each finished job is one store transaction; a unique
(run set, job key) index keeps two drivers of one sweep from storing a job twice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import UsageError

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class SweepOptions:
    path: str = ""  # the sweep file; empty for quantize-and-compare's one-model sweep
    executor: str = "local"
    address: str | None = None
    max_parallel: int = 1
    force: bool = False
    store: str | None = None
    out: str | None = None  # default reports/<sweep file>-<date>/

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise UsageError(f"--executor must be one of {', '.join(EXECUTORS)} (got {self.executor!r})")
        if self.max_parallel < 1:
            raise UsageError("--max-parallel must be ≥ 1")
        if self.address and self.executor != "ray":
            raise UsageError("--address joins a Ray cluster — add --executor ray")


def run_set_of(prefix: str, jobs: list, force: bool) -> str:
    """``<prefix>-<hash of the job keys>``: the same jobs give the same run set, so rerunning continues it.
    ``force`` names a new one (``-forced-<time>``)."""
    from datetime import datetime, timezone

    digest = hashlib.sha256("".join(sorted(j.key for j in jobs)).encode()).hexdigest()[:12]
    name = f"{prefix}-{digest}"
    return name + datetime.now(timezone.utc).strftime("-forced-%Y%m%dT%H%M%S") if force else name


def run_sweep(opts: SweepOptions, progress=None) -> dict:
    """Plan, skip what is stored, run the rest, store each as it finishes, publish. Returns a summary."""
    from datetime import date

    from quantlab.fsutil import check_writable_dir
    from quantlab.sweep.jobs import plan_jobs
    from quantlab.sweep.publish import publish_run_set
    from quantlab.sweep.spec import load_sweep

    spec = load_sweep(opts.path)
    out = Path(opts.out) if opts.out else Path("reports") / f"{Path(opts.path).stem}-{date.today():%Y%m%d}"
    check_writable_dir(out)
    jobs = plan_jobs(spec)
    run_set = run_set_of(f"sweep-{Path(opts.path).stem}", jobs, opts.force)
    counts = run_jobs(jobs, run_set, opts, progress)
    published = publish_run_set(run_set, opts.store, jobs, out)
    warnings = [f"{r['model']['ref']}: {w}" for r in published for w in r["warnings"]]
    return {"run_set": run_set, "sweep": opts.path, "description": spec.description, **counts, "warnings": warnings,
            "results": [r["results_path"] for r in published]}


def run_jobs(jobs: list, run_set: str, opts: SweepOptions, progress=None) -> dict:
    """Run the jobs of ``run_set`` not stored yet with ``opts``' executor; store each as it finishes (one
    transaction per job). Returns counts: jobs, already_stored, from_cache, computed, stored."""
    from quantlab import store
    from quantlab.sweep.executors import execute

    stored = {r["job_key"] for r in store.list_runs(opts.store, run_set) if r.get("job_key")}
    pending = [j for j in jobs if j.key not in stored]
    counts = {"jobs": len(jobs), "already_stored": len(jobs) - len(pending), "from_cache": 0, "computed": 0,
              "stored": 0}
    provenances: dict = {}
    for job, record in execute(pending, opts):
        cached = record.pop("job_cached")
        counts["from_cache" if cached else "computed"] += 1
        counts["stored"] += store_job(opts.store, run_set, job, record, provenances)
        if progress:
            progress(job, record, cached)
    return counts


def store_job(path: str | None, run_set: str, job, record: dict, provenances: dict) -> int:
    """One transaction: the job's run row and its per-sample scores. 1 if stored, 0 if another driver did.
    ``provenances`` caches the (identical) provenance of jobs sharing device, text and threads."""
    from quantlab import store
    from quantlab.gate.refs import read_samples
    from quantlab.evaluate.text import SELF_SEED
    from quantlab.provenance import provenance
    from quantlab.sweep.jobs import job_dir

    key = (job.device, job.text["sha256"], job.threads)
    if key not in provenances:
        data = {job.text["name"]: job.text["sha256"]}
        data.update({f: sha for t in ((job.prepared or {}).get("data") or {}).values() for f, sha in t["files"].items()})
        seeds = {"bootstrap": job.fidelity["seed"], "latency_prompt": 0, "self_text": SELF_SEED}
        prov = provenance(job.device, seeds=seeds, data=data)
        prov["device"]["torch_threads"] = job.threads
        prov.update(text=job.text, fidelity_settings=job.fidelity, latency_settings=job.latency, run_set=run_set)
        provenances[key] = prov
    prov = provenances[key]
    samples = None
    if record.get("accuracy"):
        samples = read_samples(job_dir(job.key) / record["accuracy"]["samples_path"])
    row = {**record, "run_set": run_set, "provenance": prov}
    return 1 if store.insert_run(path, row, samples, unique_job=True) else 0
