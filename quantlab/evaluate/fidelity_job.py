"""The isolated fidelity step: baseline log-probs (cached) against one or more candidates' log-probs.

Fidelity measures no memory or time, so one process may evaluate several candidates (``quantlab eval``
of many artifacts), loading the tokenized text and cached baseline once; a sweep job passes its one.
"""

from __future__ import annotations

import gc
from pathlib import Path


def load_recipe_model(path: str, recipe, device: str, trust_remote_code: bool = False):
    """Load an artifact (or the fp source) the way its method says, with no quantlab code in the model."""
    from quantlab.methods import get_method
    from quantlab.models import load_causal_lm

    method = get_method(recipe.method)
    method.require(recipe.config)
    return load_causal_lm(path, device=device, trust_remote_code=trust_remote_code,
                          **method.load_kwargs(recipe.config, device))


def ensure_baseline(baseline, ids, text, settings, device: str):
    """Path of the cached baseline log-probs for (model, text, windows), computing them on a miss."""
    from quantlab.evaluate import fidelity as fid
    from quantlab.fsutil import file_lock
    from quantlab.models import quantlab_home
    from quantlab.recipe import parse_recipe

    fp = parse_recipe("fp")
    key = fid.cache_key(baseline.fingerprint, text.sha256, settings, fp.name, device)
    cache = quantlab_home() / "logits" / key
    hit = True
    with file_lock(cache.with_name(f".{key}.lock")):
        if not (cache / "logprobs.npy").is_file():
            hit = False
            model = load_recipe_model(baseline.path, fp, device, baseline.trust_remote_code)
            fid.baseline_cache(model, ids, cache, settings)
            write_generation(model, ids, cache)
            del model
            gc.collect()
    return cache, hit


def baseline_generation(baseline, ids, cache: Path, device: str) -> list[int]:
    """The fp model's greedy continuation for the garbage guard, kept beside the cached log-probs."""
    import json

    from quantlab.fsutil import file_lock
    from quantlab.recipe import parse_recipe

    target = cache / "generation.json"
    with file_lock(cache.with_name(f".{cache.name}.gen.lock")):
        if not target.is_file():  # a cache written before the guard existed
            model = load_recipe_model(baseline.path, parse_recipe("fp"), device, baseline.trust_remote_code)
            write_generation(model, ids, cache)
            del model
            gc.collect()
    return json.loads(target.read_text())["tokens"]


def write_generation(model, ids, cache: Path) -> None:
    from quantlab.evaluate import guard
    from quantlab.fsutil import atomic_write_json

    atomic_write_json(cache / "generation.json", {"tokens": guard.greedy_continuation(model, ids)})


def fidelity_job(payload: dict) -> dict:
    """payload: baseline (ModelSource), text (TextSource), settings, device, candidates: [{recipe, artifact,
    per_token_path}]. Returns one summary per candidate, in order."""
    from tqdm import tqdm

    from quantlab.evaluate import fidelity as fid
    from quantlab.evaluate import guard
    from quantlab.evaluate.text import TextSource
    from quantlab.models import ModelSource, load_tokenizer
    from quantlab.recipe import Recipe

    baseline = ModelSource.from_dict(payload["baseline"])
    text = TextSource(**payload["text"])
    settings = fid.FidelitySettings(**payload.get("settings", {}))
    device = payload["device"]
    ids = fid.chunk_ids(load_tokenizer(baseline.path, baseline.trust_remote_code), text.read(), settings)
    cache, hit = ensure_baseline(baseline, ids, text, settings, device)
    logprobs, _ = fid.load_baseline(cache)
    base_gen = baseline_generation(baseline, ids, cache, device)
    results = []
    for cand in tqdm(payload["candidates"], desc="fidelity", unit="model", leave=False):
        recipe = Recipe.from_dict(cand["recipe"])
        if recipe.name == "fp" and Path(cand["artifact"]).resolve() == Path(baseline.path).resolve():
            per_token = fid.compare_baseline_to_itself(ids, logprobs)
            gen = base_gen
        else:
            model = load_recipe_model(cand["artifact"], recipe, device, baseline.trust_remote_code)
            per_token = fid.compare(model, ids, logprobs)
            gen = guard.greedy_continuation(model, ids)
            del model
            gc.collect()
        if cand.get("per_token_path"):
            fid.save_per_token(Path(cand["per_token_path"]), per_token)
        summary = fid.summarize(per_token, settings)
        results.append({**summary, "baseline_recipe": "fp", "baseline_cached": hit,
                        "per_token": cand.get("per_token_path"),
                        "generation": {"tokens": gen, **guard.repetition(gen), "baseline_tokens": base_gen},
                        "guard_reasons": guard.generation_reasons(gen, base_gen)})
    return {"results": results, "baseline_cache": str(cache), "settings": settings.to_dict()}
