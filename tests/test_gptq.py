"""GPTQ on a tiny model: quantizes in seconds, reloads through plain transformers, beats RTN per layer."""

import json

import pytest
import torch

from quantlab.errors import DataError, RecipeError
from quantlab.methods import get_method
from quantlab.recipe import parse_recipe, recipe_from_mapping


def _recipe(bits, group, calibration, samples=16, tokens=64):
    return recipe_from_mapping({"method": "gptq", "bits": bits, "group_size": group, "calibration": calibration,
                                "samples": samples, "tokens": tokens}, "test")


@pytest.fixture
def calib_file(gptq_calib):
    return gptq_calib


@pytest.fixture
def quantized(gptq_artifacts):
    return {bits: (target, notes) for bits, (target, notes, _) in gptq_artifacts.items()}


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_artifact_records_bits_and_calibration(bits, quantized):
    target, notes = quantized[bits]
    assert json.loads((target / "config.json").read_text())["quantization_config"]["bits"] == bits
    assert notes["calibration"]["samples"] == 16 and len(notes["calibration"]["sha256"]) == 64
    # The reload in a fresh process without quantlab is the method contract's (tests/test_methods.py).


def test_gptq_error_is_below_rtn_on_calibration_inputs(tiny_dir, tiny_model, quantized, calib_file):
    """GPTQ minimises ||W X - Q(W) X|| on the calibration inputs; per layer it must not lose to RTN.

    Checked on the first layer's q/k/v projections, whose inputs do not depend on earlier quantization.
    """
    from quantlab.methods.calibration import calibration_windows
    from quantlab.layouts.loading import load_recipe_model
    from quantlab.methods.rtn import fake_quantize

    recipe = _recipe(4, 32, str(calib_file))
    windows, _ = calibration_windows(recipe.config, tiny_dir, "cpu")
    captured = []
    hook = tiny_model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda mod, args, out: captured.append(args[0].detach()))
    with torch.no_grad():
        tiny_model(torch.tensor(windows))
    hook.remove()
    x = torch.cat(captured).reshape(-1, captured[0].shape[-1])  # (samples * tokens, hidden)
    gptq = load_recipe_model(str(quantized[4][0]), recipe, "cpu")
    for name in ("q_proj", "k_proj", "v_proj"):
        w = getattr(tiny_model.model.layers[0].self_attn, name).weight.detach()
        ref = x @ w.T
        with torch.no_grad():
            err_gptq = (getattr(gptq.model.layers[0].self_attn, name)(x) - ref).pow(2).sum().item()
        err_rtn = (x @ fake_quantize(w, 4, 32, True).T - ref).pow(2).sum().item()
        assert err_gptq <= err_rtn, (name, err_gptq, err_rtn)


def test_short_names():
    assert parse_recipe("gptq-w4-g64").params()["group_size"] == 64
    assert parse_recipe("gptq-w8").params() == {**parse_recipe("gptq-w8").params(), "bits": 8, "group_size": -1}
    with pytest.raises(RecipeError, match="bits must be 8 or 4"):
        parse_recipe("gptq-w3")
    with pytest.raises(RecipeError, match="group_size must be one of"):
        parse_recipe("gptq-w4-g48")


def test_group_size_must_divide_layers():
    with pytest.raises(RecipeError, match="does not divide in-features \\[576\\]"):
        get_method("gptq").check_model(parse_recipe("gptq-w4-g128").config, {"q": (576, 576)})


def test_too_short_calibration_is_an_error(tiny_dir, tmp_path):
    from quantlab.methods.calibration import calibration_windows

    short = tmp_path / "short.txt"
    short.write_text("the of and to in is " * 10)
    with pytest.raises(DataError, match="fewer than two windows"):
        calibration_windows(_recipe(4, 32, str(short)).config, tiny_dir, "cpu")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="Calibration: .*is empty"):
        calibration_windows(_recipe(4, 32, str(empty)).config, tiny_dir, "cpu")


def test_8bit_is_accuracy_only_on_cpu():
    method = get_method("gptq")
    assert "accuracy-only" in method.layout(parse_recipe("gptq-w8").config).latency_skipped("cpu")
    assert method.layout(parse_recipe("gptq-w4-g64").config).latency_skipped("cpu") is None


@pytest.mark.slow  # a whole quantize-and-compare with GPTQ calibration
def test_calibrating_on_the_evaluation_text_warns(tiny_dir, tiny_text, tmp_path):
    from click.testing import CliRunner

    from quantlab.cli import cli

    exp = tmp_path / "exp.yaml"
    exp.write_text(f"recipes:\n  - {{method: gptq, bits: 4, group_size: 32, calibration: '{tiny_text}', "
                   "samples: 8, tokens: 64}\n")
    res = CliRunner().invoke(cli, ["quantize-and-compare", "--model", str(tiny_dir), "--experiment", str(exp),
                                   "--text", str(tiny_text), "--out", str(tmp_path / "o"), "--chunk-tokens", "32",
                                   "--chunks", "4", "--repetitions", "1", "--decode-tokens", "2",
                                   "--batch-sizes", "1", "--json"], obj={})
    assert res.exit_code == 0, res.output
    assert "Warning: gptq-w4-g32 is calibrated on the evaluation text" in res.stderr
    data = json.loads(res.stdout)
    gptq = data["runs"][1]
    assert gptq["warnings"] and gptq["fidelity"]["kld_mean"] > 0
    assert gptq["latency"]["prefill_ms"] > 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["warnings"] == data["warnings"]


def test_quantizing_leaves_the_working_directory_clean(quantized, tmp_path, monkeypatch, tiny_dir, calib_file):
    import tempfile

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        recipe = _recipe(4, 32, str(calib_file), samples=4)
        get_method("gptq").quantize(recipe.config, tiny_dir, tmp_path / "out", "cpu")
    finally:
        tempfile.tempdir = None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tmp"]
    assert list((tmp_path / "tmp").iterdir()) == []  # GPTQModel's offload scratch is gone
    # ... and the saved configs do not point at it.
    for name in ("config.json", "quantize_config.json"):
        assert str(tmp_path / "tmp") not in (tmp_path / "out" / name).read_text()
    # GPTQModel's shared stop-forward exception no longer holds the last calibration forward's frames
    from gptqmodel.nn_modules.hooked_linear import STOP_FORWARD_EXCEPTION

    assert STOP_FORWARD_EXCEPTION.__traceback__ is None


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_weights_count_as_quantized_bytes(bits, gptq_artifacts, tiny_model):
    """qweight, qzeros, scales, g_idx and the shift tables are the quantized weight: their bytes are the layout's
    data and scales of every linear; the rest (embedding, norms, rotary tables) is unquantized, fp32 on CPU."""
    from tiny import TINY_SHAPES

    from quantlab.measure.memory import weight_bytes
    from quantlab.layouts.loading import load_recipe_model

    target, _, recipe = gptq_artifacts[bits]
    counted = weight_bytes(load_recipe_model(str(target), recipe, "cpu"))
    layout = get_method("gptq").layout(recipe.config)
    linears = [layout.linear_bytes(o, i, "cpu") for o, i in TINY_SHAPES.values()] * tiny_model.config.num_hidden_layers
    assert counted["quantized_bytes"] == sum(b["data"] + b["scales"] for b in linears)
    rest = sum(t.numel() * t.element_size() for n, t in [*tiny_model.named_parameters(), *tiny_model.named_buffers()]
               if "proj" not in n)  # tied head once; the rotary tables are buffers
    assert counted["unquantized_bytes"] == rest
