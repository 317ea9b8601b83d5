"""Load an artifact (or the fp source) the way its layout says, with no quantlab code in the model."""

from __future__ import annotations

from quantlab.methods import get_method
from quantlab.models import load_causal_lm


def load_recipe_model(path: str, recipe, device: str, trust_remote_code: bool = False):
    method = get_method(recipe.method)
    method.require(recipe.config)
    return load_causal_lm(path, device=device, trust_remote_code=trust_remote_code,
                          **method.layout(recipe.config).load_kwargs(device))
