"""The memory budget (--max-memory): planned before work, the fp reference layer by layer when the fp model does
not fit, refusals as one-line errors, and the same numbers as without a budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantlab.cli import cli
from quantlab.evaluate.fidelity import FidelitySettings
from quantlab.methods import get_method
from quantlab.models.load import load_config
from quantlab.plan.shapes import model_shapes
from quantlab.plan.steps import IN_MEMORY, LAYER_BY_LAYER, reference_components, resolve_budget, step_peak

SETTINGS = FidelitySettings(max_chunks=4, chunk_tokens=32)
COMMON = ["--chunks", "4", "--chunk-tokens", "32", "--repetitions", "1", "--batch-sizes", "1", "--decode-tokens", "4"]


def _between(tiny_dir, settings=SETTINGS) -> int:
    """A budget above the fp reference and RTN's quantization layer by layer, and below the reference in memory."""
    from quantlab.plan.steps import quantize_sizes
    from quantlab.recipe import parse_recipe

    shapes = model_shapes(load_config(tiny_dir))
    whole = step_peak(reference_components(shapes, settings, "cpu", IN_MEMORY, 1))
    rtn = parse_recipe("rtn-w8")
    layered = max(step_peak(reference_components(shapes, settings, "cpu", LAYER_BY_LAYER, 1)),
                  sum(get_method("rtn").layer_by_layer_peak(rtn.config, quantize_sizes(rtn, shapes, "cpu"), "cpu").values()))
    assert layered < whole
    return (layered + whole) // 2


def _compare(tiny_dir, tiny_text, out, recipes, *extra):
    result = CliRunner().invoke(cli, ["quantize-and-compare", "--model", str(tiny_dir), "--recipes", recipes,
                                      "--text", str(tiny_text), "--out", str(out), *COMMON, *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text())


def test_under_a_budget_the_model_runs_layer_by_layer_with_the_same_numbers(tiny_dir, tiny_text, tmp_path,
                                                                            monkeypatch):
    budget = _between(tiny_dir)
    monkeypatch.setenv("QUANTLAB_HOME", str(tmp_path / "home-budget"))
    under = _compare(tiny_dir, tiny_text, tmp_path / "under", "qat-w4-g32,rtn-w8", "--max-memory", f"{budget}B")
    monkeypatch.setenv("QUANTLAB_HOME", str(tmp_path / "home-free"))
    free = _compare(tiny_dir, tiny_text, tmp_path / "free", "rtn-w8")
    runs = {r["recipe"]: r for r in under["runs"]}
    assert under["max_memory_bytes"] == budget and free["max_memory_bytes"] is None
    assert runs["fp"]["fidelity"]["step"]["reference_mode"] == LAYER_BY_LAYER
    assert free["runs"][0]["fidelity"]["step"]["reference_mode"] == IN_MEMORY
    # the fp model does not fit: its bench is skipped and its weights are the planner's
    assert runs["fp"]["memory"]["planned"] and runs["fp"]["latency"]["skipped"]
    # RTN quantizes layer by layer, into a sharded artifact with the in-memory artifact's numbers
    assert (Path(runs["rtn-w8"]["artifact"]) / "model.safetensors.index.json").is_file()
    assert not (Path(free["runs"][1]["artifact"]) / "model.safetensors.index.json").exists()
    rtn = {r["recipe"]: r for r in free["runs"]}["rtn-w8"]["fidelity"]
    assert runs["rtn-w8"]["fidelity"]["kld_mean"] == pytest.approx(rtn["kld_mean"], rel=1e-4, abs=1e-7)
    assert runs["rtn-w8"]["fidelity"]["ppl"] == pytest.approx(rtn["ppl"], rel=1e-5)
    # QAT holds teacher, student, gradients and Adam; its PTQ twin loads the fp model whole: both refused before
    # work, with the planner's numbers
    refused = {r["recipe"]: r for r in under["refused"]}
    assert set(refused) == {"qat-w4-g32", "torchao-w4-g32"}
    assert "optimizer state" in refused["qat-w4-g32"]["reason"] and "over the budget" in refused["qat-w4-g32"]["reason"]
    assert refused["qat-w4-g32"]["steps"]["quantize"]["peak_bytes"] > budget
    # every step is judged against the budget: a tiny model's steps hold far more than its sub-megabyte budget
    # (the runtime's own allocations once its libraries are imported), so they are flagged where they ran
    from quantlab.plan.steps import gb
    from quantlab.records import held_bytes
    from quantlab.table import render_table

    for run in under["runs"]:
        check, held = run["memory"]["budget"], held_bytes(run)
        assert check["max_memory_bytes"] == budget and check["held_bytes"] == held
        assert check["over"] == [s for s in ("quantize", "fidelity", "bench") if held[s] and held[s] > budget]
    assert runs["fp"]["memory"]["budget"]["over"] == ["fidelity"]  # fp neither quantizes nor (skipped) benches
    assert runs["rtn-w8"]["memory"]["budget"]["over"] == ["quantize", "fidelity"]
    assert sum(f"over the {gb(budget)} budget" in w for w in under["warnings"]) == 3, under["warnings"]
    assert "rtn-w8: OVER BUDGET — its quantize step held" in render_table(under)
    assert all("budget" not in r["memory"] for r in free["runs"]) and "OVER" not in render_table(free)


@pytest.mark.parametrize("args, words", [
    (["quantize-and-compare", "--recipes", "bnb-nf4", "--max-memory", "1KB"], "smaller than one layer"),
    (["quantize", "bnb-int8", "--max-memory", "60KB"], "quantizing bnb-int8 holds"),
    (["quantize", "qat-w4-g32", "--max-memory", "1MB"], "optimizer state"),
    (["quantize-and-compare", "--recipes", "bnb-nf4", "--max-memory", "lots"], "not a memory size"),
])
def test_budgets_that_cannot_work_are_one_line_errors_before_any_work(args, words, tiny_dir, tiny_text, tmp_path,
                                                                       quantlab_home):
    out = tmp_path / "out"
    extra = ["--model", str(tiny_dir)]
    if args[0] == "quantize-and-compare":
        extra += ["--text", str(tiny_text), "--out", str(out), *COMMON]
    result = CliRunner().invoke(cli, [*args, *extra])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0], result.output
    assert not out.exists() and not (quantlab_home / "artifacts").exists() and not (quantlab_home / "logits").exists()


