"""Resolving a fit recipe: the formats' uniform artifacts (GPTQ, or GGUF files of one type), the sensitivity pass
(a step of its own, its table cached by content), and the exact allocation within the budget.

The sensitivity text is the fit's calibration text (what GPTQ calibrates on), its first ``sensitivity_chunks``
windows of 256 tokens: the reference text the fit is then judged on stays out of the choice. The fp log-probs
of those windows are cached like the fidelity step's (``ensure_baseline``); the table's key is everything that
changes it: model fingerprint, the formats' artifact keys, text sha256, windows, units, library versions.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from quantlab import __version__
from quantlab.artifacts import artifact_path, read_manifest
from quantlab.evaluate import fidelity as fid
from quantlab.evaluate.fidelity import FidelitySettings
from quantlab.evaluate.guard import require_finite
from quantlab.evaluate.text import TextSource
from quantlab.errors import UsageError
from quantlab.fit.allocate import Option, Unit, allocate, smallest_budget
from quantlab.fit.sensitivity import GgufWeights, Prefixes, gptq_weights, measure_table
from quantlab.fit.units import (HEAD, check_formats, family, fixed_bytes, model_units, parse_format, parse_formats,
                                unit_bytes)
from quantlab.fsutil import building_entry, cached_entry
from quantlab.layerwise.weights import CheckpointReader
from quantlab.layouts.gguf import FILE
from quantlab.layouts.gptq_mixed import FP, GptqMixedLayout
from quantlab.measure.cost import measure_cost
from quantlab.methods import get_method
from quantlab.methods.calibration import resolve_calibration
from quantlab.methods.fit import head_only, resolved, uniform_gguf
from quantlab.layouts.loading import load_recipe_model
from quantlab.home import quantlab_home
from quantlab.models.load import load_config, load_tokenizer
from quantlab.models.source import ModelSource
from quantlab.plan import terms
from quantlab.plan.shapes import model_shapes
from quantlab.provenance import library_version, versions
from quantlab.recipe import Recipe, parse_recipe
from quantlab.engines.llamacpp import compute_bytes
from quantlab.steps.fidelity import ensure_baseline
from quantlab.steps.fit_kv import KV_UNIT, ensure_kv_costs, kv_pairs, kv_unit
from quantlab.steps.launcher import run_step
from quantlab.steps.overflow import check_held_dtype
from quantlab.steps.quantize import ensure_artifact

WINDOW_TOKENS = 256
DEFINITIONS = {
    "sensitivity": "mean per-token KL(fp || model) over the sensitivity windows with only that unit in that format "
                   "(its weights from the format's uniform artifact: GPTQ, or a GGUF with every tensor at the "
                   "format's type, dequantized), every other unit fp; nats/token",
    "predicted_kld": "the sum of the chosen formats' sensitivities over the units (assumes the units' KLDs add)",
    "weights_bytes": "the planner's bytes of the model as GPTQModel.load holds it (unquantized parts in the fit's "
                     "dtype, fp16 by default; packed GPTQ modules); for GGUF formats, the file's tensor bytes as "
                     "llama.cpp holds them",
}


def uniform_recipe(config, fmt: str, shapes) -> Recipe | None:
    """The artifact a format's sensitivity is read from: its uniform GPTQ recipe, or the GGUF with every tensor at
    the format's type (``uniform_gguf``); None for fp and gguf-f32."""
    if parse_format(fmt).bits is None:
        return None
    if config.family == "gguf":
        name = f"{fmt}-uniform" + ("-imatrix" if config.imatrix else "")
        return Recipe(name, "fit", uniform_gguf(config, fmt, shapes))
    return Recipe(parse_recipe(fmt).name, "gptq", config.uniform(fmt))


def head_recipe(config, fmt: str, shapes) -> Recipe | None:
    """Where the untied head's sensitivity in ``fmt`` is read from (``head_only``); None when the head is no unit,
    and for a GGUF fit, whose uniform files quantize the head too."""
    if (config.family == "gguf" or not any(u.name == HEAD for u in model_units(shapes, config.units))
            or parse_format(fmt).bits is None):
        return None
    return Recipe(f"{parse_recipe(fmt).name}-head-only", "fit", head_only(config, fmt, shapes))


