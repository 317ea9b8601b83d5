"""The accuracy step: lm-eval suite accuracy of one or more models, with per-sample scores.

Accuracy measures no memory or time, so one process may evaluate several candidates (lm-eval's imports and
the converted data load once); a sweep job passes its one, ``quantlab eval --tasks`` runs it in-process.
"""

from __future__ import annotations

import dataclasses

from tqdm import tqdm

from quantlab.device import torch_threads
from quantlab.evaluate.accuracy import SUITE_DEFINITIONS, evaluate_candidate, split_samples
from quantlab.evaluate.harness import HarnessSettings, PreparedTasks
from quantlab.provenance import provenance
from quantlab.recipe import Recipe


def accuracy_payload(settings: HarnessSettings, prepared: PreparedTasks, device: str, threads: int,
                     candidates: list[tuple[Recipe, str]], trust_remote_code: bool) -> dict:
    return {"settings": settings.to_dict(), "prepared": dataclasses.asdict(prepared), "device": device,
            "threads": threads, "candidates": [{"recipe": r.to_dict(), "artifact": a} for r, a in candidates],
            "trust_remote_code": trust_remote_code}


def accuracy_step(payload: dict) -> dict:
    """The payload of ``accuracy_payload``; one result per candidate, in order."""
    settings = HarnessSettings.from_dict(payload["settings"])
    prepared = PreparedTasks(**payload["prepared"])
    return {"results": [evaluate_candidate(c["artifact"], Recipe.from_dict(c["recipe"]), payload["device"], settings,
                                           prepared, payload.get("trust_remote_code", False))
                        for c in tqdm(payload["candidates"], desc="accuracy", unit="model", leave=False)]}


def suite_result(ref: str, path: str, recipe: Recipe, settings: HarnessSettings, prepared: PreparedTasks,
                 device: str, threads: int, trust_remote_code: bool) -> dict:
    """Suite accuracy of one model in this process, results.json-shaped with per-sample scores inline, so the
    output file is a gate reference."""
    with torch_threads(threads):
        result = evaluate_candidate(path, recipe, device, settings, prepared, trust_remote_code)
    samples = split_samples(result)
    prov = provenance(device, data=prepared.file_hashes())
    prov["device"]["torch_threads"] = threads
    return {"model": ref, "device": device, "definitions": SUITE_DEFINITIONS,
            "runs": [{"recipe": recipe.name, "method": recipe.method, "artifact": path,
                      "accuracy": {**result, "settings": settings.to_dict(), "samples": samples},
                      "provenance": prov}]}
