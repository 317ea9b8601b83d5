"""The planner: a Spec becomes jobs, with everything checked before any heavy work starts.

Cheap checks come first (recipes' libraries, the suite's tasks and files, the reference text), then each model
is resolved (a GGUF is converted once) and every recipe is checked against its layers. The fp baseline is
added when missing and every trained recipe brings its PTQ twin (same format, no training).
"""

from __future__ import annotations

from typing import Callable

from quantlab.device import resolve_device
from quantlab.evaluate.fidelity import FidelitySettings
from quantlab.evaluate.harness import check_tasks, prepare_tasks
from quantlab.evaluate.suites import load_suite
from quantlab.evaluate.text import TextSource, resolve_text
from quantlab.evaluate.text import data_dir as find_data_dir
from quantlab.measure.latency import LatencySettings
from quantlab.methods import get_method
from quantlab.models.load import load_config
from quantlab.models.shapes import linear_shapes
from quantlab.models.source import ModelSource, resolve_model
from quantlab.plan.shapes import check_config, model_shapes, require_linears
from quantlab.plan.steps import StepPlan, plan_steps, require_fits, resolve_budget
from quantlab.recipe import Recipe, parse_recipe
from quantlab.sweep.jobs import Job, make_job
from quantlab.sweep.spec import Spec


def plan_jobs(spec: Spec) -> list[Job]:
    """The spec's jobs in order: per model, fp first, then the recipes (twins just before their trained recipe)."""
    recipes = with_baseline_and_twins(spec.recipes)
    require_libraries(recipes)
    data_dir = resolved_data_dir(spec.data_dir)
    device = resolve_device(spec.device)
    suite, prepared = None, None
    if spec.suite:
        suite = load_suite(spec.suite, data_dir=data_dir)
        check_tasks(suite)
        prepared = prepare_tasks(suite)
    text_for = reference_text(spec.text, data_dir)
    budget = resolve_budget(spec.max_memory)
    jobs = []
    for ref in spec.models:
        source = resolve_checked(ref, recipes, spec.trust_remote_code)
        steps = budget_steps(source, recipes, spec.fidelity, spec.latency, device, budget)
        if steps:  # the same for every recipe: a budget the fp reference cannot run in, even layer by layer
            require_fits(steps[recipes[0].name]["reference"], f"{source.ref}'s fp reference")
        text = text_for(source, device)
        jobs += [make_job(source, r, text, spec.fidelity, spec.latency, suite, prepared, device, spec.threads, data_dir,
                          steps.get(r.name), budget) for r in recipes]
    return jobs


def budget_steps(source: ModelSource, recipes, fidelity: FidelitySettings, latency: LatencySettings, device: str,
                 budget: int | None) -> dict[str, dict[str, StepPlan]]:
    """Each recipe's step plans within ``budget`` (none without one): the one place a budget is planned, for a
    sweep's jobs and for the single-model commands (quantize, eval, fit) alike."""
    if budget is None:
        return {}
    shapes = source_shapes(source)
    return {r.name: plan_steps(r, shapes, fidelity, latency, device, budget) for r in recipes}


def source_shapes(source: ModelSource):
    return model_shapes(load_config(source.path, source.trust_remote_code), source.trust_remote_code)


def with_baseline_and_twins(recipes) -> list[Recipe]:
    """The fp baseline first when not listed; each trained recipe's PTQ twin just before it, unless listed."""
    recipes = list(recipes)
    if not any(r.method == "fp" for r in recipes):
        recipes.insert(0, parse_recipe("fp"))
    names = {r.name for r in recipes}
    out: list[Recipe] = []
    for r in recipes:
        twin = get_method(r.method).ptq_twin(r.config)
        if twin and twin not in names and not any(t.name == twin for t in out):
            out.append(parse_recipe(twin))
        out.append(r)
    return out


def require_libraries(recipes) -> None:
    for r in recipes:
        get_method(r.method).require(r.config)


def resolve_checked(ref: str | None, recipes, trust_remote_code: bool) -> ModelSource:
    """Resolve a model and check every recipe against its linear layers (group sizes and the like), its config's
    shape fields first (a layer count of 0 or 10^7 is named, not built)."""
    source = resolve_model(ref, trust_remote_code)
    config = load_config(source.path, trust_remote_code)
    check_config(config, require=())
    shapes = linear_shapes(config, trust_remote_code)
    quantized = [r.name for r in recipes if get_method(r.method).writes_artifact]
    if quantized:
        require_linears(len(shapes), source.ref, f"{', '.join(quantized)} would quantize nothing")
    for r in recipes:
        get_method(r.method).check_model(r.config, shapes)
        get_method(r.method).check_source(r.config, source.path)
    return source


def reference_text(text: str | None, data_dir: str | None) -> Callable[[ModelSource, str], TextSource]:
    """The reference text in two steps: a file or data-dir dataset is resolved (and checked) now, before any
    model is; ``self`` is generated once the model is known. Returns (model source, device) -> TextSource."""
    fixed = None if text == "self" else resolve_text(text, data_dir)
    return lambda source, device: fixed or resolve_text("self", data_dir, model=source, device=device)


def resolved_data_dir(explicit: str | None) -> str | None:
    """The data dir as an absolute path (``--data-dir``, QUANTLAB_DATA_DIR, or ../shared/data), so every step
    and worker process reads the same files whatever its working directory."""
    found = find_data_dir(explicit)
    return str(found.resolve()) if found else None
