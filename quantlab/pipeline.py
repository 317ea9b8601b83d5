"""quantize-and-compare: the one place that strings the steps together.

Validate everything first (recipes, libraries, model, group sizes, text, output dir), then for the
baseline and each recipe: quantize (cached artifact) -> fidelity -> bench, each in a fresh process,
then one store transaction per run, then results.json written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from quantlab.evaluate.fidelity import FidelitySettings
from quantlab.evaluate.harness import HarnessSettings
from quantlab.measure.latency import LatencySettings
from quantlab.recipe import DEFAULT_RECIPES, Recipe, parse_recipe_list
from quantlab.twins import add_accuracy_recoveries, add_recoveries, with_twins


@dataclass
class CompareOptions:
    model: str | None = None
    recipes: list[Recipe] = field(default_factory=lambda: parse_recipe_list(DEFAULT_RECIPES))
    text: str | None = None
    data_dir: str | None = None
    out: str | Path | None = None
    store: str | Path | None = None
    device: str = "auto"
    threads: int = 1
    trust_remote_code: bool = False
    progress: bool = True
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)
    latency: LatencySettings = field(default_factory=LatencySettings)
    suite: "HarnessSettings | None" = None  # lm-eval tasks run on every recipe (--suite)


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count set for a block run in this process, then restored."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare(opts: CompareOptions):
    """All checks that need no heavy work, then the model and text. Returns (source, text, recipes, out)."""
    from quantlab.evaluate.text import resolve_text
    from quantlab.fsutil import check_writable_dir
    from quantlab.methods import get_method
    from quantlab.models import linear_shapes, load_config, resolve_model, slug

    recipes = list(opts.recipes)
    if not any(r.method == "fp" for r in recipes):
        recipes.insert(0, parse_recipe_list("fp")[0])
    recipes = with_twins(recipes)
    for r in recipes:
        get_method(r.method).require(r.config)
    out = Path(opts.out) if opts.out else Path("reports") / f"{slug(opts.model or 'smollm2-135m')}-{date.today():%Y%m%d}"
    check_writable_dir(out)
    if opts.suite:
        from quantlab.evaluate.harness import check_tasks

        check_tasks(opts.suite)
    text = None if opts.text == "self" else resolve_text(opts.text, opts.data_dir)
    source = resolve_model(opts.model, opts.trust_remote_code)
    shapes = linear_shapes(load_config(source.path, opts.trust_remote_code))
    for r in recipes:
        get_method(r.method).check_model(r.config, shapes)
    if text is None:
        text = resolve_text("self", opts.data_dir, model=source, device=resolve_device(opts.device))
    return source, text, recipes, out


def calibration_overlaps(source, text, recipes: list[Recipe]) -> dict[str, str]:
    """Recipe name -> warning, for calibrated recipes whose calibration text is the evaluation text."""
    from quantlab.methods import get_method

    found = {}
    for r in recipes:
        inputs = get_method(r.method).cache_inputs(r.config, Path(source.path))
        if inputs.get("calibration_sha256") == text.sha256:
            found[r.name] = (f"{r.name} is calibrated on the evaluation text ({text.name}): its fidelity is "
                             "optimistic — evaluate on other text or calibrate on c4_calibration")
    return found


def accuracy_all(recipes: list[Recipe], candidates: list[dict], opts: "CompareOptions", device: str, staging: Path,
                 trust_remote_code: bool) -> tuple[list, list]:
    """Suite accuracy of every candidate in one fresh process; per-sample rows staged as samples/<recipe>.json.gz.

    Returns (accuracy record or None, samples or None) per recipe."""
    if not opts.suite:
        return [None] * len(recipes), [None] * len(recipes)
    from quantlab.evaluate.accuracy import split_samples
    from quantlab.evaluate.harness import prepare_tasks
    from quantlab.gate.refs import write_samples
    from quantlab.measure.runner import run_isolated

    prepared = prepare_tasks(opts.suite)
    results = run_isolated("accuracy", {"settings": opts.suite.to_dict(), "prepared": dataclasses.asdict(prepared),
                                        "device": device, "threads": opts.threads, "candidates": candidates,
                                        "trust_remote_code": trust_remote_code})["results"]
    samples = [split_samples(r) for r in results]
    for recipe, result, rows in zip(recipes, results, samples):
        write_samples(staging / "samples" / f"{recipe.name}.json.gz", rows)
        result.update(settings=opts.suite.to_dict(), samples_path=f"samples/{recipe.name}.json.gz")
    return results, samples


def fidelity_all(source, text, candidates: list[dict], opts: "CompareOptions", device: str) -> list[dict]:
    """Fidelity of every candidate ``{recipe, artifact, per_token_path}`` in one fresh process."""
    from quantlab.measure.runner import run_isolated

    result = run_isolated("fidelity", {"baseline": source.to_dict(), "text": text.to_dict(), "device": device,
                                       "threads": opts.threads, "settings": opts.fidelity.to_dict(),
                                       "candidates": candidates})
    return result["results"]


def bench_artifact(recipe: Recipe, artifact: str, threads: int, latency: dict, device: str,
                   trust_remote_code: bool) -> dict:
    """Memory and latency of one artifact, in its own fresh process (``latency``: LatencySettings as a dict)."""
    from quantlab.measure.runner import run_isolated

    return run_isolated("bench", {"recipe": recipe.to_dict(), "artifact": artifact, "device": device,
                                  "threads": threads, "latency": latency, "trust_remote_code": trust_remote_code})


def make_record(recipe: Recipe, art: dict, fidelity: dict, bench: dict) -> dict:
    lat = bench["latency"]
    return {"recipe": recipe.name, "method": recipe.method, "bits": recipe.bits, "params": recipe.params(),
            "artifact": art["artifact"], "artifact_cached": art["cached"], "fidelity": fidelity,
            "guard": fidelity.get("guard"),
            "memory": bench["memory"],
            "latency": {"prefill_ms": (lat["prefill_ms"] or {}).get("median"),
                        "decode_tok_s": {b: v["median"] for b, v in lat["decode_tok_s"].items()},
                        "skipped": lat.get("skipped"), "detail": lat},
            "cost": art["cost"], "threads": bench["threads"]}


def quantize_and_compare(opts: CompareOptions) -> dict:
    from tqdm import tqdm

    from quantlab import store
    from quantlab.artifacts import ensure_artifact
    from quantlab.models import count_params, load_config, quantlab_home
    from quantlab.provenance import provenance
    from quantlab.evaluate.accuracy import SUITE_DEFINITIONS
    from quantlab.evaluate.text import SELF_SEED

    source, text, recipes, out = prepare(opts)
    overlaps = calibration_overlaps(source, text, recipes)
    device = resolve_device(opts.device)
    model_info = {"ref": source.ref, "fingerprint": source.fingerprint, "path": source.path, "note": source.note,
                  "params": count_params(load_config(source.path, opts.trust_remote_code))}
    run_set = store.new_run_set()
    prov = provenance(device, seeds={"bootstrap": opts.fidelity.seed, "latency_prompt": 0, "self_text": SELF_SEED},
                      data={text.name: text.sha256})
    prov["device"]["torch_threads"] = opts.threads
    prov.update({"text": text.to_dict(), "fidelity_settings": opts.fidelity.to_dict(),
                 "latency_settings": opts.latency.to_dict(), "run_set": run_set})
    arts = [ensure_artifact(source, r, device, opts.threads)
            for r in tqdm(recipes, desc="quantize", unit="recipe", disable=not opts.progress)]
    # Per-token values are staged outside --out and moved there with results.json at the end,
    # so a failed run leaves no half-written output directory.
    staging = quantlab_home() / "staging" / run_set
    candidates = [{"recipe": r.to_dict(), "artifact": a["artifact"],
                   "per_token_path": str(staging / "per_token" / f"{r.name}.npz")} for r, a in zip(recipes, arts)]
    fids = fidelity_all(source, text, candidates, opts, device)
    add_recoveries(recipes, fids, {c["recipe"]["name"]: c["per_token_path"] for c in candidates}, opts.fidelity)
    for fid, r in zip(fids, recipes):
        fid["per_token"] = str(out / "per_token" / f"{r.name}.npz")
    accs, samples = accuracy_all(recipes, candidates, opts, device, staging, source.trust_remote_code)
    add_accuracy_recoveries(recipes, accs, samples)
    if opts.suite:
        prov["data_sha256"].update({f: sha for acc in accs for t in acc["tasks"].values() for f, sha in t["files"].items()})
    guard_warnings = apply_guard(recipes, fids)
    runs = []
    steps = tqdm(list(zip(recipes, arts, fids)), desc="bench", unit="recipe", disable=not opts.progress)
    for (recipe, art, fid), acc, rows in zip(steps, accs, samples):
        bench = bench_artifact(recipe, art["artifact"], opts.threads, opts.latency.to_dict(), device,
                               source.trust_remote_code)
        record = {**make_record(recipe, art, fid, bench), "accuracy": acc, "provenance": prov,
                  "warnings": [overlaps[recipe.name]] if recipe.name in overlaps else []}
        record["run_id"] = store.insert_run(opts.store, {**record, "run_set": run_set, "model": model_info}, rows)
        runs.append(record)
    warnings = list(overlaps.values()) + guard_warnings
    results = {"model": model_info, "run_set": run_set, "text": text.to_dict(), "device": device,
               "definitions": {**DEFINITIONS, **(SUITE_DEFINITIONS if opts.suite else {})}, "warnings": warnings,
               "runs": runs}
    publish(staging, out, results)
    results["results_path"] = str(out / "results.json")
    results["report_path"] = write_html_report(results, out)
    return results


def write_html_report(results: dict, out: Path) -> str | None:
    """``DIR/report.html`` for the default GPU (32 GB, context 4096); a failure is a warning, not a lost run."""
    from quantlab.errors import QuantlabError
    from quantlab.report import ReportSettings, write_report

    try:
        return str(write_report({**results, "source": str(out / "results.json")}, out / "report.html",
                                ReportSettings()))
    except QuantlabError as exc:
        results["warnings"].append(f"report not written: {exc}")
        return None


def apply_guard(recipes: list[Recipe], fids: list[dict]) -> list[str]:
    """Put each run's garbage-guard verdict into its fidelity record; one loud warning per failure."""
    from quantlab.evaluate import guard

    runs = [{"recipe": r.name, "method": r.method, "bits": r.bits, "fidelity": f} for r, f in zip(recipes, fids)]
    warnings = []
    for run in runs:
        reasons = run["fidelity"].get("guard_reasons", []) + guard.fidelity_reasons(run, runs)
        run["fidelity"]["guard"] = {"ok": not reasons, "reasons": reasons}
        if reasons:
            warnings.append(f"{run['recipe']} looks broken (garbage guard): {'; '.join(reasons)}")
    return warnings


