"""The library calls behind the CLI's commands: each validates through the planner's checks, then runs steps.

``quantize_and_compare`` and ``run_sweep`` are specs through the one driver; ``quantize_model``, ``evaluate``,
``bench_model`` and ``weigh_model`` work on one model and run the steps they need directly.
"""

from __future__ import annotations

import copy
import dataclasses
import json

from quantlab.artifacts import resolve_target, source_fingerprint
from quantlab.device import resolve_device, torch_threads
from quantlab.errors import UsageError
from quantlab.evaluate.fidelity import FidelitySettings
from quantlab.evaluate.guard import require_finite
from quantlab.evaluate.harness import check_tasks, prepare_tasks
from quantlab.evaluate.suites import parse_shard, task_settings
from quantlab.outputs import check_output_file, claim_output_file, write_output_file
from quantlab.measure.latency import LatencySettings
from quantlab.methods import get_method
from quantlab.methods.fit import loader, vllm_note
from quantlab.methods.fit_gguf import GGUF_LOADER
from quantlab.models.load import load_config
from quantlab.models.source import resolve_model
from quantlab.plan.shapes import model_shapes
from quantlab.plan.steps import SKIPPED, plan_accuracy, require_fits, resolve_budget
from quantlab.recipe import Recipe
from quantlab.records import budget_check, budget_warning
from quantlab.steps.accuracy import suite_result
from quantlab.steps.bench import bench_artifact, weigh_artifact
from quantlab.steps.fidelity import Candidate, measure_fidelity
from quantlab.steps.fit import ensure_recipe_artifact
from quantlab.sweep.driver import Progress, RunOptions, run_spec
from quantlab.sweep.plan import (budget_steps, reference_text, require_libraries, resolve_checked,
                                 resolved_data_dir)
from quantlab.sweep.spec import Spec, load_spec


def quantize_and_compare(spec: Spec, opts: RunOptions, progress: Progress | None = None) -> dict:
    """One model's comparison (``compare_spec``): results.json's content plus ``jobs`` counts and output paths."""
    summary = run_spec(spec, opts, progress)
    (results,) = summary["published"]
    return {**results, "jobs": summary["jobs"]}


def run_sweep(path: str, opts: RunOptions, progress: Progress | None = None, max_memory: str | None = None,
              max_jobs: int | None = None) -> dict:
    """Every job of a sweep file; a summary with each model's results.json path. ``max_memory`` overrides the
    file's budget; ``max_jobs`` the most jobs it may have (``quantlab.sweep.spec.MAX_JOBS``)."""
    spec = load_spec(path, max_jobs=max_jobs)
    if max_memory is not None:
        spec = dataclasses.replace(spec, max_memory=max_memory)
    summary = run_spec(spec, opts, progress)
    published = summary["published"]
    return {"run_set": summary["run_set"], "sweep": str(path), "description": summary["description"],
            **summary["jobs"], "warnings": [f"{r['model']['ref']}: {w}" for r in published for w in r["warnings"]],
            "refused": [f"{r['model']['ref']}@{x['recipe']}: {x['reason']}" for r in published for x in r.get("refused", [])],
            "results": [r["results_path"] for r in published]}


def quantize_model(model: str | None, recipe: Recipe, device: str = "auto", threads: int | None = None,
                   trust_remote_code: bool = False, data_dir: str | None = None, max_memory: str | None = None) -> dict:
    """Quantize one model with one recipe (cached); returns artifact path, cost and whether it was cached.
    Under a memory budget the planner's quantize peak is checked first."""
    require_libraries([recipe])
    source = resolve_checked(model, [recipe], trust_remote_code)
    device = resolve_device(device)
    budget = resolve_budget(max_memory)
    plans = budget_steps(source, [recipe], FidelitySettings(), LatencySettings(), device, budget).get(recipe.name, {})
    plan = require_fits(plans["quantize"]) if plans else None
    art = ensure_recipe_artifact(source, recipe, device, threads, data_dir=resolved_data_dir(data_dir), plan=plan)
    art["warnings"] = []
    if budget is not None and not art["cached"]:  # what the quantize step held, against the budget
        check = budget_check({"cost": art["cost"]}, budget)
        if check["over"]:
            art["warnings"].append(budget_warning(recipe.name, "quantize", check["held_bytes"]["quantize"], budget,
                                                  plan))
    return art


