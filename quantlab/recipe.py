"""Recipes: a quantization method plus its parameters, named on the command line or in YAML.

A recipe is written as a short name (``bnb-nf4``, ``rtn-w4-g64``) or as a YAML mapping with
``method:`` and the method's parameters. Unknown keys are errors that name the allowed keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantlab.errors import RecipeError

#: What ``quantize-and-compare`` runs when no recipes are given.
DEFAULT_RECIPES = "fp,bnb-int8,bnb-nf4,rtn-w8,rtn-w4-g64,gptq-w8,gptq-w4-g64"

@dataclass(frozen=True)
class Recipe:
    """A named method configuration. ``name`` is the kebab-case key used in CLI, YAML and store."""

    name: str
    method: str
    config: Any

    @property
    def bits(self) -> int:
        return self.config.bits

    def params(self) -> dict:
        return dataclasses.asdict(self.config)

    def to_dict(self) -> dict:
        return {"name": self.name, "method": self.method, "params": self.params()}

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        from quantlab.methods import get_method

        method = get_method(data["method"])
        return cls(name=data["name"], method=data["method"], config=method.config_cls(**data["params"]))


def parse_recipe(name: str) -> Recipe:
    """Turn a short name such as ``bnb-nf4`` into a Recipe, or explain what would have been valid."""
    from quantlab.methods import all_methods, get_method

    text = name.strip()
    for method_name in all_methods():
        method = get_method(method_name)
        config = method.parse_short_name(text)
        if config is not None:
            return Recipe(name=method.short_name(config), method=method_name, config=config)
    raise RecipeError(_unknown_recipe_message(text))


def parse_recipe_list(text: str) -> list[Recipe]:
    """Parse ``fp,bnb-nf4,rtn-w4-g64``; duplicates are errors (each name is one run)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise RecipeError("No recipes given — pass a comma-separated list such as 'fp,bnb-nf4'")
    recipes = [parse_recipe(n) for n in names]
    _reject_duplicates(recipes)
    return recipes


def recipe_from_mapping(data: dict, where: str) -> Recipe:
    """Build a recipe from a YAML mapping ``{method: rtn, bits: 4, group_size: 64, name: ...}``."""
    from quantlab.methods import get_method

    if "method" not in data:
        raise RecipeError(f"{where}: recipe has no 'method' key — add e.g. 'method: rtn'")
    method = get_method(str(data["method"]))
    fields = {f.name for f in dataclasses.fields(method.config_cls)}
    params = {k: v for k, v in data.items() if k not in ("method", "name")}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise RecipeError(
            f"{where}: unknown key(s) {', '.join(unknown)} for method '{method.name}' — "
            f"allowed: name, method, {', '.join(sorted(fields))}"
        )
    try:
        config = method.config_cls(**params)
    except TypeError as exc:
        raise RecipeError(f"{where}: {exc} — check the recipe's parameters") from None
    name = str(data.get("name") or method.short_name(config))
    return Recipe(name=name, method=method.name, config=config)


def load_recipes_yaml(path: str | Path) -> list[Recipe]:
    """Read ``recipes:`` from an experiment YAML: a list of short names or mappings."""
    from quantlab.fsutil import load_yaml

    path = Path(path)
    data = load_yaml(path, "Experiment file", "check the path", RecipeError)
    if not isinstance(data, dict) or not isinstance(data.get("recipes"), list):
        raise RecipeError(f"{path}: expected a mapping with a 'recipes:' list — see experiments/default.yaml")
    unknown = sorted(set(data) - {"recipes", "model", "text", "description"})
    if unknown:
        raise RecipeError(
            f"{path}: unknown top-level key(s) {', '.join(unknown)} — allowed: description, model, recipes, text"
        )
    recipes = []
    for i, item in enumerate(data["recipes"]):
        where = f"{path}: recipes[{i}]"
        if isinstance(item, str):
            recipes.append(parse_recipe(item))
        elif isinstance(item, dict):
            recipes.append(recipe_from_mapping(item, where))
        else:
            raise RecipeError(f"{where}: expected a recipe name or mapping, got {type(item).__name__}")
    _reject_duplicates(recipes)
    return recipes


def load_experiment(path: str | Path) -> dict:
    """The experiment file's optional model and text, beside its recipes."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    return {"model": data.get("model"), "text": data.get("text"), "recipes": load_recipes_yaml(path)}


def _reject_duplicates(recipes: list[Recipe]) -> None:
    seen: set[str] = set()
    for r in recipes:
        if r.name in seen:
            raise RecipeError(f"Recipe '{r.name}' is listed twice — list each recipe once")
        seen.add(r.name)


def _unknown_recipe_message(text: str) -> str:
    import difflib

    from quantlab.methods import all_methods, get_method

    examples: list[str] = []
    for method_name in all_methods():
        method = get_method(method_name)
        if text.startswith(method_name + "-") or text == method_name:
            hint = method.explain_short_name(text)
            if hint:
                return f"Invalid recipe '{text}': {hint}"
        examples.extend(method.example_names)
    close = difflib.get_close_matches(text, examples + list(all_methods()), n=1, cutoff=0.5)
    guess = f" Did you mean '{close[0]}'?" if close else ""
    return f"Unknown recipe '{text}'.{guess} Available: {', '.join(examples)}"