def publish(staging: Path, out: Path, results: dict) -> None:
    """Move staged per-token (and per-sample) files into ``out`` and write results.json atomically."""
    import shutil

    from quantlab.fsutil import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    for part in ("per_token", "samples"):
        final = out / part
        if final.exists():
            shutil.rmtree(final)
        if (staging / part).exists():
            shutil.move(str(staging / part), str(final))
    shutil.rmtree(staging, ignore_errors=True)
    atomic_write_json(out / "results.json", results)


DEFINITIONS = {
    "kld_mean": "mean over predicted tokens of KL(fp || quant) over the full vocabulary, nats/token",
    "kld_p99": "99th percentile of per-token KL(fp || quant), nats",
    "top1_agreement": "fraction of tokens where quant's argmax equals fp's argmax",
    "ppl": "token-level perplexity exp(mean NLL) of the quantized model on the reference text",
    "ppl_baseline": "token-level perplexity of the fp baseline on the same tokens",
    "ci95": "bootstrap 95% interval resampling text chunks",
    "weights_bytes": "bytes of all parameters and buffers as loaded, quantization statistics included, tied weights once",
    "disk_bytes": "bytes of the artifact's weight files",
    "peak_bytes": "peak RSS of the bench process on CPU; max reserved CUDA memory on GPU",
    "prefill_ms": "median latency of one forward over the prompt at batch 1",
    "decode_tok_s": "median generated tokens/s (batch x steps / time) of a greedy KV-cache loop, per batch size",
    "quantize_wall_s": "wall seconds of load + quantize + save in a fresh process (0 for the fp baseline)",
}


