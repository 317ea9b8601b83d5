"""Sweep jobs: one (model, recipe) under one evaluation and measurement setting, content-addressed.

A job's key is the sha256 of everything that can change its result: the artifact key (model fingerprint,
recipe, calibration data sha256, quantlab version, the method's library versions, device class), the
evaluation text sha256 and fidelity settings, the latency settings and threads, and the suite's settings,
data sha256 and lm-eval version. A finished job is cached under ``QUANTLAB_HOME/jobs/<key>/`` (written to
a temp dir and renamed into place), so a rerun reuses it whole.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from quantlab.recipe import Recipe


@dataclass(frozen=True)
class Job:
    key: str
    model: dict  # ModelSource
    recipe: Recipe
    text: dict  # TextSource
    fidelity: dict
    latency: dict
    suite: dict | None  # HarnessSettings
    prepared: dict | None  # PreparedTasks
    device: str
    threads: int

    @property
    def label(self) -> str:
        return f"{self.model['ref']}@{self.recipe.name}"

    def payload(self) -> dict:
        return {"key": self.key, "model": self.model, "recipe": self.recipe.to_dict(), "text": self.text,
                "fidelity": self.fidelity, "latency": self.latency, "suite": self.suite, "prepared": self.prepared,
                "device": self.device, "threads": self.threads}


def job_dir(key: str) -> Path:
    from quantlab.models import quantlab_home

    return quantlab_home() / "jobs" / key[:2] / key


def job_key(source, recipe: Recipe, text, fidelity: dict, latency: dict, suite: dict | None, prepared: dict | None,
            device: str, threads: int) -> str:
    from quantlab.artifacts import artifact_key
    from quantlab.provenance import library_version

    payload = {
        "artifact": artifact_key(source, recipe, device), "recipe_name": recipe.name,
        "text": text.sha256, "fidelity": fidelity, "latency": latency, "threads": threads,
        "suite": suite and {k: v for k, v in suite.items() if k != "data_dir"},
        "suite_data": prepared and {t: d["files"] for t, d in prepared["data"].items()},
        "lm_eval": library_version("lm_eval") if suite else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def plan_jobs(spec) -> list[Job]:
    """Resolve every model, text and suite of a sweep and validate each recipe against each model before any
    work starts; returns the jobs in sweep order (fp first per model; QAT recipes bring their PTQ twins)."""
    import dataclasses

    from quantlab.evaluate.fidelity import FidelitySettings
    from quantlab.measure.latency import LatencySettings
    from quantlab.pipeline import resolve_device
    from quantlab.recipe import parse_recipe_list
    from quantlab.twins import with_twins

    ev, me = spec.evaluation, spec.measure
    fidelity = dataclasses.replace(FidelitySettings(), **{k: v for k, v in
                                                          {"max_chunks": ev.get("chunks"),
                                                           "chunk_tokens": ev.get("chunk_tokens")}.items() if v})
    latency = LatencySettings(**{k: tuple(v) if k == "batch_sizes" else v for k, v in me.items()})
    suite, prepared = _suite(ev.get("suite"), spec.data_dir)
    device = resolve_device(spec.device)
    recipes = list(spec.recipes)
    if not any(r.method == "fp" for r in recipes):
        recipes.insert(0, parse_recipe_list("fp")[0])
    recipes = with_twins(recipes)
    jobs = []
    for ref in spec.models:
        source, text = _model_and_text(ref, recipes, ev.get("text"), spec.data_dir, device)
        jobs += make_jobs(source, text, recipes, fidelity.to_dict(), latency.to_dict(), suite, prepared, device,
                          spec.threads)
    return jobs


def make_jobs(source, text, recipes: list[Recipe], fidelity: dict, latency: dict, suite: dict | None,
              prepared: dict | None, device: str, threads: int) -> list[Job]:
    """One model's jobs, in recipe order (the model, text and recipes already resolved and validated)."""
    return [Job(key=job_key(source, recipe, text, fidelity, latency, suite, prepared, device, threads),
                model=source.to_dict(), recipe=recipe, text=text.to_dict(), fidelity=fidelity, latency=latency,
                suite=suite, prepared=prepared, device=device, threads=threads) for recipe in recipes]


def _suite(name: str | None, data_dir: str | None) -> tuple[dict | None, dict | None]:
    if not name:
        return None, None
    from quantlab.evaluate.harness import check_tasks
    from quantlab.evaluate.suites import load_suite

    settings = load_suite(name, data_dir=data_dir)
    check_tasks(settings)
    return suite_payload(settings)


def suite_payload(settings) -> tuple[dict, dict]:
    """A suite's (HarnessSettings) settings and prepared local tasks, as a job carries them."""
    import dataclasses

    from quantlab.evaluate.harness import prepare_tasks

    return settings.to_dict(), dataclasses.asdict(prepare_tasks(settings))


def _model_and_text(ref: str, recipes: list[Recipe], text: str | None, data_dir: str | None, device: str):
    from quantlab.evaluate.text import resolve_text
    from quantlab.methods import get_method
    from quantlab.models import linear_shapes, load_config, resolve_model

    for r in recipes:
        get_method(r.method).require(r.config)
    source = resolve_model(ref)
    shapes = linear_shapes(load_config(source.path))
    for r in recipes:
        get_method(r.method).check_model(r.config, shapes)
    if text == "self":
        return source, resolve_text("self", data_dir, model=source, device=device)
    return source, resolve_text(text, data_dir)
