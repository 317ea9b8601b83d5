"""Named accuracy suites (experiments/suites.yaml) and ``quantlab eval --tasks`` on one model."""

from __future__ import annotations

from pathlib import Path

from quantlab.errors import UsageError
from quantlab.evaluate.harness import HarnessSettings

SUITES_FILE = Path(__file__).resolve().parents[2] / "experiments" / "suites.yaml"
_SUITE_KEYS = {"description", "tasks", "limit", "batch_size", "max_length"}


def load_suite(name: str, **overrides) -> HarnessSettings:
    """A suite by name from experiments/suites.yaml, or from a YAML file path; keyword overrides win if not None."""
    from quantlab.fsutil import load_yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else SUITES_FILE
    data = load_yaml(path, "Suite file", "give a suite name from experiments/suites.yaml or a YAML path") or {}
    suite = data if path != SUITES_FILE else data.get(name)
    if not isinstance(suite, dict):
        import difflib

        close = difflib.get_close_matches(name, list(data), n=1)
        hint = f"Did you mean '{close[0]}'? " if close else ""
        raise UsageError(f"Unknown suite '{name}'. {hint}Suites: {', '.join(data)} (or a suite YAML path)")
    unknown = set(suite) - _SUITE_KEYS
    if unknown:
        raise UsageError(f"Suite '{name}' has unknown key(s) {', '.join(sorted(unknown))} — allowed: "
                         f"{', '.join(sorted(_SUITE_KEYS))}")
    fields = {k: v for k, v in suite.items() if k != "description"}
    fields["tasks"] = tuple(fields.get("tasks") or ())
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return HarnessSettings(**fields)


def task_settings(tasks: str | None, suite: str | None, **overrides) -> HarnessSettings | None:
    """--tasks a,b,c or --suite NAME (not both) plus per-run options; None when neither is given."""
    if tasks and suite:
        raise UsageError("Give --tasks or --suite, not both")
    if suite:
        return load_suite(suite, **overrides)
    if tasks:
        names = tuple(t.strip() for t in tasks.split(",") if t.strip())
        return HarnessSettings(tasks=names, **{k: v for k, v in overrides.items() if v is not None})
    return None


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'0/2' -> (0, 2)."""
    if not text:
        return None
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"--shard '{text}' is not I/N — e.g. --shard 0/2 and --shard 1/2, then quantlab merge-shards")
    return int(parts[0]), int(parts[1])


def evaluate_tasks(model: str, settings: HarnessSettings, device: str = "auto", threads: int = 1,
                   trust_remote_code: bool = False) -> dict:
    """Suite accuracy of ``model`` (artifact dir or model ref) in this process; results.json-shaped, with
    per-sample scores inline, so the output file is a gate reference."""
    from quantlab.evaluate.accuracy import SUITE_DEFINITIONS, evaluate_candidate, split_samples
    from quantlab.evaluate.harness import prepare_tasks
    from quantlab.pipeline import _target, resolve_device, torch_threads
    from quantlab.provenance import provenance

    prepared = prepare_tasks(settings)
    path, recipe = _target(model, trust_remote_code)
    device = resolve_device(device)
    with torch_threads(threads):
        result = evaluate_candidate(path, recipe, device, settings, prepared, trust_remote_code)
    samples = split_samples(result)
    prov = provenance(device, data={f: sha for t in prepared.data.values() for f, sha in t["files"].items()})
    prov["device"]["torch_threads"] = threads
    return {"model": model, "device": device, "definitions": SUITE_DEFINITIONS,
            "runs": [{"recipe": recipe.name, "method": recipe.method, "artifact": path,
                      "accuracy": {**result, "settings": settings.to_dict(), "samples": samples},
                      "provenance": prov}]}


def evaluate_all(model: str, tasks: str | None = None, suite: str | None = None, limit: int | None = None,
                 batch_size: int | None = None, include_path: str | None = None, output: str | None = None,
                 baseline: str | None = None, text: str | None = None, data_dir: str | None = None,
                 per_token: str | None = None, device: str = "auto", threads: int = 1,
                 trust_remote_code: bool = False, shard: str | None = None) -> dict:
    """``quantlab eval``: accuracy tasks and/or fidelity; everything validated before a model loads.

    With ``output``, the full result (per-sample scores included) is written there atomically; the return
    value leaves the per-sample rows out.
    """
    import copy

    from quantlab.evaluate.harness import check_tasks
    from quantlab.fsutil import atomic_write_json, check_writable_dir
    from quantlab.pipeline import evaluate_model

    settings = task_settings(tasks, suite, limit=limit, batch_size=batch_size, data_dir=data_dir,
                             include_path=include_path, shard=parse_shard(shard))
    if settings is None and baseline is None:
        raise UsageError("Nothing to evaluate — give --tasks/--suite for accuracy and/or --baseline for fidelity")
    if settings is not None:
        check_tasks(settings)
    if output:
        check_writable_dir(Path(output).resolve().parent)
    result = evaluate_tasks(model, settings, device, threads, trust_remote_code) if settings else {"model": model, "runs": []}
    if baseline:
        fid = evaluate_model(model, baseline, text, data_dir, device, threads, per_token_path=per_token,
                             trust_remote_code=trust_remote_code)
        if result["runs"]:
            result["runs"][0]["fidelity"] = fid["fidelity"]
            result["fidelity_baseline"] = fid["baseline"]
        else:
            result = fid
    if output:
        atomic_write_json(output, result)
    shown = copy.deepcopy(result)
    for run in shown.get("runs", []):
        if "accuracy" in run:
            run["accuracy"].pop("samples", None)
            run["accuracy"]["samples_in"] = output
    return shown