def ensure_sensitivity(source: ModelSource, config, device: str, threads: int | None = None,
                       data_dir: str | None = None) -> dict:
    """The sensitivity table of ``config``'s units and formats on ``source``: one column per quantized format,
    each cached by content on its own (so a format's uniform artifact is needed only until its column is
    measured), put together in format order."""
    formats = parse_formats(config.formats)
    text = resolve_calibration(config, Path(source.path), data_dir, source.trust_remote_code)
    columns = {f.name: ensure_column(source, config, f.name, text, device, threads, data_dir)
               for f in formats if f.bits is not None}
    key = hashlib.sha256(json.dumps({"formats": [f.name for f in formats], "columns": {
        k: Path(v["path"]).parent.name for k, v in columns.items()}}, sort_keys=True).encode()).hexdigest()[:24]
    target = quantlab_home() / "sensitivity" / key
    table = joined_table([f.name for f in formats], list(columns.values()))
    body = json.dumps(table, indent=1, sort_keys=True) + "\n"
    cached_entry(target, lambda tmp: (tmp / "table.json").write_text(body), is_complete=_has_table)
    return {**table, "path": str(target / "table.json")}


def _has_table(entry: Path) -> bool:
    return (entry / "table.json").is_file()


def ensure_column(source: ModelSource, config, fmt: str, text: TextSource, device: str, threads: int | None,
                  data_dir: str | None) -> dict:
    """One format's column of the table, from its cache or a fresh step (which builds the format's uniform GPTQ
    artifact first if that is not cached). Its key is everything that changes it: model fingerprint, the
    artifact's key, text sha256, windows, units, quantlab and library versions, device type."""
    shapes = model_shapes(load_config(source.path, source.trust_remote_code), source.trust_remote_code)
    recipes = {fmt: uniform_recipe(config, fmt, shapes)}
    head = head_recipe(config, fmt, shapes)
    if head is not None:
        recipes[HEAD] = head
    paths = {k: artifact_path(source, r, device, data_dir).name for k, r in recipes.items()}
    key = hashlib.sha256(json.dumps({"formats": [fmt], "chunks": config.sensitivity_chunks, "units": config.units,
                                     "model": source.fingerprint, "text": text.sha256,
                                     "artifacts": {fmt: paths[fmt], **({HEAD: paths[HEAD]} if head else {})},
                                     "quantlab": __version__, "device": device.split(":")[0],
                                     "libs": {n: library_version(n) for n in ("torch", "transformers", "gguf")
                                              if n != "gguf" or config.family == "gguf"}},
                                    sort_keys=True).encode()).hexdigest()[:24]
    target = quantlab_home() / "sensitivity" / "columns" / key
    def build(tmp: Path) -> None:
        built = {k: ensure_artifact(source, r, device, threads, data_dir=data_dir)["artifact"]
                 for k, r in recipes.items()}
        run_step("sensitivity", {"source": source.to_dict(), "formats": [fmt], "artifacts": {fmt: built[fmt]},
                                 "head_artifact": built.get(HEAD), "text": text.to_dict(),
                                 "chunks": config.sensitivity_chunks, "units": config.units,
                                 "embedding": config.family == "gguf", "device": device,
                                 "threads": threads, "target": str(tmp)})

    cached_entry(target, build, is_complete=_has_table)
    return {**json.loads((target / "table.json").read_text()), "path": str(target / "table.json")}


