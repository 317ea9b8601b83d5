"""quantize-and-compare: the one place that strings the steps together.

Validate everything first (recipes, libraries, model, group sizes, text, output dir), then run the
comparison as a one-model sweep: each recipe (the fp baseline first) is one content-addressed job —
quantize (cached artifact) -> fidelity -> suite accuracy -> bench, each step in a fresh process — stored
in one transaction as it finishes; then the jobs' mutual checks and results.json, written atomically.
The same command again reuses every finished job; ``force`` recomputes them into a new run set.
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
from quantlab.twins import with_twins


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
    force: bool = False  # recompute every job, artifacts included, into a new run set


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
    """The comparison's results (results.json's content, plus ``jobs`` counts and the output paths)."""
    from quantlab.models import slug
    from quantlab.sweep import SweepOptions, run_jobs, run_set_of
    from quantlab.sweep.publish import publish_run_set

    source, text, recipes, out = prepare(opts)
    jobs = compare_jobs(source, text, recipes, opts)
    run_set = run_set_of(f"compare-{slug(source.ref)}", jobs, opts.force)
    with _job_bar(len(jobs), opts.progress) as progress:
        counts = run_jobs(jobs, run_set, SweepOptions(force=opts.force, store=opts.store), progress)
    (results,) = publish_run_set(run_set, opts.store, jobs, out)
    return {**results, "jobs": counts}


def compare_jobs(source, text, recipes: list[Recipe], opts: CompareOptions) -> list:
    from quantlab.sweep.jobs import make_jobs, suite_payload

    suite, prepared = suite_payload(opts.suite) if opts.suite else (None, None)
    return make_jobs(source, text, recipes, opts.fidelity.to_dict(), opts.latency.to_dict(), suite, prepared,
                     resolve_device(opts.device), opts.threads)


@contextlib.contextmanager
def _job_bar(total: int, enabled: bool):
    """A progress bar over jobs; yields the sweep's progress callback."""
    from tqdm import tqdm

    with tqdm(total=total, desc="recipes", unit="recipe", disable=not enabled) as bar:
        def progress(job, record, cached):
            bar.set_postfix_str(f"{job.recipe.name}{' (job cache)' if cached else ''}")
            bar.update()
        yield progress


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
