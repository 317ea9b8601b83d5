"""NaN or an infinite value is never a result (issue 31, class 8), and the fit's bytes as loaded equal the planner's.

A model that really overflows float16 is made from the tiny Llama: the norm before each MLP scaled by 1e3, so the
MLP's activations pass 65504 (float16's largest value) while float32 and bfloat16 stay finite, and its weights (the
GPTQ scales of its linears included) stay ordinary. Gemma-family models
hold a buffer in the model's dtype (Gemma3's ``embed_scale``), which the planner counted at the meta model's dtype.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from quantlab.cli import cli
from quantlab.errors import MeasurementError, QuantlabError, RecipeError
from quantlab.fit.units import model_units
from quantlab.layouts.fp import FpLayout
from quantlab.layouts.gptq_mixed import GptqMixedLayout
from quantlab.measure.memory import weight_bytes
from quantlab.models.load import load_config
from quantlab.plan.shapes import model_shapes
from quantlab.plan.terms import weight_terms

SCALE = 1e3  # post_attention_layernorm x this: act(gate) * up ~1e6, the residual ~2e4, float16's limit 65504


def _logits(path: Path, dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.inference_mode():
        return model(torch.arange(3, 67).unsqueeze(0)).logits


@pytest.fixture(scope="module")
def overflow_dir(tmp_path_factory) -> Path:
    """The tiny Llama whose activations overflow float16 only: checked with real forwards in each dtype."""
    from tiny import build_llama_dir
    from transformers import AutoModelForCausalLM

    path = build_llama_dir(tmp_path_factory.mktemp("overflow") / "llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.mul_(SCALE)
    model.save_pretrained(path)
    assert torch.isfinite(_logits(path, torch.float32)).all() and torch.isfinite(_logits(path, torch.bfloat16)).all()
    assert not torch.isfinite(_logits(path, torch.float16)).any()
    return path


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory) -> Path:
    """The tiny Llama with a NaN in its final norm: not finite in any dtype (no fix by dtype)."""
    from tiny import build_llama_dir
    from transformers import AutoModelForCausalLM

    path = build_llama_dir(tmp_path_factory.mktemp("broken") / "llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A data dir whose c4_calibration (a fit's default calibration text) is words of the tiny vocabulary."""
    from tiny import write_text

    base = tmp_path_factory.mktemp("data")
    (base / "c4_calibration").mkdir()
    write_text(base / "c4_calibration" / "c4.utf8", words=8000, seed=7)
    return base


def build_gemma3_dir(path: Path, dtype: str = "float32") -> Path:
    """A random-init Gemma3 text model (tiny sizes, the tiny word-level tokenizer), saved with ``dtype`` in its
    config: google/gemma-3 checkpoints hold ``embed_scale`` as a buffer in the model's dtype."""
    from tiny import build_tokenizer
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=512,
                              sliding_window=64, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = Gemma3ForCausalLM(config).eval().to(getattr(torch, dtype))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], obj={})
    return result, result.stderr.strip().splitlines()


# --- the fit: refused before the long work, with the fix ---------------------------------------------------------


def test_quantlab_fit_refuses_a_model_that_overflows_float16_before_the_sensitivity_pass(overflow_dir, tiny_text,
                                                                                       data_dir, quantlab_home):
    result, err = _invoke("fit", overflow_dir, "--weights-budget", "150000B", "--formats", "fp,gptq-w4-g32",
                          "--text", tiny_text, "--data-dir", data_dir)
    assert result.exit_code == 2, result.output
    assert len(err) == 1 and err[0].startswith("Error: fit-150000B: the unquantized model computes NaN or inf logits")
    assert "held in float16 — its activations overflow float16" in err[0]
    assert err[0].endswith("quantlab fit --dtype bfloat16 (recipe fit-150000B-bf16)")
    assert "Traceback" not in result.output and not result.stdout
    # nothing of the long work ran: no uniform GPTQ artifact, no sensitivity table, no fp log-probs
    assert not any((quantlab_home / d).exists() for d in ("artifacts", "sensitivity", "logits"))


def test_held_in_bfloat16_the_same_model_passes_and_the_float16_verdict_is_cached(overflow_dir, data_dir, quantlab_home):
    from quantlab.models.source import resolve_model
    from quantlab.recipe import parse_recipe
    from quantlab.steps.overflow import check_held_dtype

    source = resolve_model(str(overflow_dir))
    recipe = parse_recipe("fit-150000B")
    with pytest.raises(RecipeError, match="overflow float16"):
        check_held_dtype(source, recipe, "cpu", 1, str(data_dir))
    (verdict,) = (quantlab_home / "overflow").iterdir()  # the float16 forward's verdict, cached by content
    assert json.loads(verdict.read_text()) == {"bad": 512, "total": 512}
    check_held_dtype(source, parse_recipe("fit-150000B-bf16"), "cpu", 1, str(data_dir))  # bfloat16: no refusal
    verdict.write_text(json.dumps({"bad": 0, "total": 512}))  # the next check reads the cache, runs no forward
    check_held_dtype(source, recipe, "cpu", 1, str(data_dir))