def options_from(**kwargs) -> CompareOptions:
    """CompareOptions from keyword arguments, ignoring None so defaults apply."""
    fields = {f.name for f in dataclasses.fields(CompareOptions)}
    return CompareOptions(**{k: v for k, v in kwargs.items() if k in fields and v is not None})


def _target(ref: str, trust_remote_code: bool):
    """(artifact path, recipe) for an artifact dir with a quantlab.json, else (source path, fp)."""
    from quantlab.artifacts import read_manifest
    from quantlab.models import check_model_dir, resolve_model

    manifest = read_manifest(ref) if Path(ref).is_dir() else None
    if manifest:
        from quantlab.quiet import quiet_libraries

        quiet_libraries()
        check_model_dir(Path(ref), trust_remote_code)
        return str(Path(ref).resolve()), Recipe.from_dict(manifest["recipe"])
    return resolve_model(ref, trust_remote_code).path, parse_recipe_list("fp")[0]


def evaluate_model(model: str, baseline: str | None, text: str | None = None, data_dir: str | None = None,
                   device: str = "auto", threads: int = 1, settings: FidelitySettings | None = None,
                   per_token_path: str | None = None, trust_remote_code: bool = False) -> dict:
    """Fidelity of ``model`` (an artifact dir or model ref) against ``baseline`` (a model ref).

    One fidelity evaluation measures no memory or time, so it runs in this process; quantize-and-compare
    runs all of its candidates in one fresh process instead, to keep its own memory flat.
    """
    from quantlab.evaluate import guard
    from quantlab.evaluate.fidelity_job import fidelity_job
    from quantlab.evaluate.text import resolve_text
    from quantlab.models import resolve_model

    text_source = None if text == "self" else resolve_text(text, data_dir)
    path, recipe = _target(model, trust_remote_code)
    base = resolve_model(baseline, trust_remote_code)
    device = resolve_device(device)
    if text_source is None:
        text_source = resolve_text("self", data_dir, model=base, device=device)
    with torch_threads(threads):
        result = fidelity_job({"baseline": base.to_dict(), "text": text_source.to_dict(), "device": device,
                               "settings": (settings or FidelitySettings()).to_dict(),
                               "candidates": [{"recipe": recipe.to_dict(), "artifact": path,
                                               "per_token_path": per_token_path}]})["results"][0]
    reasons = result["guard_reasons"] + guard.fidelity_reasons(
        {"method": recipe.method, "bits": recipe.bits, "fidelity": result}, [])
    result["guard"] = {"ok": not reasons, "reasons": reasons}
    return {"model": model, "baseline": {"ref": base.ref, "fingerprint": base.fingerprint, "note": base.note},
            "recipe": recipe.name, "text": text_source.to_dict(), "fidelity": result}


