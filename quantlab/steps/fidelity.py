"""The fidelity step: baseline log-probs (cached) against one or more candidates' log-probs.

Fidelity measures no memory or time, so one process may evaluate several candidates, loading the tokenized
text and cached baseline once; a sweep job passes its one, ``quantlab eval --baseline`` runs it in-process.
Each result carries the candidate's own garbage-guard verdict (repetition, top-1 floor, KLD floor); the
comparison with round-to-nearest at the same bits needs a comparison's other jobs and is added at publish.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from quantlab.errors import MeasurementError
from quantlab.evaluate import fidelity as fid
from quantlab.evaluate import guard
from quantlab.evaluate.fidelity import FidelitySettings
from quantlab.evaluate.text import TextSource
from quantlab.fsutil import atomic_write_json, cached_entry, file_lock
from quantlab.layerwise.model import LayerwiseModel
from quantlab.measure.memory import measure_memory
from quantlab.methods import get_method
from quantlab.layouts.loading import load_recipe_model
from quantlab.home import quantlab_home
from quantlab.models.load import load_tokenizer
from quantlab.models.source import ModelSource
from quantlab.plan.steps import IN_MEMORY, LAYER_BY_LAYER, StepPlan, is_reference
from quantlab.recipe import Recipe, parse_recipe
from quantlab.steps.overflow import bf16_fix


@dataclass(frozen=True)
class Candidate:
    recipe: Recipe
    artifact: str
    per_token_path: str | None = None

    def to_dict(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "artifact": self.artifact, "per_token_path": self.per_token_path}

    @classmethod
    def from_dict(cls, data: dict) -> "Candidate":
        return cls(Recipe.from_dict(data["recipe"]), data["artifact"], data.get("per_token_path"))


def fidelity_payload(baseline: ModelSource, text: TextSource, settings: FidelitySettings, device: str, threads: int,
                     candidates: list[Candidate], plans: dict[str, StepPlan] | None = None) -> dict:
    """``plans``: the budget's step plans (``quantlab.plan.steps``) for ``reference`` and ``fidelity``."""
    return {"baseline": baseline.to_dict(), "text": text.to_dict(), "settings": settings.to_dict(), "device": device,
            "threads": threads, "candidates": [c.to_dict() for c in candidates],
            "plans": {name: plan.to_dict() for name, plan in (plans or {}).items()},
            "budgeted": bool(plans)}


def fidelity_step(payload: dict) -> dict:
    """The payload of ``fidelity_payload``; returns one summary per candidate, in order, and the step's memory."""
    for c in payload["candidates"]:  # the libraries' baseline is outside what the step holds
        recipe = Recipe.from_dict(c["recipe"])
        get_method(recipe.method).preload(recipe.config)
    with measure_memory(device=payload["device"]) as mem:
        out = measure_fidelity(ModelSource.from_dict(payload["baseline"]), TextSource(**payload["text"]),
                               FidelitySettings.from_dict(payload.get("settings", {})), payload["device"],
                               [Candidate.from_dict(c) for c in payload["candidates"]],
                               {name: StepPlan.from_dict(p) for name, p in (payload.get("plans") or {}).items()})
    return {**out, "memory": mem}


