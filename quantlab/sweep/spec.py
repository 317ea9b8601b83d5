"""Sweep files: models x recipes (with parameter grids) x one evaluation and measurement setting.

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
```

Unknown keys anywhere are errors naming the allowed ones. A grid's recipes are named by the method's short
name plus ``key=value`` for each grid parameter the short name does not show (``gptq-w4-g64
calibration=self``), so every job has a distinct name.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from quantlab.errors import RecipeError, UsageError
from quantlab.recipe import Recipe

TOP_KEYS = ("description", "models", "model", "recipes", "evaluation", "measure", "device", "threads", "data_dir")
EVAL_KEYS = ("text", "chunks", "chunk_tokens", "suite")
MEASURE_KEYS = ("batch_sizes", "repetitions", "decode_tokens", "prompt_tokens", "warmup")


@dataclass(frozen=True)
class SweepSpec:
    path: str
    description: str
    models: tuple[str, ...]
    recipes: tuple[Recipe, ...]
    evaluation: dict = field(default_factory=dict)
    measure: dict = field(default_factory=dict)
    device: str = "auto"
    threads: int = 1
    data_dir: str | None = None


def load_sweep(path: str | Path) -> SweepSpec:
    from quantlab.fsutil import load_yaml

    path = Path(path)
    data = load_yaml(path, "Sweep file", "give a sweep YAML such as experiments/smollm2-default.yaml")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping with 'models' and 'recipes' — see experiments/")
    _check_keys(data, TOP_KEYS, str(path))
    if "models" in data and "model" in data:
        raise UsageError(f"{path}: give 'models' (a list) or 'model', not both")
    models = data.get("models") or ([data["model"]] if data.get("model") else ["smollm2-135m"])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise UsageError(f"{path}: 'models' must be a list of model references, e.g. [smollm2-135m]")
    evaluation = data.get("evaluation") or {}
    measure = data.get("measure") or {}
    _check_keys(evaluation, EVAL_KEYS, f"{path}: evaluation")
    _check_keys(measure, MEASURE_KEYS, f"{path}: measure")
    threads = data.get("threads", 1)
    if not isinstance(threads, int) or threads < 1:
        raise UsageError(f"{path}: threads must be a positive integer (got {threads!r})")
    return SweepSpec(path=str(path), description=str(data.get("description") or ""), models=tuple(dict.fromkeys(models)),
                     recipes=tuple(expand_recipes(data.get("recipes"), str(path))), evaluation=dict(evaluation),
                     measure=dict(measure), device=str(data.get("device", "auto")), threads=threads,
                     data_dir=data.get("data_dir"))


def _check_keys(data, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping with keys among {', '.join(allowed)}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)} — allowed: {', '.join(allowed)}")


def expand_recipes(items, where: str) -> list[Recipe]:
    """Short names and mappings; a mapping with list values becomes one recipe per combination."""
    from quantlab.recipe import parse_recipe, recipe_from_mapping

    if not isinstance(items, list) or not items:
        raise RecipeError(f"{where}: 'recipes' must be a non-empty list of names or mappings — e.g. [fp, bnb-nf4]")
    out: list[Recipe] = []
    for i, item in enumerate(items):
        at = f"{where}: recipes[{i}]"
        if isinstance(item, str):
            out.append(parse_recipe(item))
            continue
        if not isinstance(item, dict):
            raise RecipeError(f"{at}: expected a recipe name or mapping, got {type(item).__name__}")
        grid = {k: v for k, v in item.items() if isinstance(v, list)}
        if "name" in item and grid:
            raise RecipeError(f"{at}: a grid (list-valued {', '.join(grid)}) cannot carry one 'name' — drop it")
        for values in itertools.product(*grid.values()):
            recipe = recipe_from_mapping({**item, **dict(zip(grid, values))}, at)
            out.append(_grid_name(recipe, dict(zip(grid, values))))
    by_name: dict[str, Recipe] = {}
    by_config: set[tuple] = set()
    for r in out:  # one job per distinct (method, config): a grid point equal to a listed recipe is not rerun
        if r.name in by_name and by_name[r.name].config != r.config:
            raise RecipeError(f"{where}: two different recipes are both named '{r.name}' — name one of them")
        if (r.method, r.config) not in by_config:
            by_name.setdefault(r.name, r)
            by_config.add((r.method, r.config))
    return list(by_name.values())


def _grid_name(recipe: Recipe, varied: dict) -> Recipe:
    """Append ``key=value`` for each varied parameter the method's short name does not already show."""
    from quantlab.methods import get_method

    method = get_method(recipe.method)
    shown = method.short_name(recipe.config)
    default = method.config_cls()
    hidden = []
    for key, value in varied.items():
        probe = dataclasses.replace(recipe.config, **{key: getattr(default, key)})
        if method.short_name(probe) == shown and value != getattr(default, key) or key in _ALWAYS_SHOWN:
            hidden.append(f"{key}={value}")
    name = recipe.name if recipe.name != shown else " ".join([shown, *hidden])
    return dataclasses.replace(recipe, name=name)


_ALWAYS_SHOWN = ("calibration", "train_text")  # data choices: shown even at their default, so a grid over them reads
