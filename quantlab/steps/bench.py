"""The bench step: load an artifact in a fresh process, then measure memory and latency; and the weights step,
the planner's check (weight bytes as loaded and what prefills add)."""

from __future__ import annotations

import time
from pathlib import Path

from quantlab.device import as_device
from quantlab.engines import EngineModel
from quantlab.measure import latency, memory
from quantlab.measure.latency import LatencySettings
from quantlab.methods import get_method
from quantlab.layouts.loading import load_recipe_model, prepare_model
from quantlab.recipe import Recipe
from quantlab.steps.launcher import run_step


def bench_artifact(recipe: Recipe, artifact: str, threads: int, settings: LatencySettings, device: str,
                   trust_remote_code: bool, budgeted: bool = False) -> dict:
    """Memory and latency of one artifact, in its own fresh process."""
    return run_step("bench", {"recipe": recipe.to_dict(), "artifact": artifact, "device": device, "threads": threads,
                              "latency": settings.to_dict(), "trust_remote_code": trust_remote_code,
                              "budgeted": budgeted})


def planned_bench(plan, artifact: str, settings: LatencySettings, threads: int) -> dict:
    """A bench the memory budget skipped (``plan``: its StepPlan): weight bytes from the planner, bytes on disk
    measured, no latency."""
    comp = plan.components
    mem = {"weights_bytes": comp["weights"], "quantized_bytes": None, "unquantized_bytes": None,
           "disk_bytes": memory.disk_bytes(Path(artifact)), "peak_bytes": None, "planned": True,
           "peak_kind": f"not measured — {plan.reason}; weights_bytes is the planner's"}
    return {"memory": mem, "latency": latency.not_measured(settings, plan.reason), "threads": threads}


def weigh_artifact(recipe: Recipe, artifact: str, device: str, contexts: tuple[int, ...], threads: int,
                   trust_remote_code: bool) -> dict:
    """Weight bytes of one artifact as loaded and the peak memory prefills over ``contexts`` tokens add, in
    its own fresh process (see ``weights_step``)."""
    return run_step("weights", {"artifact": artifact, "recipe": recipe.to_dict(), "device": device,
                                "contexts": list(contexts), "threads": threads, "trust_remote_code": trust_remote_code})


def bench_step(payload: dict) -> dict:
    recipe = Recipe.from_dict(payload["recipe"])
    device = payload["device"]
    get_method(recipe.method).preload(recipe.config)  # the libraries' baseline is outside what the step holds
    with memory.measure_memory(device=device) as held:
        out = _bench(payload, recipe, device)
    out["memory"]["held"] = held
    return out


def _bench(payload: dict, recipe: Recipe, device: str) -> dict:
    import torch

    dev = as_device(device)
    rss_before = memory.current_rss_bytes()
    dev.memory.reset_counters()
    t0 = time.perf_counter()
    model = load_recipe_model(payload["artifact"], recipe, device, payload.get("trust_remote_code", False), prepare=False)
    if isinstance(model, EngineModel):  # an engine of its own (llama.cpp) loads, times and weighs the artifact itself
        return _engine_bench(model, payload, rss_before, t0)
    weights = memory.weight_bytes(model)  # as loaded, before a kernel converts anything
    prepare_model(model, recipe, device)
    load_s = time.perf_counter() - t0
    rss_loaded = memory.current_rss_bytes()
    settings = LatencySettings.from_dict(payload.get("latency", {}))
    skipped = get_method(recipe.method).layout(recipe.config).latency_skipped(device)
    lat = latency.not_measured(settings, skipped) if skipped else latency.measure_latency(model, settings, device)
    mem = {
        **weights,
        "footprint_hf_bytes": model.get_memory_footprint(),
        "disk_bytes": memory.disk_bytes(Path(payload["artifact"])),
        "peak_bytes": memory.peak_rss_bytes(),
        "peak_kind": "peak RSS of the bench process (load + latency runs)",
        "process_rss_before_load_bytes": rss_before,
        "rss_after_load_bytes": rss_loaded,
        "load_s": load_s,
    }
    mem.update(dev.memory.peaks("the bench process"))  # on CUDA, max reserved replaces the host's peak
    rate = (lat["decode_tok_s"].get("1") or {}).get("median")
    name = dev.gpu_name()
    if name and rate:
        lat["roofline_b1"] = latency.roofline(name, weights["weights_bytes"], rate)
    return {"memory": mem, "latency": lat, "threads": torch.get_num_threads()}


def _engine_bench(model, payload: dict, rss_before: int, t0: float) -> dict:
    """The bench of an artifact its engine runs (``quantlab.engines``): its timings and what it holds, its own."""
    settings = LatencySettings.from_dict(payload.get("latency", {}))
    weights = model.weight_bytes()
    load_s = time.perf_counter() - t0
    lat = model.measure(settings)
    mem = {**weights, "footprint_hf_bytes": None, "disk_bytes": memory.disk_bytes(Path(payload["artifact"])),
           "peak_bytes": memory.peak_rss_bytes(), "peak_kind": "peak RSS of the bench process (load + latency runs)",
           "process_rss_before_load_bytes": rss_before, "rss_after_load_bytes": memory.current_rss_bytes(),
           "load_s": load_s, "engine_buffers_bytes": model.held()}
    model.close()
    return {"memory": mem, "latency": lat, "threads": model.threads, "engine": model.engine}


def weights_step(payload: dict) -> dict:
    """Load an artifact in a fresh process: its weight bytes, and the peak memory of prefills over
    ``contexts`` tokens at batch 1 above the loaded model (max reserved on CUDA; peak RSS on CPU, with
    the kernel's high-water mark reset before each prefill)."""
    import torch

    recipe = Recipe.from_dict(payload["recipe"])
    device = payload["device"]
    model = load_recipe_model(payload["artifact"], recipe, device, payload.get("trust_remote_code", False), prepare=False)
    if isinstance(model, EngineModel):  # an engine of its own (llama.cpp): its tensor bytes; its buffers per context
        out = {**model.weight_bytes(), "footprint_hf_bytes": None, "prefill": {}}
        for context in payload.get("contexts", []):
            out["prefill"][str(context)] = {"engine_buffers_bytes": model.buffers_at(context)}
        model.close()
        return out
    out = {**memory.weight_bytes(model), "footprint_hf_bytes": model.get_memory_footprint(), "prefill": {}}
    prepare_model(model, recipe, device)
    for context in payload.get("contexts", []):
        ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
        out["prefill"][str(context)] = _prefill_peak(model, ids.to(device), device)
    return out


def _prefill_peak(model, ids, device: str) -> dict:
    """Bytes a prefill forward (KV cache kept, last position's logits only) adds above the loaded model: the
    device's peak reader (``Device.memory``), marked before the forward."""
    import torch

    reader = as_device(device).memory
    base = reader.mark()
    with torch.inference_mode():
        out = model(ids, use_cache=True, logits_to_keep=1)
    peak = reader.peak()
    del out
    return {"bytes": peak - base, "kind": f"{reader.label} above the loaded model", "peak_total_bytes": peak}