def fit_model(model: str | None, config, device: str = "auto", threads: int = 1, data_dir: str | None = None,
              text: str | None = None, trust_remote_code: bool = False) -> dict:
    """Resolve, build and measure one fit (``quantlab.methods.fit``): the allocation, the bytes as loaded the way
    the artifact's manifest says, in a fresh process, and the fidelity against the fp model."""
    method = get_method("fit")
    recipe = Recipe(method.short_name(config), "fit", config)
    device = resolve_device(device)
    art = quantize_model(model, recipe, device, threads, trust_remote_code, data_dir)
    built = art["recipe"]
    weights = weigh_artifact(built, art["artifact"], device, (), threads, trust_remote_code)
    fid = evaluate_model(art["artifact"], model, text=text, data_dir=data_dir, device=device, threads=threads,
                         trust_remote_code=trust_remote_code)
    gguf = built.config.family == "gguf"
    return {"recipe": built.name, "artifact": art["artifact"], "fit": art["fit"],
            "loader": GGUF_LOADER if gguf else loader(built.config.dtype),
            "vllm": None if gguf else vllm_note(art["fit"]["unit_formats"]), "measured_bytes": weights["weights_bytes"],
            "fidelity": fid["fidelity"], "text": fid["text"]}


def weigh_model(model: str | None, recipe: Recipe, device: str = "cpu", contexts: tuple[int, ...] = (),
                threads: int = 1, trust_remote_code: bool = False) -> dict:
    """Quantize (cached), then load the artifact in a fresh process: its weight bytes as loaded and the peak
    memory prefills over ``contexts`` tokens add (see ``quantlab.steps.bench.weights_step``)."""
    device = resolve_device(device)
    art = quantize_model(model, recipe, device, threads, trust_remote_code)
    result = weigh_artifact(recipe, art["artifact"], device, contexts, threads, trust_remote_code)
    return {**result, "artifact": art["artifact"]}


def bench_model(model: str, device: str = "auto", threads: int = 1, latency: LatencySettings | None = None,
                trust_remote_code: bool = False) -> dict:
    """Memory and latency of ``model`` (an artifact dir or model ref), measured in a fresh process."""
    path, recipe = resolve_target(model, trust_remote_code)
    result = {"model": model, "recipe": recipe.name,
              **bench_artifact(recipe, path, threads, latency or LatencySettings(), resolve_device(device),
                               trust_remote_code)}
    require_finite(result, f"quantlab bench {model}", "a timing or memory reading is not a number; run it again")
    return result


def evaluate_model(model: str, baseline: str | None, text: str | None = None, data_dir: str | None = None,
                   device: str = "auto", threads: int = 1, settings: FidelitySettings | None = None,
                   per_token_path: str | None = None, trust_remote_code: bool = False,
                   max_memory: str | None = None) -> dict:
    """Fidelity of ``model`` (an artifact dir or model ref) against ``baseline`` (a model ref), in this process:
    one evaluation measures no memory or time. Under a memory budget the reference and the candidate are
    planned first (``quantlab.plan.steps``): layer by layer when the fp model does not fit, refused when the
    candidate does not."""
    text_for = reference_text(text, data_dir)
    path, recipe = resolve_target(model, trust_remote_code)
    base = resolve_model(baseline, trust_remote_code)
    device = resolve_device(device)
    settings = settings or FidelitySettings()
    plans = eval_plans(base, recipe, settings, device, resolve_budget(max_memory))
    text_source = text_for(base, device)
    with torch_threads(threads):
        out = measure_fidelity(base, text_source, settings, device, [Candidate(recipe, path, per_token_path)], plans)
    return {"model": model, "baseline": {"ref": base.ref, "fingerprint": base.fingerprint, "note": base.note},
            "recipe": recipe.name, "text": text_source.to_dict(), "fidelity": out["results"][0],
            "reference_mode": out["reference_mode"],
            "plans": {name: plan.to_dict() for name, plan in plans.items()} or None}


