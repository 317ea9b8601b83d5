"""Load an artifact (or the fp source) the way its recipe's layout says, with no quantlab code in the model.

It sits with the layouts because the layout is what knows how its bytes load; the method registry only names the
recipe's layout. Evaluation, calibration and the steps all load through it.
"""

from __future__ import annotations

from quantlab.methods import get_method


def load_recipe_model(path: str, recipe, device: str, trust_remote_code: bool = False, prepare: bool = True):
    """The model at ``path`` loaded whole, prepared for its first forward (``Layout.prepare``) unless ``prepare`` is
    False: a step that weighs the model as loaded prepares it itself afterwards (``prepare_model``)."""
    method = get_method(recipe.method)
    method.require(recipe.config)
    model = method.layout(recipe.config).load(path, device, trust_remote_code)
    return prepare_model(model, recipe, device) if prepare else model


def prepare_model(model, recipe, device: str):
    """``Layout.prepare`` of the recipe's layout on a model loaded whole; returns the model."""
    get_method(recipe.method).layout(recipe.config).prepare(model, device)
    return model