def measure_fidelity(baseline: ModelSource, text: TextSource, settings: FidelitySettings, device: str,
                     candidates: list[Candidate], plans: dict[str, StepPlan] | None = None) -> dict:
    plans = plans or {}
    ids = fid.chunk_ids(load_tokenizer(baseline.path, baseline.trust_remote_code), text.read(), settings)
    cache, hit = ensure_baseline(baseline, ids, text, settings, device, plans.get("reference"))
    logprobs, _ = fid.load_baseline(cache)
    base_gen = baseline_generation(baseline, ids, cache, device, plans.get("reference"))
    results = []
    for cand in tqdm(candidates, desc="fidelity", unit="model", leave=False):
        if is_reference(cand.recipe) and Path(cand.artifact).resolve() == Path(baseline.path).resolve():
            per_token = fid.compare_baseline_to_itself(ids, logprobs)
            gen = base_gen
        else:
            plan = plans.get("fidelity")
            model = planned_model(cand.artifact, cand.recipe, device, plan, baseline.trust_remote_code)
            per_token = fid.compare(model, ids, logprobs, (plan and plan.batch) or settings.batch_size)
            require_finite_tokens(per_token, cand.recipe, guard.held_dtype(model))
            gen = guard.greedy_continuation(model, ids)
            del model
            gc.collect()
        summary = {**fid.summarize(per_token, settings), "baseline_recipe": "fp", "baseline_cached": hit,
                   "per_token": cand.per_token_path,
                   "generation": {"tokens": gen, **guard.repetition(gen), "baseline_tokens": base_gen}}
        reasons = guard.generation_reasons(gen, base_gen) + guard.fidelity_reasons(
            {"method": cand.recipe.method, "bits": cand.recipe.bits, "fidelity": summary}, [])
        summary["guard"] = {"ok": not reasons, "reasons": reasons}
        guard.require_finite(summary, f"{cand.recipe.name}'s fidelity", "its predictions are too far off for the "
                             "number to mean anything (a broken quantization or checkpoint); check its recipe and "
                             "source")
        if cand.per_token_path:
            fid.save_per_token(Path(cand.per_token_path), per_token)
        results.append(summary)
    return {"results": results, "baseline_cache": str(cache), "settings": settings.to_dict(),
            "reference_mode": plans["reference"].mode if "reference" in plans else IN_MEMORY}


def require_finite_tokens(per_token: dict, recipe: Recipe, dtype: str) -> None:
    """Refuse a candidate whose per-token KL or NLL holds a NaN or inf (``guard.nonfinite_message``), before its
    summary: a KLD of NaN, perplexity NaN and top-1 0.000 is no result."""
    import numpy as np

    bad = ~(np.isfinite(per_token["kl"]) & np.isfinite(per_token["nll"]))
    if bad.any():
        raise MeasurementError(guard.nonfinite_message(recipe.name, int(bad.sum()), bad.size, dtype,
                                                       bf16_fix(recipe)))


def ensure_baseline(baseline: ModelSource, ids, text: TextSource, settings: FidelitySettings, device: str,
                    plan: StepPlan | None = None):
    """Path of the cached baseline log-probs for (model, text, windows), computing them on a miss: in memory, or
    layer by layer when the budget's ``plan`` says so (the same file either way)."""
    key = fid.cache_key(baseline.fingerprint, text.sha256, settings, "fp", device)
    cache = quantlab_home() / "logits" / key

    def build(tmp: Path) -> None:
        model = planned_model(baseline.path, parse_recipe("fp"), device, plan, baseline.trust_remote_code)
        batch = (plan and plan.batch) or settings.batch_size
        fid.baseline_cache(model, ids, tmp, dataclasses.replace(settings, batch_size=batch))
        write_generation(model, ids, tmp)
        del model
        gc.collect()

    hit = cached_entry(cache, build, is_complete=lambda d: (d / "logprobs.npy").is_file())
    return cache, hit


def planned_model(path: str, recipe: Recipe, device: str, plan: StepPlan | None, trust_remote_code: bool):
    """The model at ``path`` loaded whole, or run layer by layer (``quantlab.layerwise``) when the budget's ``plan``
    says so; either computes log-probs and generates."""
    if plan and plan.mode == LAYER_BY_LAYER:
        return LayerwiseModel(path, device, trust_remote_code=trust_remote_code)
    return load_recipe_model(path, recipe, device, trust_remote_code)


def baseline_generation(baseline: ModelSource, ids, cache: Path, device: str,
                        plan: StepPlan | None = None) -> list[int]:
    """The fp model's greedy continuation for the garbage guard, kept beside the cached log-probs."""
    target = cache / "generation.json"
    with file_lock(cache.with_name(f".{cache.name}.gen.lock")):
        if not target.is_file():  # a cache written before the guard existed
            model = planned_model(baseline.path, parse_recipe("fp"), device, plan, baseline.trust_remote_code)
            write_generation(model, ids, cache)
            del model
            gc.collect()
    return json.loads(target.read_text())["tokens"]


def write_generation(model, ids, cache: Path) -> None:
    atomic_write_json(cache / "generation.json", {"tokens": guard.greedy_continuation(model, ids)})
