"""Before the long work on a recipe held in float16: one short forward of the unquantized model in float16.

float16's range ends at 65504 and the activations of some models pass it (Gemma-family models' are known to):
such a model held in float16 computes NaN, and a fit or a GPTQ run on it ends, hours later, in a KLD of NaN.
So before a calibrated recipe held in float16 is quantized, the source model runs once in float16 over the first
``TOKENS`` tokens of the recipe's calibration text, in a fresh process (the ``overflow`` step); logits with a NaN
or inf refuse the recipe with the fix (hold it in bfloat16). Refused, not switched to bfloat16 silently: the
dtype is part of the recipe's name and artifact key (``fit-180MiB`` is held in float16, ``fit-180MiB-bf16`` in
bfloat16), and a result filed under a float16 name but held in bfloat16 would say something false. The verdict
is cached by content (model, dtype, text, device type, library versions).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from quantlab.errors import RecipeError
from quantlab.evaluate import guard
from quantlab.evaluate.fidelity import prefix_ids
from quantlab.evaluate.text import TextSource
from quantlab.fsutil import cached_entry
from quantlab.methods import get_method
from quantlab.methods.calibration import resolve_calibration
from quantlab.layouts.loading import load_recipe_model
from quantlab.home import quantlab_home
from quantlab.models.load import load_config, load_tokenizer
from quantlab.models.source import ModelSource
from quantlab.provenance import library_version
from quantlab.recipe import Recipe, parse_recipe
from quantlab.steps.launcher import run_step

TOKENS = 512  # one forward over this many tokens: seconds, and enough for an overflow that shows on any text


def held_dtype(recipe: Recipe, source: ModelSource, device: str) -> str:
    """The dtype a recipe's artifact is held in on ``device``: its layout's, or the model config's for ``auto``."""
    dtype = get_method(recipe.method).layout(recipe.config).load_kwargs(device).get("dtype")
    if dtype in (None, "auto"):
        dtype = getattr(load_config(source.path, source.trust_remote_code), "dtype", None) or "float32"
    return str(dtype).removeprefix("torch.")


def bf16_fix(recipe: Recipe) -> str:
    """How to hold ``recipe`` in bfloat16 (the same range as float32) instead of float16."""
    if recipe.method == "fit":
        config = dataclasses.replace(recipe.config, dtype="bfloat16", allocation=())
        name = get_method("fit").short_name(config)
        return f"hold the fit in bfloat16: quantlab fit --dtype bfloat16 (recipe {name})"
    if recipe.method == "fp":
        return "use the bf16 recipe instead of fp16"
    return ("hold it in bfloat16: a bnb recipe's compute_dtype: bfloat16, or a model whose config's dtype is "
            "bfloat16 (its layout loads the config's dtype)")


def check_held_dtype(source: ModelSource, recipe: Recipe, device: str, threads: int | None = None,
                     data_dir: str | None = None) -> None:
    """Refuse a calibrated recipe held in float16 on a model whose float16 forward is not finite (see the module)."""
    calibration = getattr(recipe.config, "calibration", None)
    if calibration is None or held_dtype(recipe, source, device) != "float16":
        return  # uncalibrated methods quantize in seconds: the fidelity step's own check comes soon enough
    text = resolve_calibration(recipe.config, Path(source.path), data_dir, source.trust_remote_code)
    verdict = forward_verdict(source, text, device, threads)
    if verdict["bad"]:
        raise RecipeError(guard.nonfinite_message(
            f"{recipe.name}: the unquantized model", verdict["bad"], verdict["total"], "float16", bf16_fix(recipe),
            values=f"logits (one forward over {verdict['total']} tokens of {text.name})"))


def forward_verdict(source: ModelSource, text: TextSource, device: str, threads: int | None) -> dict:
    """``{"bad", "total"}`` positions of the float16 forward, from the cache or a fresh ``overflow`` step."""
    key = hashlib.sha256(json.dumps({"model": source.fingerprint, "dtype": "float16", "text": text.sha256,
                                     "tokens": TOKENS, "device": device.split(":")[0],
                                     "libs": {n: library_version(n) for n in ("torch", "transformers")}},
                                    sort_keys=True).encode()).hexdigest()[:24]
    path = quantlab_home() / "overflow" / f"{key}.json"

    def build(tmp: Path) -> None:
        verdict = run_step("overflow", {"source": source.to_dict(), "text": text.to_dict(), "device": device,
                                        "threads": threads})
        tmp.write_text(json.dumps({"bad": verdict["bad"], "total": verdict["total"]}, indent=2) + "\n")

    # no lock, as before the helper: two processes at most both run the forward, and write the same verdict
    cached_entry(path, build, is_complete=lambda p: _read_verdict(p) is not None, file=True, lock=False)
    return _read_verdict(path)


def _read_verdict(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def overflow_step(payload: dict) -> dict:
    """The unquantized model in float16, one forward over the text's first ``TOKENS`` tokens: positions whose
    logits hold a NaN or inf."""
    source = ModelSource.from_dict(payload["source"])
    ids = prefix_ids(load_tokenizer(source.path, source.trust_remote_code), TextSource(**payload["text"]).read(),
                     TOKENS)[None, :TOKENS]  # (1, tokens)
    model = load_recipe_model(source.path, parse_recipe("fp16"), payload["device"], source.trust_remote_code)
    bad, total = guard.nonfinite_positions(model, ids)
    return {"bad": bad, "total": total}
