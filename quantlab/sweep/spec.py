"""What to run: one spec for every entry point — a sweep file, or quantize-and-compare's flags for one model.

```yaml
description: GPTQ calibration sets on SmolLM2
models: [smollm2-135m]
recipes:
  - fp
  - bnb-nf4
  - {method: rtn, bits: [4, 8], group_size: [32, 64]}          # lists expand to every combination
  - {method: gptq, bits: 4, group_size: 64, calibration: [self, c4_calibration, wikitext2_raw]}
evaluation: {text: wikitext2_raw, chunks: 16, chunk_tokens: 256, suite: quick}
measure: {batch_sizes: [1, 8], repetitions: 5, decode_tokens: 32, prompt_tokens: 128}
device: auto
threads: 1
data_dir: ../shared/data
trust_remote_code: false
```

Unknown keys anywhere are errors naming the allowed ones. An experiment file is a sweep file: the older form
with ``model:``, ``text:`` and ``recipes:`` only is read the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from quantlab.errors import UsageError
from quantlab.evaluate.fidelity import FidelitySettings
from quantlab.fsutil import load_yaml
from quantlab.measure.latency import LatencySettings
from quantlab.models.source import DEFAULT_MODEL, slug
from quantlab.recipe import DEFAULT_RECIPES, Recipe, count_recipes, expand_recipes, parse_recipe_list

TOP_KEYS = ("description", "models", "model", "recipes", "evaluation", "measure", "device", "threads", "data_dir",
            "trust_remote_code", "text", "max_memory")
EVAL_KEYS = ("text", "chunks", "chunk_tokens", "suite")
MEASURE_KEYS = ("batch_sizes", "repetitions", "decode_tokens", "prompt_tokens", "warmup")
#: The most jobs (models x recipe combinations) a sweep file runs unless ``--max-jobs`` says more. Each job is a
#: quantization, a fidelity pass and a benchmark in fresh processes, seconds on the tiny test model and minutes on
#: a real one: 1000 jobs are days of compute, past any sweep quantlab ships (the largest has 7 recipes), so a
#: larger grid is far more likely a list too many than an intent, and is refused before it is expanded.
MAX_JOBS = 1000


@dataclass(frozen=True)
class Spec:
    """Models x recipes under one evaluation and measurement setting. ``kind`` and ``label`` name the run set
    (``sweep-<file stem>`` or ``compare-<model>``) and the default output dir (``reports/<label>-<date>``)."""

    kind: str  # sweep | compare
    label: str
    models: tuple[str, ...]
    recipes: tuple[Recipe, ...]
    text: str | None = None  # None: wikitext2_raw from the data dir
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)
    latency: LatencySettings = field(default_factory=LatencySettings)
    suite: str | None = None  # a suite name (experiments/suites.yaml) or a suite YAML
    device: str = "auto"
    threads: int = 1
    data_dir: str | None = None
    trust_remote_code: bool = False
    description: str = ""
    max_memory: str | int | None = None  # the memory budget (quantlab.plan.steps); None: QUANTLAB_MAX_MEMORY or none

    @property
    def run_set_prefix(self) -> str:
        return f"{self.kind}-{self.label}"

    def default_out(self) -> Path:
        return Path("reports") / f"{self.label}-{date.today():%Y%m%d}"


def load_spec(path: str | Path, kind: str = "sweep", max_jobs: int | None = None) -> Spec:
    """A sweep (or experiment) file as a Spec; every problem is one error naming the file and the fix. A grid of
    more than ``max_jobs`` (default ``MAX_JOBS``) models x recipes is refused, counted before it is expanded."""
    path = Path(path)
    data = load_yaml(path, "Experiment file" if kind == "compare" else "Sweep file",
                     "give a sweep YAML such as experiments/sweep-smollm2.yaml")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping with 'models' and 'recipes' — see experiments/")
    _check_keys(data, TOP_KEYS, f"{path}: top-level")
    evaluation, measure = _section(data, "evaluation"), _section(data, "measure")
    _check_keys(evaluation, EVAL_KEYS, f"{path}: evaluation")
    _check_keys(measure, MEASURE_KEYS, f"{path}: measure")
    if "text" in data and "text" in evaluation:
        raise UsageError(f"{path}: give the text once — 'evaluation: {{text: ...}}' (or the older top-level 'text')")
    threads = data.get("threads", 1)
    if type(threads) is not int or threads < 1:
        raise UsageError(f"{path}: threads must be a positive integer (got {threads!r})")
    if not isinstance(data.get("trust_remote_code", False), bool):
        raise UsageError(f"{path}: trust_remote_code must be true or false")
    _check_values(data, evaluation, measure, path)
    models = _models(data, path)
    _check_size(1 if kind == "compare" else len(models), count_recipes(data.get("recipes"), str(path)), path, kind,
               MAX_JOBS if max_jobs is None else max_jobs)
    return Spec(kind=kind, label=path.stem, models=models,
                recipes=tuple(expand_recipes(data.get("recipes"), str(path))),
                text=evaluation.get("text", data.get("text")), fidelity=_fidelity(evaluation),
                latency=_latency(measure, path), suite=evaluation.get("suite"), device=str(data.get("device", "auto")),
                threads=threads, data_dir=data.get("data_dir"), trust_remote_code=data.get("trust_remote_code", False),
                description=str(data.get("description") or ""), max_memory=data.get("max_memory"))


def compare_spec(model: str | None = None, recipes: str | None = None, experiment: str | None = None,
                 **overrides) -> Spec:
    """quantize-and-compare's spec: one model, recipes from ``--recipes`` or an experiment (sweep) file, and the
    flags given (None: the file's value, else the default). Overrides: text, data_dir, suite, device, threads,
    trust_remote_code, chunks, chunk_tokens, batch_sizes, repetitions, decode_tokens, max_memory."""
    if recipes and experiment:
        raise UsageError("Give --recipes or --experiment, not both")
    if experiment:
        base = load_spec(experiment, kind="compare")
        if len(base.models) > 1 and not model:
            raise UsageError(f"{experiment} lists {len(base.models)} models; quantize-and-compare compares one — "
                             f"pass --model, or run quantlab sweep {experiment}")
    else:
        base = Spec(kind="compare", label="", models=(DEFAULT_MODEL,),
                    recipes=tuple(parse_recipe_list(recipes or DEFAULT_RECIPES)))
    model = model or base.models[0]
    given = {k: v for k, v in overrides.items() if v is not None}
    fidelity = dataclasses.replace(base.fidelity, **{f: given[k] for k, f in (("chunks", "max_chunks"),
                                                                            ("chunk_tokens", "chunk_tokens")) if k in given})
    latency = dataclasses.replace(base.latency, **{k: tuple(given[k]) if k == "batch_sizes" else given[k]
                                                   for k in ("batch_sizes", "repetitions", "decode_tokens") if k in given})
    plain = {k: given[k] for k in ("text", "data_dir", "suite", "device", "threads", "max_memory") if k in given}
    return dataclasses.replace(base, kind="compare", label=slug(model), models=(model,), fidelity=fidelity,
                               latency=latency, **plain,
                               trust_remote_code=base.trust_remote_code or bool(given.get("trust_remote_code")))


def _check_size(models: int, recipes: int, path, kind: str, max_jobs: int) -> None:
    """Refuse a grid of more than ``max_jobs`` jobs before any of it is made, saying how many it would be."""
    jobs = models * recipes
    if jobs <= max_jobs:
        return
    how = (f"pass --max-jobs {jobs} if you mean it" if kind == "sweep"
           else f"run it as a sweep: quantlab sweep {path} --max-jobs {jobs}")
    raise UsageError(f"{path}: {jobs:,} jobs ({models:,} model{'s' * (models != 1)} x {recipes:,} "
                     f"recipe{'s' * (recipes != 1)}), over the limit of {max_jobs:,} — trim the grid's lists, "
                     f"or {how}")


def _models(data: dict, path: Path) -> tuple[str, ...]:
    """``models`` (a non-empty list), or the older ``model`` (one), or neither: the default model. An empty list
    is refused, not read as 'the default'."""
    if "models" in data and "model" in data:
        raise UsageError(f"{path}: give 'models' (a list) or 'model', not both")
    if "model" in data and not (isinstance(data["model"], str) and data["model"].strip()):
        raise UsageError(f"{path}: 'model' must be a model reference, e.g. smollm2-135m (got {data['model']!r})")
    models = data.get("models", [data.get("model", DEFAULT_MODEL)])
    if not isinstance(models, list) or not models:
        raise UsageError(f"{path}: 'models' must be a non-empty list of model references, e.g. [smollm2-135m] "
                         f"(got {models!r:.80}) — or leave it out for the default, {DEFAULT_MODEL}")
    bad = next((i for i, m in enumerate(models) if not (isinstance(m, str) and m.strip())), None)
    if bad is not None:
        raise UsageError(f"{path}: models[{bad}] must be a model reference such as smollm2-135m (got {models[bad]!r})")
    return tuple(dict.fromkeys(models))


def _section(data: dict, key: str) -> dict:
    """``evaluation`` or ``measure``: a mapping; absent or left empty (``measure:``) means the defaults."""
    value = data.get(key)
    return {} if value is None else value


def _fidelity(evaluation: dict) -> FidelitySettings:
    given = {"max_chunks": evaluation.get("chunks"), "chunk_tokens": evaluation.get("chunk_tokens")}
    return dataclasses.replace(FidelitySettings(), **{k: v for k, v in given.items() if v})


def _latency(measure: dict, path: Path) -> LatencySettings:
    try:
        return LatencySettings.from_dict(measure)
    except TypeError as exc:
        raise UsageError(f"{path}: measure: {exc} — see experiments/sweep-smollm2.yaml") from None


#: (section, key) -> the least value of an integer setting; None: a string
_VALUES = {("", "device"): None, ("", "data_dir"): None, ("", "text"): None, ("evaluation", "text"): None,
           ("evaluation", "suite"): None, ("evaluation", "chunks"): 1, ("evaluation", "chunk_tokens"): 8,
           ("measure", "repetitions"): 1, ("measure", "decode_tokens"): 1, ("measure", "prompt_tokens"): 1,
           ("measure", "warmup"): 0}


def _check_values(data: dict, evaluation: dict, measure: dict, path: Path) -> None:
    """Each setting's type and range, before any model loads (the CLI's flags are checked the same way)."""
    sections = {"": data, "evaluation": evaluation, "measure": measure}
    for (section, key), least in _VALUES.items():
        if key not in sections[section]:
            continue
        value, where = sections[section][key], f"{path}: {section + ': ' if section else ''}{key}"
        if least is None and not (isinstance(value, str) and value):
            raise UsageError(f"{where} must be a non-empty string (got {value!r})")
        if least is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise UsageError(f"{where} must be an integer ≥ {least} (got {value!r})")
    sizes = measure.get("batch_sizes", [1])
    if not isinstance(sizes, list) or not sizes or not all(type(b) is int and b >= 1 for b in sizes):
        raise UsageError(f"{path}: measure: batch_sizes must be a non-empty list of positive integers, e.g. [1, 8] "
                         f"(got {sizes!r})")


def _check_keys(data, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping with keys among {', '.join(allowed)}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)} — allowed: {', '.join(allowed)}")
