"""Quantized artifacts: one cached directory per (model fingerprint, recipe, versions, device class).

Each artifact is a directory ``AutoModelForCausalLM.from_pretrained`` reloads without quantlab, plus
``quantlab.json``: recipe, source fingerprint, library versions and the quantization cost.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from quantlab.models import ModelSource, quantlab_home, slug
from quantlab.recipe import Recipe

MANIFEST = "quantlab.json"


def artifact_key(source: ModelSource, recipe: Recipe, device: str) -> str:
    from quantlab import __version__
    from quantlab.methods import get_method
    from quantlab.provenance import library_version

    method = get_method(recipe.method)
    libs = ("torch", "transformers") + method.libraries_for(recipe.config)
    payload = {"model": source.fingerprint, "method": recipe.method, "params": recipe.params(),
               "inputs": method.cache_inputs(recipe.config, Path(source.path)),
               "quantlab": __version__, "libs": {n: library_version(n) for n in libs},
               "device": device.split(":")[0]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def artifact_path(source: ModelSource, recipe: Recipe, device: str) -> Path:
    key = artifact_key(source, recipe, device)
    return quantlab_home() / "artifacts" / f"{slug(source.ref)}-{source.fingerprint[:12]}" / f"{recipe.name}-{key[:12]}"


def read_manifest(path: str | Path) -> dict | None:
    manifest = Path(path) / MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def ensure_artifact(source: ModelSource, recipe: Recipe, device: str, threads: int | None = None,
                    force: bool = False) -> dict:
    """Return ``{"artifact", "cost", "cached"}``, quantizing in a fresh process when not cached (or ``force``)."""
    from quantlab.fsutil import file_lock
    from quantlab.methods import get_method
    from quantlab.measure.runner import run_isolated

    method = get_method(recipe.method)
    if not method.writes_artifact:
        return {"artifact": source.path, "cost": {"quantize_wall_s": 0.0, "quantize_cpu_s": 0.0,
                                                   "quantize_peak_rss_bytes": None}, "cached": True}
    target = artifact_path(source, recipe, device)
    with file_lock(target.with_name(f".{target.name}.lock")):  # two sweeps never build one artifact twice
        manifest = None if force else read_manifest(target)
        cached = manifest is not None
        if manifest is None:
            run_isolated("quantize", {"source": source.to_dict(), "recipe": recipe.to_dict(), "device": device,
                                      "target": str(target), "threads": threads})
            manifest = read_manifest(target)
    return {"artifact": str(target), "cost": manifest["cost"], "cached": cached}


def build_artifact(payload: dict) -> dict:
    """Worker side: quantize into a temp dir, write the manifest, rename into place."""
    import resource

    import torch

    from quantlab.fsutil import atomic_dir, atomic_write_json
    from quantlab.measure.memory import current_rss_bytes, peak_rss_bytes
    from quantlab.methods import get_method
    from quantlab.provenance import device_info, versions

    source = ModelSource.from_dict(payload["source"])
    recipe = Recipe.from_dict(payload["recipe"])
    device = payload["device"]
    method = get_method(recipe.method)
    method.require(recipe.config)
    method.preload(recipe.config)
    rss_before = current_rss_bytes()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with atomic_dir(payload["target"]) as tmp:
        notes = method.quantize(recipe.config, Path(source.path), tmp, device)
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        peak = peak_rss_bytes()
        source_bytes = sum(f.stat().st_size for f in Path(source.path).glob("*.safetensors"))
        cost = {
            "quantize_wall_s": time.perf_counter() - t0,
            "quantize_cpu_s": (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime),
            "quantize_peak_rss_bytes": peak,
            "process_rss_before_bytes": rss_before,
            "source_weights_bytes": source_bytes,
            "quantize_peak_over_baseline_x_source": (peak - rss_before) / source_bytes if source_bytes else None,
            "quantize_peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
            "definition": "wall/CPU seconds of load+quantize+save in a fresh process; peak RSS of that process "
                          "(includes the Python and library baseline given as process_rss_before_bytes, taken "
                          "after the method's libraries are imported); quantize_peak_over_baseline_x_source = "
                          "(peak - baseline) / bytes of the source model's safetensors",
        }
        if "training" in notes:  # trained methods: their training cost beside the whole step's
            t = notes["training"]
            cost["training"] = {k: t[k] for k in ("steps", "tokens_seen", "train_wall_s", "teacher_forward_s")}
            curve = notes.get("heldout_curve") or []
            cost["training"]["train_cpu_s"] = curve[-1]["train_cpu_s"] if curve else None
        atomic_write_json(tmp / MANIFEST, {
            "recipe": recipe.to_dict(), "source": {"ref": source.ref, "fingerprint": source.fingerprint,
                                                   "note": source.note},
            "method_notes": notes, "cost": cost, "versions": versions(), "device": device_info(device),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
    return {"artifact": payload["target"], "cost": cost}
