"""The quantize step: build one artifact in a fresh process, cached by its key (``quantlab.artifacts``)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from quantlab.artifacts import MANIFEST, artifact_path, read_manifest
from quantlab.errors import RecipeError
from quantlab.fsutil import atomic_write_json, building_entry, cached_entry
from quantlab.layerwise.weights import stored_dtypes
from quantlab.measure.cost import NO_COST, measure_cost, training_cost
from quantlab.measure.memory import measure_memory
from quantlab.methods import get_method
from quantlab.models.load import load_config
from quantlab.models.shapes import meta_model
from quantlab.models.source import ModelSource
from quantlab.plan.steps import LAYER_BY_LAYER, StepPlan
from quantlab.provenance import device_info, versions
from quantlab.recipe import Recipe
from quantlab.steps.launcher import run_step

#: safetensors dtypes of unquantized weights and index tensors; a quantized weight is stored in another (int8 or
#: uint8 codes, int32-packed words, 8-bit floats)
UNQUANTIZED_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "BOOL"})


def ensure_artifact(source: ModelSource, recipe: Recipe, device: str, threads: int | None = None,
                    force: bool = False, data_dir: str | None = None, plan: StepPlan | None = None) -> dict:
    """``{"artifact", "cost", "cached"}``, quantizing in a fresh process when not cached (or ``force``)."""
    if not get_method(recipe.method).writes_artifact:
        return {"artifact": source.path, "cost": dict(NO_COST), "cached": True}
    target = artifact_path(source, recipe, device, data_dir)
    cached = cached_entry(  # two sweeps never build one artifact twice
        target, lambda tmp: run_step("quantize", {
            "source": source.to_dict(), "recipe": recipe.to_dict(), "device": device, "target": str(tmp),
            "threads": threads, "data_dir": data_dir, "budgeted": plan is not None, "mode": plan and plan.mode}),
        is_complete=lambda p: read_manifest(p) is not None, force=force)
    return {"artifact": str(target), "cost": read_manifest(target)["cost"], "cached": cached}


def quantize_step(payload: dict) -> dict:
    """Quantize into ``payload["target"]`` (the cache entry's temp dir, renamed into place by ``ensure_artifact``)
    and write the manifest."""
    source = ModelSource.from_dict(payload["source"])
    recipe = Recipe.from_dict(payload["recipe"])
    device = payload["device"]
    method = get_method(recipe.method)
    method.require(recipe.config)
    method.preload(recipe.config)
    if payload.get("mode") == LAYER_BY_LAYER:  # the model's own code imported before the baseline, as the libraries
        meta_model(load_config(source.path, source.trust_remote_code), source.trust_remote_code)
    tmp = Path(payload["target"])
    with building_entry(tmp):
        with measure_cost(source.path, device) as cost, measure_memory(preload=(), device=device) as held:
            quantize = method.quantize_layer_by_layer if payload.get("mode") == LAYER_BY_LAYER else method.quantize
            notes = quantize(recipe.config, Path(source.path), tmp, device, data_dir=payload.get("data_dir"),
                             trust_remote_code=source.trust_remote_code)
        check_quantized(tmp, recipe, method.layout(recipe.config), source)
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


def check_quantized(artifact: Path, recipe: Recipe, layout, source: ModelSource) -> None:
    """Refuse an artifact that quantized nothing: a layout that stores codes, and every tensor written still in
    floating point. A method that found no layer it handles (a layer type other than ``nn.Linear`` and GPT-2's
    Conv1D) would otherwise give a row that claims its bits and measures the fp model."""
    stored = layout.stored_types(artifact) or stored_dtypes(artifact)
    if not layout.quantizes or any(d not in UNQUANTIZED_DTYPES for d in stored.values()):
        return
    kinds = _weight_layer_kinds(meta_model(load_config(source.path, source.trust_remote_code),
                                           source.trust_remote_code))
    raise RecipeError(f"{recipe.name} quantized nothing in {source.ref}: every tensor it wrote is floating point "
                      f"(the model's weight layers: {', '.join(kinds) or 'none'}) — the {recipe.method} method does "
                      "not handle these layers; pick a recipe of another method")


def _weight_layer_kinds(model) -> list[str]:
    """Class names of the modules holding a 2-D weight, the input and output embeddings aside."""
    import torch

    skip = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return sorted({type(m).__name__ for m in model.modules() if id(m) not in skip
                   and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2})