def joined_table(formats: list[str], columns: list[dict]) -> dict:
    """The columns (each a table of one quantized format) as one table over ``formats``, fp's KLD 0 by definition;
    its cost is the columns' summed (peak: the largest), each column's kept under ``columns``."""
    first = columns[0]
    windows = first["text"]["windows"]
    per_window = {u["name"]: {f: [0.0] * windows for f in formats} for u in first["units"]}
    for col in columns:
        for unit, row in col["kld_per_window"].items():
            per_window[unit].update({f: v for f, v in row.items() if f in col["formats"]})
    summed = {k: sum(c["cost"][k] for c in columns) for k in ("quantize_wall_s", "quantize_cpu_s", "forwards_wall_s")}
    peaks = [c["cost"]["quantize_peak_rss_bytes"] for c in columns if c["cost"]["quantize_peak_rss_bytes"]]
    cost = {**summed, "quantize_peak_rss_bytes": max(peaks, default=None),
            "columns": {c["formats"][0]: c["cost"] for c in columns},
            "gptq_runs_wall_s": {k: v["quantize_wall_s"] for c in columns for k, v in c["artifact_costs"].items()},
            "head_runs_wall_s": {c["formats"][0]: c["head_artifact_cost"]["quantize_wall_s"] for c in columns
                                 if c.get("head_artifact_cost")},
            "definition": "the sum over the columns (one sensitivity step per quantized format: fp model load, "
                          "block inputs, one forward per unit) of wall and CPU seconds; peak RSS: the largest "
                          "column's; the uniform GPTQ runs the columns read are their own artifacts' costs "
                          "(gptq_runs_wall_s: each one's quantize step wall seconds; head_runs_wall_s: each "
                          "head-only GPTQ run's, where the untied head is a unit)"}
    return {**{k: first[k] for k in ("units", "granularity", "text", "versions", "definitions")},
            "formats": list(formats), "kld_per_window": per_window,
            "kld": {u: {f: sum(v) / len(v) for f, v in row.items()} for u, row in per_window.items()},
            "midway_forwards": {c["formats"][0]: c["midway_forwards"] for c in columns},
            "artifacts": {k: v for c in columns for k, v in c["artifacts"].items()},
            "head_artifacts": {c["formats"][0]: c["head_artifact"] for c in columns if c.get("head_artifact")},
            "columns": {c["formats"][0]: c["path"] for c in columns}, "cost": cost}


