"""The driver: plan a spec, skip what is stored, run the rest, store each job as it finishes, publish.

The run set is named after the spec and its job keys, so running the same spec again continues it: jobs
already stored are skipped, jobs finished but not stored (killed between the two) are stored from their
cache, and only the rest run. Each finished job is one store transaction; a unique (run set, job key) index
keeps two drivers of one sweep from storing a job twice. ``quantlab sweep`` and ``quantize-and-compare`` both
come through ``run_spec``.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from quantlab import store
from quantlab.errors import UsageError
from quantlab.fsutil import check_writable_dir
from quantlab.outputs import check_own_dir
from quantlab.gate.refs import read_samples
from quantlab.sweep.compute import job_provenance
from quantlab.sweep.executors import EXECUTORS, check_executor, execute
from quantlab.sweep.jobs import Job
from quantlab.sweep.plan import plan_jobs
from quantlab.sweep.publish import publish_run_set
from quantlab.sweep.spec import Spec

Progress = Callable[[Job, dict, bool], None]  # (job, record, from the job cache)


@dataclass(frozen=True)
class RunOptions:
    """How to run a spec's jobs (not what they compute: that is the Spec, and the job keys)."""

    executor: str = "local"
    address: str | None = None
    max_parallel: int = 1
    force: bool = False  # recompute every job, artifacts included, into a new run set
    store: str | None = None
    out: str | None = None  # default reports/<label>-<date>/
    bar: bool = False  # a progress bar over jobs on stderr

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise UsageError(f"--executor must be one of {', '.join(EXECUTORS)} (got {self.executor!r})")
        if self.max_parallel < 1:
            raise UsageError("--max-parallel must be ≥ 1")
        if self.address and self.executor != "ray":
            raise UsageError("--address joins a Ray cluster — add --executor ray")


def run_spec(spec: Spec, opts: RunOptions, progress: Progress | None = None) -> dict:
    """Every job of ``spec``; returns the run set, job counts and each model's published results."""
    out = Path(opts.out) if opts.out else spec.default_out()
    check_writable_dir(out)
    check_own_dir(out)  # quantlab replaces only files it wrote there (outputs.MANIFEST)
    check_executor(opts.executor, opts.address)
    store.check_store(opts.store)
    jobs = plan_jobs(spec)
    run_set = run_set_of(spec.run_set_prefix, jobs, opts.force)
    with _job_bar(len(jobs), opts.bar, progress) as report:
        counts = run_jobs(jobs, run_set, opts, report)
    published = publish_run_set(run_set, opts.store, jobs, out)
    return {"run_set": run_set, "description": spec.description, "jobs": counts, "published": published}


def run_set_of(prefix: str, jobs: list[Job], force: bool) -> str:
    """``<prefix>-<hash of the job keys>``: the same jobs give the same run set, so rerunning continues it.
    ``force`` names a new one (``-forced-<time>``)."""
    digest = hashlib.sha256("".join(sorted(j.key for j in jobs)).encode()).hexdigest()[:12]
    name = f"{prefix}-{digest}"
    return name + datetime.now(timezone.utc).strftime("-forced-%Y%m%dT%H%M%S") if force else name


def run_jobs(jobs: list[Job], run_set: str, opts: RunOptions, progress: Progress | None = None) -> dict:
    """Run the jobs of ``run_set`` not stored yet; store each as it finishes (one transaction per job).
    Returns counts: jobs, already_stored, from_cache, computed, stored."""
    stored = {r["job_key"] for r in store.list_runs(opts.store, run_set) if r.get("job_key")}
    refused = [j for j in jobs if j.refused]
    pending = [j for j in jobs if j.key not in stored and not j.refused]
    counts = {"jobs": len(jobs), "already_stored": len(jobs) - len(pending) - len(refused), "from_cache": 0,
              "computed": 0, "stored": 0, "refused": len(refused)}
    for job, record in execute(pending, opts.executor, opts.address, opts.max_parallel, opts.force):
        cached = record.pop("job_cached")
        counts["from_cache" if cached else "computed"] += 1
        counts["stored"] += store_job(opts.store, run_set, job, record)
        if progress:
            progress(job, record, cached)
    return counts


def store_job(path: str | None, run_set: str, job: Job, record: dict) -> int:
    """One transaction: the job's run row and its per-sample scores. 1 if stored, 0 if another driver did."""
    samples = read_samples(job.dir / record["accuracy"]["samples_path"]) if record.get("accuracy") else None
    prov = record.get("provenance") or job_provenance(job)  # a job cached before jobs recorded their own
    row = {**record, "run_set": run_set, "provenance": {**prov, "run_set": run_set}}
    return 1 if store.insert_run(path, row, samples, unique_job=True) else 0


@contextlib.contextmanager
def _job_bar(total: int, enabled: bool, progress: Progress | None):
    """A tqdm bar over jobs around ``progress``; yields the callback the driver calls per finished job."""
    if not enabled:
        yield progress
        return
    from tqdm import tqdm

    with tqdm(total=total, desc="jobs", unit="job") as bar:
        def report(job, record, cached):
            bar.set_postfix_str(f"{job.recipe.name}{' (job cache)' if cached else ''}")
            bar.update()
            if progress:
                progress(job, record, cached)
        yield report
