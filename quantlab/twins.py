"""Trained recipes beside their PTQ twins: add the twin to a comparison, and the recovered fractions."""

from __future__ import annotations

from quantlab.recipe import Recipe


def with_twins(recipes: list[Recipe]) -> list[Recipe]:
    """Add each trained recipe's PTQ twin (same format, no training) just before it, unless listed."""
    from quantlab.methods import get_method
    from quantlab.recipe import parse_recipe

    names = {r.name for r in recipes}
    out = []
    for r in recipes:
        twin = get_method(r.method).ptq_twin(r.config)
        if twin and twin not in names and not any(t.name == twin for t in out):
            out.append(parse_recipe(twin))
        out.append(r)
    return out


def add_recoveries(recipes: list[Recipe], fids: list[dict], npz: dict[str, str], settings) -> None:
    """Each trained recipe's recovered fraction over its PTQ twin, into its fidelity record."""
    from quantlab.evaluate.recovery import recovery
    from quantlab.methods import get_method

    for recipe, fid in zip(recipes, fids):
        twin = get_method(recipe.method).ptq_twin(recipe.config)
        if twin and twin in npz:
            fid["recovery"] = recovery(npz[recipe.name], npz[twin], twin, settings.bootstrap, settings.seed)


def add_accuracy_recoveries(recipes: list[Recipe], accs: list, samples: list) -> None:
    """Each trained recipe's recovered fraction of its twin's lost task accuracy (primary metric per task)."""
    from quantlab.evaluate.recovery import accuracy_recovery
    from quantlab.methods import get_method
    from quantlab.table import primary_metric

    index = {r.name: i for i, r in enumerate(recipes)}
    fp = next((i for i, r in enumerate(recipes) if r.method == "fp"), None)
    for i, recipe in enumerate(recipes):
        twin = get_method(recipe.method).ptq_twin(recipe.config)
        if fp is None or twin not in index or not accs[i]:
            continue
        out = {}
        for task, info in accs[i]["tasks"].items():
            metric = primary_metric(info)
            if metric in ("acc", "acc_norm"):
                out[task] = accuracy_recovery(samples[fp][task], samples[index[twin]][task], samples[i][task],
                                              metric, twin)
        accs[i]["recovery"] = out
