"""The quantize step: build one artifact in a fresh process, cached by its key (``quantlab.artifacts``)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from quantlab.artifacts import MANIFEST, artifact_path, read_manifest
from quantlab.fsutil import atomic_dir, atomic_write_json, file_lock
from quantlab.measure.cost import NO_COST, measure_cost, training_cost
from quantlab.measure.memory import measure_memory
from quantlab.methods import get_method
from quantlab.models import ModelSource, load_config, meta_model
from quantlab.plan.steps import LAYER_BY_LAYER
from quantlab.provenance import device_info, versions
from quantlab.recipe import Recipe
from quantlab.steps.launcher import run_step


def ensure_artifact(source: ModelSource, recipe: Recipe, device: str, threads: int | None = None,
                    force: bool = False, data_dir: str | None = None, plan: dict | None = None) -> dict:
    """``{"artifact", "cost", "cached"}``, quantizing in a fresh process when not cached (or ``force``)."""
    if not get_method(recipe.method).writes_artifact:
        return {"artifact": source.path, "cost": dict(NO_COST), "cached": True}
    target = artifact_path(source, recipe, device, data_dir)
    with file_lock(target.with_name(f".{target.name}.lock")):  # two sweeps never build one artifact twice
        manifest = None if force else read_manifest(target)
        cached = manifest is not None
        if manifest is None:
            run_step("quantize", {"source": source.to_dict(), "recipe": recipe.to_dict(), "device": device,
                                  "target": str(target), "threads": threads, "data_dir": data_dir, "budgeted": plan is not None,
                                  "mode": (plan or {}).get("mode")})
            manifest = read_manifest(target)
    return {"artifact": str(target), "cost": manifest["cost"], "cached": cached}


def quantize_step(payload: dict) -> dict:
    """Quantize into a temp dir, write the manifest, rename into place."""
    source = ModelSource.from_dict(payload["source"])
    recipe = Recipe.from_dict(payload["recipe"])
    device = payload["device"]
    method = get_method(recipe.method)
    method.require(recipe.config)
    method.preload(recipe.config)
    if payload.get("mode") == LAYER_BY_LAYER:  # the model's own code imported before the baseline, as the libraries
        meta_model(load_config(source.path, source.trust_remote_code), source.trust_remote_code)
    with atomic_dir(payload["target"]) as tmp:
        with measure_cost(source.path, device) as cost, measure_memory(preload=(), device=device) as held:
            quantize = method.quantize_layer_by_layer if payload.get("mode") == LAYER_BY_LAYER else method.quantize
            notes = quantize(recipe.config, Path(source.path), tmp, device, data_dir=payload.get("data_dir"),
                             trust_remote_code=source.trust_remote_code)
        cost["held"] = held
        cost["budgeted"] = bool(payload.get("budgeted"))  # built under a memory budget (--max-memory)
        training = training_cost(notes)
        if training:
            cost["training"] = training
        atomic_write_json(tmp / MANIFEST, {
            "recipe": recipe.to_dict(), "source": {"ref": source.ref, "fingerprint": source.fingerprint,
                                                   "note": source.note},
            "method_notes": notes, "cost": cost, "versions": versions(), "device": device_info(device),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
    return {"artifact": payload["target"], "cost": cost}
