"""What one model's jobs say about each other, added when a run set is published.

Each job is computed alone, so three things wait for its peers: the garbage guard's comparison with
round-to-nearest at the same bits, each trained recipe's recovered fraction over its PTQ twin (fidelity and
task accuracy, paired on the twins' per-token values and per-sample scores), each run's flips against fp
(``quantlab.evaluate.flips``), and the warning that a
calibrated recipe was calibrated on the evaluation text. Under a memory budget each run's steps are also
judged against it (``quantlab.records.budget_check``: the record's ``memory.budget``), with a warning for a
step that held more. They go into results.json and, in one transaction, into the stored rows, so
``quantlab report --run-set`` and the gate see them too.
"""

from __future__ import annotations

from pathlib import Path

from quantlab import store
from quantlab.evaluate import guard
from quantlab.evaluate.flips import add_flips
from quantlab.evaluate.recovery import add_accuracy_recoveries, add_recoveries
from quantlab.gate.refs import read_samples
from quantlab.methods import get_method
from quantlab.plan.steps import is_reference
from quantlab.records import budget_check, budget_warning


def annotate(jobs: list, runs: list[dict]) -> list[str]:
    """Add guard verdicts, recoveries and per-run warnings to ``runs`` (results.json runs, in job order);
    returns the comparison's warnings: calibration overlaps first, then guard failures."""
    warnings = _calibration_overlaps(jobs, runs)
    _recoveries(jobs, runs)
    return warnings + _guard(runs) + _over_budget(jobs, runs)


def store_annotations(path: str | None, runs: list[dict]) -> None:
    store.update_runs(path, {r["run_id"]: {"fidelity": r["fidelity"], "accuracy": r.get("accuracy"),
                                           "memory": r["memory"]} for r in runs if r.get("run_id")})


def _over_budget(jobs: list, runs: list[dict]) -> list[str]:
    """Each run's steps against the budget it was planned under; a warning per step that held more."""
    warnings = []
    for job, run in zip(jobs, runs):
        if job.budget is None:
            continue
        check = run["memory"]["budget"] = budget_check(run, job.budget)
        for step in check["over"]:
            plan = job.step("reference" if step == "fidelity" and is_reference(job.recipe) else step)
            warnings.append(budget_warning(run["recipe"], step, check["held_bytes"][step], job.budget, plan))
    return warnings


def _guard(runs: list[dict]) -> list[str]:
    warnings = []
    for run in runs:
        own = (run["fidelity"].get("guard") or {}).get("reasons", [])
        reasons = own + [r for r in guard.fidelity_reasons(run, runs) if r not in own]
        run["guard"] = run["fidelity"]["guard"] = {"ok": not reasons, "reasons": reasons}
        if reasons:
            warnings.append(f"{run['recipe']} looks broken (garbage guard): {'; '.join(reasons)}")
    return warnings


def _recoveries(jobs: list, runs: list[dict]) -> None:
    recipes = [j.recipe for j in jobs]
    npz = {j.recipe.name: str(j.dir / "per_token.npz") for j in jobs if (j.dir / "per_token.npz").is_file()}
    add_recoveries(recipes, [r["fidelity"] for r in runs], npz, jobs[0].fidelity)
    accs = [r.get("accuracy") for r in runs]
    if all(accs):
        samples = [read_samples(j.dir / "samples.json.gz") for j in jobs]
        add_accuracy_recoveries(recipes, accs, samples)
        add_flips(recipes, accs, samples)


def _calibration_overlaps(jobs: list, runs: list[dict]) -> list[str]:
    """A calibrated recipe whose calibration text is the evaluation text has optimistic fidelity."""
    warnings = []
    for job, run in zip(jobs, runs):
        inputs = get_method(job.recipe.method).cache_inputs(job.recipe.config, Path(job.model.path),
                                                            data_dir=job.data_dir,
                                                            trust_remote_code=job.model.trust_remote_code)
        run["warnings"] = []
        if inputs.get("calibration_sha256") == job.text.sha256:
            run["warnings"].append(f"{job.recipe.name} is calibrated on the evaluation text ({job.text.name}): "
                                   "its fidelity is optimistic — evaluate on other text or calibrate on c4_calibration")
            warnings += run["warnings"]
    return warnings