def bench_model(model: str, device: str = "auto", threads: int = 1, latency: LatencySettings | None = None,
                trust_remote_code: bool = False) -> dict:
    """Memory and latency of ``model`` (an artifact dir or model ref), measured in a fresh process."""
    path, recipe = _target(model, trust_remote_code)
    return {"model": model, "recipe": recipe.name,
            **bench_artifact(recipe, path, threads, (latency or LatencySettings()).to_dict(), resolve_device(device),
                             trust_remote_code)}


def weigh_model(model: str | None, recipe: Recipe, device: str = "cpu", contexts: tuple[int, ...] = (),
                threads: int = 1, trust_remote_code: bool = False) -> dict:
    """Quantize (cached), then load the artifact in a fresh process: its weight bytes as loaded and the peak
    memory prefills over ``contexts`` tokens add (see ``quantlab.measure.bench.weights_job``)."""
    from quantlab.measure.runner import run_isolated

    device = resolve_device(device)
    art = quantize_model(model, recipe, device, threads, trust_remote_code)
    result = run_isolated("weights", {"artifact": art["artifact"], "recipe": recipe.to_dict(), "device": device,
                                      "contexts": list(contexts), "threads": threads,
                                      "trust_remote_code": trust_remote_code})
    return {**result, "artifact": art["artifact"]}


def quantize_model(model: str | None, recipe: Recipe, device: str = "auto", threads: int | None = None,
                   trust_remote_code: bool = False) -> dict:
    """Quantize one model with one recipe (cached); returns artifact path and cost."""
    from quantlab.artifacts import ensure_artifact
    from quantlab.methods import get_method
    from quantlab.models import linear_shapes, load_config, resolve_model

    get_method(recipe.method).require(recipe.config)
    source = resolve_model(model, trust_remote_code)
    get_method(recipe.method).check_model(recipe.config, linear_shapes(load_config(source.path, trust_remote_code)))
    return ensure_artifact(source, recipe, resolve_device(device), threads)


def build_options(model=None, recipes=None, experiment=None, text=None, chunks=None, chunk_tokens=None,
                  batch_sizes=None, repetitions=None, decode_tokens=None, suite=None, **kwargs) -> CompareOptions:
    """CompareOptions from CLI-shaped arguments: a recipe list or an experiment YAML, window sizes."""
    from quantlab.errors import UsageError
    from quantlab.recipe import load_experiment

    if recipes and experiment:
        raise UsageError("Give --recipes or --experiment, not both")
    if experiment:
        exp = load_experiment(experiment)
        parsed = exp["recipes"]
        model = model or exp["model"]
        text = text or exp["text"]
    else:
        parsed = parse_recipe_list(recipes or DEFAULT_RECIPES)
    defaults = FidelitySettings()
    fidelity = dataclasses.replace(defaults, max_chunks=chunks or defaults.max_chunks,
                                   chunk_tokens=chunk_tokens or defaults.chunk_tokens)
    lat = LatencySettings()
    latency = dataclasses.replace(lat, batch_sizes=tuple(batch_sizes or lat.batch_sizes),
                                  repetitions=repetitions or lat.repetitions,
                                  decode_tokens=decode_tokens or lat.decode_tokens)
    if suite:
        from quantlab.evaluate.suites import load_suite

        suite = load_suite(suite, data_dir=kwargs.get("data_dir"))
    return options_from(model=model, recipes=parsed, text=text, fidelity=fidelity, latency=latency, suite=suite,
                        **kwargs)