def sensitivity_step(payload: dict) -> dict:
    """Measure the table (``quantlab.fit.sensitivity``) into ``payload["target"]``."""
    source = ModelSource.from_dict(payload["source"])
    text = TextSource(**payload["text"])
    settings = FidelitySettings(chunk_tokens=WINDOW_TOKENS, max_chunks=payload["chunks"], batch_size=4)
    ids = fid.chunk_ids(load_tokenizer(source.path, source.trust_remote_code), text.read(), settings)
    device = payload["device"]
    cache, _ = ensure_baseline(source, ids, text, settings, device)
    baseline, _ = fid.load_baseline(cache)
    shapes = model_shapes(load_config(source.path, source.trust_remote_code), source.trust_remote_code)
    units = model_units(shapes, payload["units"], payload.get("embedding", False))
    formats = tuple(parse_format(n) for n in payload["formats"])  # a column: one format
    with measure_cost(source.path, device) as cost:
        model = load_recipe_model(source.path, parse_recipe("fp"), device, source.trust_remote_code)
        started = time.perf_counter()
        prefixes = Prefixes(model, ids, settings.batch_size)
        table = measure_table(model, prefixes, baseline, units, formats, _weights_of(payload, shapes))
        forwards_s = time.perf_counter() - started
    out = {"units": [{"name": u.name, "block": u.block, "modules": [m[0] for m in u.modules]} for u in units],
           "formats": [f.name for f in formats], "granularity": payload["units"],
           "kld": {u: {f: sum(v) / len(v) for f, v in row.items()} for u, row in table.items()},
           "kld_per_window": table, "text": {"name": text.name, "sha256": text.sha256, "windows": int(ids.shape[0]),
                                             "window_tokens": WINDOW_TOKENS},
           "midway_forwards": prefixes.midway, "artifacts": payload["artifacts"],
           "head_artifact": payload.get("head_artifact"),
           "artifact_costs": {k: read_manifest(v)["cost"] for k, v in payload["artifacts"].items()},
           "head_artifact_cost": read_manifest(payload["head_artifact"])["cost"] if payload.get("head_artifact")
           else None,
           "cost": {**{k: cost[k] for k in ("quantize_wall_s", "quantize_cpu_s", "quantize_peak_rss_bytes")},
                    "forwards_wall_s": forwards_s, "definition": "wall/CPU seconds and peak RSS of the sensitivity "
                    "step (fp model load, block inputs, one forward per unit and quantized format); the uniform "
                    "GPTQ runs it reads are their own artifacts' costs"},
           "versions": versions(), "definitions": DEFINITIONS}
    with building_entry(payload["target"]):  # the column's temp dir, renamed into place by ensure_column
        (Path(payload["target"]) / "table.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return {"path": payload["target"]}


def _weights_of(payload: dict, shapes):
    """``measure_table``'s ``weights_of``: a unit's weights in a format, from the format's uniform artifact (GPTQ
    packed, or a GGUF file), the untied head's from its head-only GPTQ artifact."""
    if family(parse_format(n) for n in payload["formats"]) == "gguf":
        files = {name: GgufWeights(Path(path) / FILE, *_gguf_arch(shapes))
                 for name, path in payload["artifacts"].items()}
        return lambda fmt, unit: files[fmt.name].read([n for n, _, _ in unit.modules])
    readers = {name: CheckpointReader(path) for name, path in payload["artifacts"].items()}
    head = CheckpointReader(payload["head_artifact"]) if payload.get("head_artifact") else None
    return lambda fmt, unit: gptq_weights(head if unit.name == HEAD else readers[fmt.name],
                                          [n for n, _, _ in unit.modules], fmt.bits)


def _gguf_arch(shapes) -> tuple[str, int, int]:
    return shapes.model_type, shapes.heads, shapes.kv_heads


def fit_budget(config, shapes, device: str) -> int:
    """The weights budget: given, or the GPU memory less KV cache, activations and runtime at the layout's dtype;
    for a GGUF fit, the GPU memory less llama.cpp's compute buffer and the runtime (its KV cache is a unit of the
    allocation, ``steps.fit_kv``)."""
    if config.weights_budget is not None:
        return config.weights_budget
    if config.family == "gguf":
        return config.gpu_mem - compute_bytes(shapes, config.context) - terms.runtime_bytes(device)
    elem = GptqMixedLayout(()).unquantized_dtype_bytes(device)
    return (config.gpu_mem - terms.kv_cache_bytes(shapes, config.context, config.batch, elem)
            - terms.activation_bytes(shapes, config.context, config.batch, elem) - terms.runtime_bytes(device))


def solve(config, table: dict, shapes, device: str):
    """The allocation of least predicted KLD within the budget, over the table's units and formats (``table`` None:
    any allocation that fits, to check the budget can be met)."""
    units = model_units(shapes, config.units, config.family == "gguf")
    formats = parse_formats(config.formats)
    check_formats(formats, units)
    if table:  # a table cached before NaN was refused where it is measured
        require_finite(table["kld"], f"The sensitivity table {table.get('path')}",
                       "remove that file to measure it again")
    kld = (lambda u, f: table["kld"][u][f]) if table else (lambda u, f: 0.0)
    options = [Unit(u.name, tuple(Option(f.name, unit_bytes(u, f.name, shapes, device), kld(u.name, f.name))
                                  for f in formats)) for u in units]
    if config.family == "gguf" and config.gpu_mem is not None:
        options.append(kv_unit(config, shapes, (table or {}).get("kv")))
    budget, fixed = fit_budget(config, shapes, device), fixed_bytes(units, shapes, device, config.family)
    if config.gpu_mem is not None and budget < smallest_budget(options, fixed):  # said in the GPU memory given
        least = smallest_budget(options, fixed) + config.gpu_mem - budget
        raise UsageError(f"No allocation fits a GPU of {config.gpu_mem} bytes at context {config.context} x batch "
                         f"{config.batch}: the smallest that can be met is {least} bytes (every unit in its smallest "
                         "format, the rest of the plan beside it) — raise --gpu-mem or lower the context or batch")
    return allocate(options, budget, fixed)


def resolve_fit(source: ModelSource, recipe: Recipe, device: str, threads: int | None = None,
                data_dir: str | None = None) -> tuple[Recipe, dict]:
    """The fit recipe with its allocation, and what chose it (table path, predicted bytes and KLD, units per
    format). A recipe already resolved is returned as it is."""
    held_in_torch = recipe.config.family == "gptq"  # GPTQModel's fp16/bf16 kernel; a GGUF runs in llama.cpp
    if recipe.config.allocation:
        if held_in_torch:
            check_held_dtype(source, recipe, device, threads, data_dir)
        return recipe, {}
    shapes = model_shapes(load_config(source.path, source.trust_remote_code), source.trust_remote_code)
    get_method("fit").check_source(recipe.config, source.path)  # a GGUF fit needs a model loaded from a GGUF
    solve(recipe.config, None, shapes, device)  # a budget nothing meets is refused before the sensitivity pass
    if held_in_torch:  # and a model that overflows the fit's float16
        check_held_dtype(source, recipe, device, threads, data_dir)
    table = ensure_sensitivity(source, recipe.config, device, threads, data_dir)
    kv = None
    if len(kv_pairs(recipe.config)) > 1 and recipe.config.gpu_mem is not None:  # a GGUF fit's cache types
        reference = uniform_recipe(recipe.config, _most_precise(recipe.config), shapes)
        kv = ensure_kv_costs(source, recipe.config, reference, device, threads, data_dir)
    alloc = solve(recipe.config, {**table, "kv": kv} if kv else table, shapes, device)
    formats = dict(alloc.formats)
    cache = formats.pop(KV_UNIT, None)
    counts = {f: sum(1 for v in formats.values() if v == f) for f in recipe.config.formats}
    info = {"sensitivity_table": table["path"], "sensitivity_cost": table["cost"], "budget_bytes": alloc.budget,
            "sensitivity": {k: table[k] for k in ("units", "formats", "granularity", "kld", "text")},
            "predicted_bytes": alloc.bytes, "predicted_kld": alloc.kld, "units_per_format": counts,
            "unit_formats": formats, "fp_units": counts.get(FP, 0)}
    if cache:
        info.update(kv_cache=cache, kv_bytes=next(o.bytes for o in kv_unit(recipe.config, shapes, kv).options
                                                   if o.format == cache),
                    kv_table={k: kv[k] for k in ("kld", "weights", "text", "cost")} if kv else None)
    kv_cache = tuple(cache.split("/")) if cache else None
    return Recipe(recipe.name, recipe.method, resolved(recipe.config, formats, kv_cache)), info


def _most_precise(config) -> str:
    """The format the KV cache's cost is measured with: the fit's most precise quantized one."""
    return max((f for f in parse_formats(config.formats) if f.bits is not None), key=lambda f: f.bits).name


def ensure_recipe_artifact(source: ModelSource, recipe: Recipe, device: str, threads: int | None = None,
                           force: bool = False, data_dir: str | None = None, plan=None) -> dict:
    """``ensure_artifact``, a fit recipe resolved first: ``{"artifact", "cost", "cached", "recipe"}``, plus ``"fit"``
    (what chose the allocation) for a fit."""
    if not get_method(recipe.method).resolved_first:
        check_held_dtype(source, recipe, device, threads, data_dir)
        return {**ensure_artifact(source, recipe, device, threads, force=force, data_dir=data_dir, plan=plan),
                "recipe": recipe}
    resolved_recipe, info = resolve_fit(source, recipe, device, threads, data_dir)
    art = ensure_artifact(source, resolved_recipe, device, threads, force=force, data_dir=data_dir, plan=plan)
    return {**art, "recipe": resolved_recipe, "fit": info}