def _refuse_unused(options: dict, needs: str) -> None:
    """An option given to a command that will not use it is a mistake worth a line, not silence."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise UsageError(f"{', '.join(given)} {verb} only with {needs} — add it, or drop {', '.join(given)}")


def eval_plans(base, recipe: Recipe, settings: FidelitySettings, device: str, budget: int | None) -> dict:
    """The reference and fidelity plans within ``budget``; a step that cannot fit is an error before work."""
    plans = budget_steps(base, [recipe], settings, LatencySettings(), device, budget).get(recipe.name)
    return {name: require_fits(plans[name]) for name in ("reference", "fidelity")} if plans else {}


def _check_accuracy_fits(path, recipe: Recipe, device: str, budget: int | None, trust_remote_code: bool) -> None:
    """Under a budget, the accuracy step's plan (the model loaded whole and a batch of requests) must fit: an error
    before the model loads, not an over-budget step."""
    if budget is None:
        return
    plan = plan_accuracy(recipe, model_shapes(load_config(path, trust_remote_code), trust_remote_code), device, budget)
    if plan.mode == SKIPPED:
        raise UsageError(f"--max-memory: accuracy: {plan.reason} — raise --max-memory, or evaluate fidelity alone "
                         "(--baseline), which runs layer by layer")


def evaluate(model: str, tasks: str | None = None, suite: str | None = None, limit: int | None = None,
             batch_size: int | None = None, include_path: str | None = None, output: str | None = None,
             baseline: str | None = None, text: str | None = None, data_dir: str | None = None,
             per_token: str | None = None, device: str = "auto", threads: int = 1,
             trust_remote_code: bool = False, shard: str | None = None, max_memory: str | None = None) -> dict:
    """``quantlab eval``: suite accuracy and/or fidelity; everything validated before a model loads.

    With ``output``, the full result (per-sample scores included) is written there atomically; the return
    value leaves the per-sample rows out.
    """
    settings = task_settings(tasks, suite, limit=limit, batch_size=batch_size, data_dir=data_dir,
                             include_path=include_path, shard=parse_shard(shard))
    if settings is None and baseline is None:
        raise UsageError("Nothing to evaluate — give --tasks/--suite for accuracy and/or --baseline for fidelity")
    resolve_budget(max_memory)  # every option is checked, whether or not the step that uses it runs
    if baseline is None:
        _refuse_unused({"--text": text, "--per-token": per_token}, "--baseline (fidelity)")
    if settings is None:
        _refuse_unused({"--limit": limit, "--batch-size": batch_size, "--include-path": include_path, "--shard": shard},
                       "--tasks or --suite (accuracy)")
    if settings is not None:
        check_tasks(settings)
    for path, option in ((output, "--output"), (per_token, "--per-token")):
        if path:
            check_output_file(path, option)
    result = {"model": model, "runs": []}
    if settings:
        path, recipe = resolve_target(model, trust_remote_code)
        _check_accuracy_fits(path, recipe, resolve_device(device), resolve_budget(max_memory), trust_remote_code)
        result = suite_result(model, path, recipe, settings, prepare_tasks(settings), resolve_device(device), threads,
                              trust_remote_code)
    if baseline:
        if per_token:
            claim_output_file(per_token, "--per-token")
        fid = evaluate_model(model, baseline, text, data_dir, device, threads, per_token_path=per_token,
                             trust_remote_code=trust_remote_code, max_memory=max_memory)
        if result["runs"]:
            result["runs"][0]["fidelity"] = fid["fidelity"]
            result["fidelity_baseline"] = fid["baseline"]
        else:
            result = fid
    result["model_fingerprint"] = source_fingerprint(model, trust_remote_code)  # the gate pairs only same-model files
    require_finite(result, f"quantlab eval {model}", "nothing was written; the model computes NaN or inf — if it "
                   "is held in float16, evaluate a bfloat16 or float32 version")
    if output:
        write_output_file(output, (json.dumps(result, indent=2, default=str) + "\n").encode(), "--output")
    shown = copy.deepcopy(result)
    for run in shown.get("runs", []):
        if "accuracy" in run:
            run["accuracy"].pop("samples", None)
            run["accuracy"]["samples_in"] = output
    return shown
