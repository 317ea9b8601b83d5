"""Quantized artifacts: one cached directory per (model fingerprint, recipe, versions, device class).

Each artifact is a directory ``AutoModelForCausalLM.from_pretrained`` reloads without quantlab, plus
``quantlab.json``: recipe, source fingerprint, library versions and the quantization cost. The quantize step
(``quantlab.steps.quantize``) builds them; this module names them and reads them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from quantlab import __version__
from quantlab.fsutil import safe_name
from quantlab.methods import get_method
from quantlab.home import quantlab_home
from quantlab.models.load import check_model_dir
from quantlab.models.source import ModelSource, resolve_model, slug
from quantlab.provenance import library_version
from quantlab.quiet import quiet_libraries
from quantlab.recipe import Recipe, parse_recipe

MANIFEST = "quantlab.json"


def artifact_key(source: ModelSource, recipe: Recipe, device: str, data_dir: str | None = None) -> str:
    """sha256 of everything that changes the artifact: model fingerprint, recipe, the method's other inputs
    (calibration or training text sha256, read from ``data_dir``), quantlab and library versions, device class."""
    method = get_method(recipe.method)
    libs = ("torch", "transformers") + method.libraries_for(recipe.config)
    inputs = method.cache_inputs(recipe.config, Path(source.path), data_dir=data_dir,
                                 trust_remote_code=source.trust_remote_code)
    payload = {"model": source.fingerprint, "method": recipe.method, "params": recipe.params(), "inputs": inputs,
               "quantlab": __version__, "libs": {n: library_version(n) for n in libs},
               "device": device.split(":")[0]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def artifact_path(source: ModelSource, recipe: Recipe, device: str, data_dir: str | None = None) -> Path:
    key = artifact_key(source, recipe, device, data_dir)
    return (quantlab_home() / "artifacts" / f"{slug(source.ref)}-{source.fingerprint[:12]}"
            / f"{safe_name(recipe.name)}-{key[:12]}")


def read_manifest(path: str | Path) -> dict | None:
    manifest = Path(path) / MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def resolve_target(ref: str, trust_remote_code: bool = False) -> tuple[str, Recipe]:
    """(artifact path, recipe) for an artifact dir with a quantlab.json, else (resolved model path, fp)."""
    manifest = read_manifest(ref) if Path(ref).is_dir() else None
    if manifest:
        quiet_libraries()
        recipe = Recipe.from_dict(manifest["recipe"])
        if get_method(recipe.method).layout(recipe.config).engines[0] == "transformers":  # a GGUF: llama.cpp's file
            check_model_dir(Path(ref), trust_remote_code)
        return str(Path(ref).resolve()), recipe
    return resolve_model(ref, trust_remote_code).path, parse_recipe("fp")


def source_fingerprint(ref: str, trust_remote_code: bool = False) -> str:
    """The fingerprint of the model ``ref`` is, or was quantized from (an artifact's manifest names its source):
    what tells two evaluations of the same model from two of different ones."""
    manifest = read_manifest(ref) if Path(ref).is_dir() else None
    if manifest and (manifest.get("source") or {}).get("fingerprint"):
        return manifest["source"]["fingerprint"]
    return resolve_model(ref, trust_remote_code).fingerprint
