"""Lazy method registry. Built-in methods register through the same call an outside package uses.

A method is named by a ``"module:Class"`` string and imported on first use, so listing methods or
parsing a recipe never imports torch.
"""

from __future__ import annotations

import difflib
import importlib

from quantlab.errors import RecipeError

_REGISTRY: dict[str, str] = {}
_LOADED: dict[str, object] = {}


def register_method(name: str, target: str) -> None:
    """Register a method class by import path, e.g. ``register_method("rtn", "quantlab.methods.rtn:RtnMethod")
register_method("gptq", "quantlab.methods.gptq:GptqMethod")``."""
    _REGISTRY[name] = target
    _LOADED.pop(name, None)


def all_methods() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str):
    """Return the method instance for ``name``; an unknown name gets a did-you-mean answer."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
        guess = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"Unknown method '{name}'.{guess} Available: {', '.join(_REGISTRY)}")
    if name not in _LOADED:
        module_name, _, class_name = _REGISTRY[name].partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        _LOADED[name] = cls()
    return _LOADED[name]


register_method("fp", "quantlab.methods.fp:FpMethod")
register_method("bnb", "quantlab.methods.bnb:BnbMethod")
register_method("rtn", "quantlab.methods.rtn:RtnMethod")
register_method("gptq", "quantlab.methods.gptq:GptqMethod")
register_method("torchao", "quantlab.methods.torchao_ptq:TorchaoMethod")
register_method("qat", "quantlab.methods.qat:QatMethod")