def test_the_budget_comes_from_the_environment_when_no_flag_names_one(monkeypatch):
    monkeypatch.delenv("QUANTLAB_MAX_MEMORY", raising=False)
    assert resolve_budget(None) is None
    monkeypatch.setenv("QUANTLAB_MAX_MEMORY", "3.5GB")
    assert resolve_budget(None) == 3_500_000_000
    assert resolve_budget("2GiB") == 2 * 2**30  # a flag beats the environment


def test_a_sweep_file_budget_plans_every_job_and_the_flag_overrides_it(tiny_dir, tiny_text, tmp_path):
    import dataclasses

    from quantlab.sweep.plan import plan_jobs
    from quantlab.sweep.spec import load_spec

    budget = _between(tiny_dir)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"models: [{tiny_dir}]\nrecipes: [bnb-int8, rtn-w8]\nmax_memory: {budget}B\n"
                     f"evaluation: {{text: {tiny_text}, chunks: 4, chunk_tokens: 32}}\n")
    jobs = {j.recipe.name: j for j in plan_jobs(load_spec(sweep))}
    assert jobs["fp"].step("reference").mode == LAYER_BY_LAYER and jobs["fp"].step("bench").mode == "skipped"
    assert jobs["rtn-w8"].step("quantize").mode == LAYER_BY_LAYER and not jobs["rtn-w8"].refused
    assert jobs["bnb-int8"].refused.startswith("quantize:")
    free = {j.recipe.name: j for j in plan_jobs(dataclasses.replace(load_spec(sweep), max_memory="1TB"))}
    assert not any(j.refused for j in free.values()) and free["fp"].step("bench").mode == IN_MEMORY
    # a skipped bench changes what the job computes, so its key; the way a step runs does not
    from quantlab.sweep.jobs import make_job

    j = jobs["rtn-w8"]
    assert j.step("bench").mode == "skipped" and j.key != free["rtn-w8"].key
    steps = {k: dataclasses.replace(v, mode=IN_MEMORY if v.mode == "skipped" else v.mode) for k, v in j.steps.items()}
    same = make_job(j.model, j.recipe, j.text, j.fidelity, j.latency, None, None, j.device, j.threads, j.data_dir, steps)
    assert same.step("quantize").mode == LAYER_BY_LAYER and same.key == free["rtn-w8"].key
    # a Ray task gets the job as plain data and back, typed plans and budget included
    import json

    from quantlab.sweep.jobs import Job

    back = Job.from_payload(json.loads(json.dumps(j.payload())))
    assert back == j and back.budget == budget and back.step("bench") == j.step("bench")
    assert j.step("bench").budget_bytes == budget