def test_a_cached_sensitivity_table_with_nan_is_refused_before_the_allocation(tiny_dir):
    from quantlab.methods.fit import FitConfig
    from quantlab.steps.fit import solve

    shapes = model_shapes(load_config(tiny_dir))
    config = FitConfig(weights_budget=10**9, formats=("fp", "gptq-w8"), units="block")
    units = [u.name for u in model_units(shapes, "block")]
    table = {"kld": {u: {"fp": 0.0, "gptq-w8": 0.01} for u in units}, "path": "/cache/table.json"}
    assert solve(config, table, shapes, "cpu").formats  # finite: allocated
    table["kld"][units[1]]["gptq-w8"] = math.nan
    with pytest.raises(MeasurementError, match=rf"table /cache/table.json: {units[1]}\.gptq-w8 is nan, not a number"):
        solve(config, table, shapes, "cpu")


# --- fidelity (quantize-and-compare, sweeps, eval --baseline): NaN is refused where it is computed -----------------


def test_quantize_and_compare_refuses_a_recipe_held_in_float16_that_overflows(overflow_dir, tiny_text, tmp_path):
    out = tmp_path / "out"
    result, err = _invoke("quantize-and-compare", "--model", overflow_dir, "--recipes", "fp16", "--text", tiny_text,
                          "--out", out, "--chunks", 2, "--batch-sizes", 1, "--repetitions", 1, "--decode-tokens", 2,
                          "--json")  # no progress bar: stderr holds the error alone
    assert result.exit_code == 1, result.output
    assert len(err) == 1 and err[-1].startswith("Error: fp16 computes NaN or inf log-probs at ")
    assert err[-1].endswith("held in float16 — its activations overflow float16 (above 65504), as Gemma-family "
                            "models' are known to; use the bf16 recipe instead of fp16")
    assert "Traceback" not in result.output and not result.stdout
    assert not (out / "results.json").exists()


def test_eval_baseline_refuses_a_model_whose_log_probs_are_nan_and_caches_nothing(broken_dir, tiny_text,
                                                                                quantlab_home, tmp_path):
    result, err = _invoke("eval", broken_dir, "--baseline", broken_dir, "--text", tiny_text,
                          "--output", tmp_path / "eval.json")
    assert result.exit_code == 1, result.output
    assert len(err) == 1 and err[0].startswith("Error: The fp baseline computes NaN or inf log-probs at ")
    assert "held in float32 — the model is broken" in err[0] and "Traceback" not in result.output
    assert not (tmp_path / "eval.json").exists()
    logits = quantlab_home / "logits"
    assert not logits.exists() or not [p for p in logits.iterdir() if not p.name.endswith(".lock")]


def test_the_fidelity_step_refuses_a_candidate_with_nan_log_probs_naming_its_recipes_fix(overflow_dir, tiny_text):
    from quantlab.evaluate.fidelity import FidelitySettings
    from quantlab.evaluate.text import resolve_text
    from quantlab.models.source import resolve_model
    from quantlab.recipe import parse_recipe
    from quantlab.steps.fidelity import Candidate, measure_fidelity

    with pytest.raises(MeasurementError) as exc:
        measure_fidelity(resolve_model(str(overflow_dir)), resolve_text(str(tiny_text)),
                         FidelitySettings(max_chunks=2, bootstrap=20), "cpu",
                         [Candidate(parse_recipe("fp16"), str(overflow_dir))])
    assert str(exc.value) == ("fp16 computes NaN or inf log-probs at 510 of 510 positions held in float16 — its "
                              "activations overflow float16 (above 65504), as Gemma-family models' are known to; "
                              "use the bf16 recipe instead of fp16")
    from quantlab.steps.overflow import bf16_fix

    assert bf16_fix(parse_recipe("fit-gpu32GB-c8192-b1")) == ("hold the fit in bfloat16: quantlab fit --dtype bfloat16 "
                                                              "(recipe fit-gpu32GB-c8192-b1-bf16)")


# --- results.json: one guard where results are published ------------------------------------------------------------


def test_published_results_refuse_a_non_finite_number_naming_the_field():
    import numpy as np

    from quantlab.sweep.publish import require_finite_results

    run = {"recipe": "gptq-w4-g64", "fidelity": {"kld_mean": 0.1, "ci95": {"ppl": [1.0, 2.0]}}, "latency": None}
    results = {"model": {"params": 10}, "runs": [dict(run), json.loads(json.dumps(run))]}
    require_finite_results(results)  # finite: nothing to say
    results["runs"][1]["fidelity"]["ci95"]["ppl"][1] = np.float32("inf")
    with pytest.raises(MeasurementError) as exc:
        require_finite_results(results)
    assert str(exc.value) == ("results.json field runs[1].fidelity.ci95.ppl[1] (gptq-w4-g64) is inf, not a number — "
                              "nothing was published; run that job again with --force")
    assert isinstance(exc.value, QuantlabError)


