"""Lazy method registry. Built-in methods register through the same call an outside package's do.

A method is named by a ``"module:Class"`` string and imported on first use, so listing methods or
parsing a recipe never imports torch. An installed distribution adds methods through the
``quantlab.methods`` entry-point group (``name = "package.module:MethodClass"``); each is registered with
``register_method`` like the built-ins below, the first time the registry is read.
"""

from __future__ import annotations

import difflib
import importlib

from quantlab.errors import RecipeError

ENTRY_POINT_GROUP = "quantlab.methods"
_REGISTRY: dict[str, str] = {}
_LOADED: dict[str, object] = {}
_BUILTIN: set[str] = set()
_plugins_read = False


def register_method(name: str, target: str) -> None:
    """Register a method class by import path, e.g. ``register_method("rtn", "quantlab.methods.rtn:RtnMethod")``."""
    _REGISTRY[name] = target
    _LOADED.pop(name, None)


def all_methods() -> list[str]:
    _read_plugins()
    return list(_REGISTRY)


def method_target(name: str) -> str:
    """The ``module:Class`` a method name stands for (where it comes from)."""
    _read_plugins()
    return _REGISTRY[name]


def get_method(name: str):
    """Return the method instance for ``name``; an unknown name gets a did-you-mean answer."""
    _read_plugins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
        guess = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"Unknown method '{name}'.{guess} Available: {', '.join(_REGISTRY)}")
    if name not in _LOADED:
        module_name, _, class_name = _REGISTRY[name].partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        _LOADED[name] = cls()
    return _LOADED[name]


def _read_plugins() -> None:
    """Register the methods installed distributions declare in the ``quantlab.methods`` entry-point group."""
    global _plugins_read
    if _plugins_read:
        return
    _plugins_read = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _BUILTIN:
            where = ep.dist.name if ep.dist else ep.value
            raise RecipeError(f"The installed package {where} registers a method '{ep.name}', which is quantlab's "
                              "own — rename it in that package's quantlab.methods entry points")
        register_method(ep.name, ep.value)


for _name, _target in (("fp", "quantlab.methods.fp:FpMethod"), ("bnb", "quantlab.methods.bnb:BnbMethod"),
                       ("rtn", "quantlab.methods.rtn:RtnMethod"), ("gptq", "quantlab.methods.gptq:GptqMethod"),
                       ("torchao", "quantlab.methods.torchao_ptq:TorchaoMethod"),
                       ("qat", "quantlab.methods.qat:QatMethod"), ("fit", "quantlab.methods.fit:FitMethod"),
                       ("gguf", "quantlab.methods.gguf:GgufMethod"),
                       ("awq", "quantlab.methods.awq:AwqMethod"),
                       ("fp8", "quantlab.methods.fp8:Fp8Method"),
                       ("hqq", "quantlab.methods.hqq:HqqMethod")):
    register_method(_name, _target)
    _BUILTIN.add(_name)