def test_eval_under_a_budget_computes_the_reference_layer_by_layer(tiny_dir, tiny_text, quantlab_home):
    runner = CliRunner()
    art = runner.invoke(cli, ["quantize", "rtn-w8", "--model", str(tiny_dir)])
    assert art.exit_code == 0, art.output
    args = ["eval", art.output.strip().splitlines()[-1], "--baseline", str(tiny_dir), "--text", str(tiny_text)]
    result = runner.invoke(cli, [*args, "--max-memory", f"{_between(tiny_dir, FidelitySettings())}B"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert data["fidelity"]["kld_mean"] >= 0 and data["reference_mode"] == LAYER_BY_LAYER
    logits = [p for p in (quantlab_home / "logits").iterdir() if not p.name.startswith(".")]
    assert len(logits) == 1 and (logits[0] / "logprobs.npy").is_file()


def test_a_gptq_artifact_that_does_not_fit_is_evaluated_layer_by_layer_with_the_same_numbers(gptq_artifacts, tiny_dir,
                                                                                               tiny_text):
    from quantlab.evaluate.text import resolve_text
    from quantlab.models.source import resolve_model
    from quantlab.plan.steps import fidelity_components
    from quantlab.steps.fidelity import Candidate, measure_fidelity
    from quantlab.sweep.commands import eval_plans

    path, _, recipe = gptq_artifacts[8]
    shapes = model_shapes(load_config(tiny_dir))
    whole = step_peak(fidelity_components(recipe, shapes, SETTINGS, "cpu", IN_MEMORY, 1))
    layered = max(step_peak(fidelity_components(recipe, shapes, SETTINGS, "cpu", LAYER_BY_LAYER, 1)),
                  step_peak(reference_components(shapes, SETTINGS, "cpu", LAYER_BY_LAYER, 1)))
    assert layered < whole
    base, text, runs = resolve_model(str(tiny_dir)), resolve_text(str(tiny_text)), {}
    for name, budget in (("free", None), ("under", (layered + whole) // 2)):
        plans = eval_plans(base, recipe, SETTINGS, "cpu", budget)
        runs[name] = measure_fidelity(base, text, SETTINGS, "cpu", [Candidate(recipe, str(path))], plans)["results"][0]
        mode = plans["fidelity"].mode if "fidelity" in plans else IN_MEMORY
        assert mode == (IN_MEMORY if budget is None else LAYER_BY_LAYER)
    for key in ("kld_mean", "top1_agreement", "ppl"):
        assert runs["under"][key] == pytest.approx(runs["free"][key], rel=1e-4, abs=1e-7), key


def test_quantize_under_a_budget_warns_when_the_step_held_more_than_the_budget(tiny_dir, quantlab_home):
    """The quantize step's held memory is judged against the budget when it runs; a tiny model's step holds more
    than its sub-megabyte budget (the runtime's own allocations), so it warns; a cached artifact is not judged."""
    budget = _between(tiny_dir, FidelitySettings())
    runner = CliRunner()
    args = ["quantize", "rtn-w8", "--model", str(tiny_dir), "--max-memory", f"{budget}B"]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    warning = [ln for ln in first.stderr.splitlines() if ln.startswith("Warning:")]
    assert len(warning) == 1 and "rtn-w8: its quantize step held" in warning[0] and "budget (planned" in warning[0]
    artifact = Path(first.stdout.strip().splitlines()[-1])
    cost = json.loads((artifact / "quantlab.json").read_text())["cost"]
    assert cost["budgeted"] is True and cost["held"]["held_peak_bytes"] > budget
    again = runner.invoke(cli, args)
    assert again.exit_code == 0 and "Warning" not in again.stderr and again.stdout.strip().endswith(str(artifact))


def test_an_fp_dtype_candidate_plans_its_fidelity_step_at_the_settings_batch(tiny_dir):
    """Only the fp baseline is its own reference; bf16 (another fp dtype) runs a comparison, planned like any
    candidate's: at the settings' batch, fewer windows when a budget says so."""
    from quantlab.plan.steps import NONE, fidelity_components, plan_fidelity
    from quantlab.recipe import parse_recipe

    shapes = model_shapes(load_config(tiny_dir))
    settings = FidelitySettings(max_chunks=4, chunk_tokens=32, batch_size=3)
    assert plan_fidelity(parse_recipe("fp"), shapes, settings, "cpu", None).mode == NONE
    bf16 = parse_recipe("bf16")
    plan = plan_fidelity(bf16, shapes, settings, "cpu", None)
    assert (plan.mode, plan.batch) == (IN_MEMORY, 3)
    two = step_peak(fidelity_components(bf16, shapes, settings, "cpu", IN_MEMORY, 2))
    plan = plan_fidelity(bf16, shapes, settings, "cpu", two)
    assert (plan.mode, plan.batch, plan.peak_bytes) == (IN_MEMORY, 2, two)


def test_eval_of_a_suite_that_does_not_fit_the_budget_is_a_one_line_error_before_the_model_loads(tiny_dir,
                                                                                                   quantlab_home):
    result = CliRunner().invoke(cli, ["eval", str(tiny_dir), "--suite", "ci", "--max-memory", "100KB"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --max-memory: accuracy:"), result.output
    assert "lm-eval requests" in lines[0] and "raise --max-memory" in lines[0]
