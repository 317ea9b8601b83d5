"""Recipes: a quantization method plus its parameters, named on the command line or in YAML.

A recipe is written as a short name (``bnb-nf4``, ``rtn-w4-g64``) or as a YAML mapping with
``method:`` and the method's parameters (list values make a grid, see ``expand_recipes``). Unknown keys are
errors that name the allowed keys.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

from quantlab.errors import RecipeError
from quantlab.methods import all_methods, get_method

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
        method = get_method(data["method"])
        return cls(name=data["name"], method=data["method"], config=method.config_cls(**data["params"]))


def parse_recipe(name: str) -> Recipe:
    """Turn a short name such as ``bnb-nf4`` into a Recipe, or explain what would have been valid."""
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
    _check_types(method.config_cls, params, where)
    try:
        config = method.config_cls(**params)
    except TypeError as exc:
        raise RecipeError(f"{where}: {exc} — check the recipe's parameters") from None
    name = str(data.get("name") or method.short_name(config))
    return Recipe(name=name, method=method.name, config=config)


def expand_recipes(items, where: str) -> list[Recipe]:
    """A recipe file's ``recipes:`` list: short names and mappings; a mapping with list values becomes one recipe
    per combination (a grid), named by the method's short name plus ``key=value`` for each varied parameter
    the short name does not show (``gptq-w4-g64 calibration=self``), so every recipe has a distinct name.
    ``count_recipes`` says how many that is without making them."""
    out: list[Recipe] = []
    for at, item in _items(items, where):
        if isinstance(item, str):
            out.append(parse_recipe(item))
            continue
        grid = _axes(item, at)
        for values in itertools.product(*grid.values()):
            recipe = recipe_from_mapping({**item, **dict(zip(grid, values))}, at)
            out.append(_grid_name(recipe, dict(zip(grid, values)), grid))
    return _distinct(out, where)


def count_recipes(items, where: str) -> int:
    """How many recipes ``expand_recipes`` makes (at most: a grid point equal to another is run once), from the
    grid axes' lengths alone, so a grid of 10^6 points is counted, and can be refused, in microseconds."""
    return sum(math.prod(len(v) for v in _axes(item, at).values()) if isinstance(item, dict) else 1
               for at, item in _items(items, where))


def _items(items, where: str):
    """(where, item) of each entry of a ``recipes:`` list, which must be a non-empty list of names and mappings."""
    if not isinstance(items, list) or not items:
        raise RecipeError(f"{where}: 'recipes' must be a non-empty list of names or mappings — e.g. [fp, bnb-nf4]")
    for i, item in enumerate(items):
        at = f"{where}: recipes[{i}]"
        if not isinstance(item, (str, dict)):
            raise RecipeError(f"{at}: expected a recipe name or mapping, got {type(item).__name__}")
        yield at, item


def _axes(item: dict, at: str) -> dict:
    """A mapping's grid axes (its list values); an empty one would silently make no recipe at all."""
    grid = {k: v for k, v in item.items() if _is_axis(item.get("method"), k, v)}
    empty = [k for k, v in grid.items() if not v]
    if empty:
        raise RecipeError(f"{at}: '{empty[0]}' is an empty list, which makes no recipe — give it at least one value")
    if "name" in item and grid:
        raise RecipeError(f"{at}: a grid (list-valued {', '.join(grid)}) cannot carry one 'name' — drop it")
    return grid


#: a parameter's annotation -> the YAML values it takes; other annotations (unions, tuples) are the method's to check
_TYPES = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "a string"),
          "bool": ((bool,), "true or false")}


def _check_types(config_cls, params: dict, where: str) -> None:
    """A value of the wrong type, named before the method sees it: a list or mapping where one value belongs (a
    TypeError deep in the grid otherwise), a bool for a number (true would be 1), 64.0 for an integer."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for key, value in params.items():
        annotation = str(fields[key].type)
        if isinstance(value, (list, dict)) and not annotation.startswith("tuple"):
            kind = "list" if isinstance(value, list) else "mapping"
            raise RecipeError(f"{where}: {key} must be one value, not a {kind} (got {value!r}) — give one value per "
                              f"grid point, e.g. {key}: {fields[key].default!r}")
        allowed, noun = _TYPES.get(annotation, (None, ""))
        if allowed is None or (isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))):
            continue
        hint = "; YAML reads 1e-4 as text: write 1.0e-4" if noun == "a number" and isinstance(value, str) else ""
        example = f"{key}: {fields[key].default!r}"
        raise RecipeError(f"{where}: {key} must be {noun} (got {value!r}{hint}) — e.g. {example}")


def _is_axis(method_name, key: str, value) -> bool:
    """A list value is a grid axis, except for a parameter that is itself a list (a fit's formats): there only a
    list of lists is one."""
    if not isinstance(value, list):
        return False
    try:
        fields = {f.name: f for f in dataclasses.fields(get_method(str(method_name)).config_cls)}
    except RecipeError:
        return True
    field = fields.get(key)
    listed = field is not None and isinstance(field.default, tuple)
    return not listed or all(isinstance(v, list) for v in value)


def _distinct(recipes: list[Recipe], where: str) -> list[Recipe]:
    """One recipe per distinct (method, config): a grid point equal to a listed recipe is not run twice."""
    by_name: dict[str, Recipe] = {}
    by_config: set[tuple] = set()
    for r in recipes:
        if r.name in by_name and by_name[r.name].config != r.config:
            raise RecipeError(f"{where}: two different recipes are both named '{r.name}' — name one of them")
        if (r.method, r.config) not in by_config:
            by_name.setdefault(r.name, r)
            by_config.add((r.method, r.config))
    return list(by_name.values())


def _grid_name(recipe: Recipe, varied: dict, axes: dict) -> Recipe:
    """Append ``key=value`` for each varied parameter the method's short name does not already show."""
    if not varied:
        return recipe
    method = get_method(recipe.method)
    shown = method.short_name(recipe.config)
    try:
        default = method.config_cls()
    except RecipeError:  # a method with a required parameter (a fit's budget)
        default = None
    hidden = []
    for key, value in varied.items():
        if default is None:  # shown when another point of the axis leaves the short name unchanged
            other = next(v for v in axes[key] if v != value) if len(set(map(str, axes[key]))) > 1 else value
            probe = recipe_from_mapping({**recipe.params(), "method": recipe.method, key: other}, "grid")
            if method.short_name(probe.config) == shown:
                hidden.append(f"{key}={value}")
            continue
        probe = dataclasses.replace(recipe.config, **{key: getattr(default, key)})
        if method.short_name(probe) == shown and value != getattr(default, key) or key in _ALWAYS_SHOWN:
            hidden.append(f"{key}={value}")
    name = recipe.name if recipe.name != shown else " ".join([shown, *hidden])
    return dataclasses.replace(recipe, name=name)


_ALWAYS_SHOWN = ("calibration", "train_text")  # data choices: shown even at their default, so a grid over them reads


def _reject_duplicates(recipes: list[Recipe]) -> None:
    seen: set[str] = set()
    for r in recipes:
        if r.name in seen:
            raise RecipeError(f"Recipe '{r.name}' is listed twice — list each recipe once")
        seen.add(r.name)


def _unknown_recipe_message(text: str) -> str:
    import difflib

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
