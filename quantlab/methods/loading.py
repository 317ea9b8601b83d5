"""Load an artifact (or the fp source) the way its layout says, with no quantlab code in the model."""

from __future__ import annotations

from quantlab.methods import get_method


def load_recipe_model(path: str, recipe, device: str, trust_remote_code: bool = False):
    method = get_method(recipe.method)
    method.require(recipe.config)
    return method.layout(recipe.config).load(path, device, trust_remote_code)