def test_a_results_json_holding_nan_is_not_taken_as_up_to_date(tmp_path):
    from quantlab.sweep.publish import _up_to_date

    (tmp_path / "report.html").write_text("<html></html>")
    good = {"run_set": "rs", "runs": [{"job_key": "k", "fidelity": {"kld_mean": 0.1}}]}
    (tmp_path / "results.json").write_text(json.dumps(good))
    assert _up_to_date(tmp_path / "results.json", "rs", ["k"]) == good
    good["runs"][0]["fidelity"]["kld_mean"] = math.nan  # json.dumps writes NaN, json.loads reads it back
    (tmp_path / "results.json").write_text(json.dumps(good))
    assert _up_to_date(tmp_path / "results.json", "rs", ["k"]) is None


# --- the 2 bytes: a buffer held in the model's dtype --------------------------------------------------------------


@pytest.mark.parametrize("config_dtype", ["float32", "bfloat16"])
def test_a_gemma3_model_loaded_in_each_dtype_holds_the_bytes_the_planner_predicts(tmp_path, config_dtype):
    """Gemma3's ``embed_scale`` is a buffer made in the model's dtype: 2 bytes held in float16 or bfloat16, 4 in
    float32, whatever dtype the meta model was built in (its config's). Rotary tables stay float32."""
    path = build_gemma3_dir(tmp_path / "gemma", config_dtype)
    from transformers import AutoModelForCausalLM

    shapes = model_shapes(load_config(path))
    units = model_units(shapes, "linear")
    for dtype in ("float32", "float16", "bfloat16"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        assert model.model.embed_tokens.embed_scale.dtype == getattr(torch, dtype)
        measured = weight_bytes(model)["weights_bytes"]
        assert sum(weight_terms(FpLayout(dtype), shapes, "cpu").values()) == measured, dtype
        if dtype != "float32":  # a fit with every unit fp: held as GPTQModel.load holds it, in the fit's dtype
            fit = GptqMixedLayout(tuple((u.name, "fp") for u in units), "linear", ("fp",), dtype)
            assert sum(weight_terms(fit, shapes, "cpu").values()) == measured, dtype


@pytest.mark.slow
def test_a_gemma3_fit_artifact_loaded_holds_exactly_the_predicted_bytes(tmp_path, gptq_calib):
    """The fit's own path: a mixed GPTQ artifact of the tiny Gemma3 (half its linears 4-bit), loaded with GPTQModel
    in float16: the bytes as loaded equal the planner's (they were 2 B under: ``embed_scale``)."""
    from quantlab.methods import get_method
    from quantlab.methods.fit import FitConfig

    path = build_gemma3_dir(tmp_path / "gemma")
    shapes = model_shapes(load_config(path))
    alloc = tuple((u.name, "gptq-w4-g32" if i % 2 else "fp") for i, u in enumerate(model_units(shapes, "linear")))
    config = FitConfig(weights_budget=10**9, formats=("fp", "gptq-w4-g32"), calibration=str(gptq_calib), samples=16,
                       tokens=64, allocation=alloc)
    method = get_method("fit")
    method.quantize(config, path, tmp_path / "fit", "cpu")
    model = method.layout(config).load(str(tmp_path / "fit"), "cpu")
    assert model.model.embed_tokens.embed_scale.dtype == torch.float16
    assert weight_bytes(model)["weights_bytes"] == sum(weight_terms(method.layout(config), shapes, "cpu").values())


@pytest.mark.slow
def test_the_refusals_fix_gives_the_overflowing_model_a_fit_with_finite_numbers(overflow_dir, tiny_text, data_dir):
    """The fix the refusal names works: the fit it refused, held as it says (bfloat16), builds, loads and measures
    finite numbers."""
    args = ["fit", overflow_dir, "--weights-budget", "150000B", "--formats", "fp,gptq-w4-g32", "--units", "block",
            "--text", tiny_text, "--data-dir", data_dir, "--json"]
    refused, err = _invoke(*args)
    assert refused.exit_code == 2 and err[-1].endswith("quantlab fit --dtype bfloat16 (recipe fit-150000B-bf16)")
    result, _ = _invoke(*args, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["recipe"] == "fit-150000B-bf16" and "dtype=torch.bfloat16" in out["loader"]
    assert math.isfinite(out["fidelity"]["kld_mean"]) and out["fidelity"]["top1_agreement"] > 0.25
    assert out["measured_bytes"] == out["fit"]["predicted_bytes"] <= 150_000
