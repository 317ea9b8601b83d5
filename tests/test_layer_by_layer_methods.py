"""Calibration-free methods quantized one decoder layer at a time write the tensors the whole-model route writes.

``quantize_layer_by_layer`` is what a budgeted quantize step runs when the fp model does not fit
(``quantlab.plan.steps.plan_quantize``); its artifact must be the in-memory one, sharded: every tensor equal, the same
config, and the same outputs once loaded."""

import json

import pytest
import torch
from tiny import build_llama_dir

from quantlab.layouts.loading import load_recipe_model
from quantlab.methods import get_method
from quantlab.recipe import parse_recipe


def _tensors(directory):
    from safetensors import safe_open

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", ["hqq-w4-g32", "hqq-w8-g64", "fp8", "bnb-nf4", "bnb-fp4-dq"])
def test_layer_by_layer_writes_the_whole_model_artifact(name, tied, tmp_path):
    source = build_llama_dir(tmp_path / "llama", layers=3, tied=tied)
    recipe = parse_recipe(name)
    method = get_method(recipe.method)
    method.quantize(recipe.config, source, tmp_path / "whole", "cpu")
    notes = method.quantize_layer_by_layer(recipe.config, source, tmp_path / "layered", "cpu")
    assert "layer by layer" in notes["written"]
    assert len(list((tmp_path / "layered").glob("model-*.safetensors"))) == 1 + 3  # the rest, then one per layer
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "layered")
    assert sorted(a) == sorted(b)
    for key, x in a.items():
        assert x.dtype == b[key].dtype and torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                                                       b[key].view(torch.uint8) if x.dtype == torch.float8_e4m3fn
                                                       else b[key]), key
    config = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("whole", "layered")]
    assert config[0] == config[1]
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        outs = [load_recipe_model(str(tmp_path / d), recipe, "cpu")(ids).logits for d in ("whole", "layered")]
    assert torch.equal(outs[0], outs[1])


def test_the_budget_planner_quantizes_layer_by_layer_where_the_fp_model_does_not_fit():
    from quantlab.plan.shapes import model_shapes
    from quantlab.plan.steps import LAYER_BY_LAYER, plan_quantize
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, vocab_size=32000,
                         num_attention_heads=16, num_key_value_heads=4)
    shapes = model_shapes(config)
    for name in ("hqq-w4-g64", "fp8", "bnb-nf4", "gguf-q4_k_m-imatrix"):
        plan = plan_quantize(parse_recipe(name), shapes, "cpu", budget=int(1.5e9))
        assert plan.mode == LAYER_BY_LAYER and plan.peak_bytes <= 1.5e9, (name, plan)


@pytest.mark.parametrize("name", ["fp8", "bnb-nf4", "bnb-fp4-dq"])
def test_float8_and_bnb4_artifacts_run_layer_by_layer_with_the_modules_they_load_into(name, tmp_path):
    from tiny import build_qwen2_dir

    from quantlab.evaluate import fidelity as fid
    from quantlab.layerwise.model import LayerwiseModel

    source = build_qwen2_dir(tmp_path / "qwen")  # biases on q, k, v: the swapped modules carry them
    recipe = parse_recipe(name)
    get_method(recipe.method).quantize(recipe.config, source, tmp_path / "artifact", "cpu")
    whole = load_recipe_model(str(tmp_path / "artifact"), recipe, "cpu")
    run = LayerwiseModel(tmp_path / "artifact", head_rows=7)
    ids = torch.randint(0, whole.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    assert (fid._log_probs(run, ids) - fid._log_probs(whole, ids)).abs().max().item() < 1e-5
    assert all(p.is_meta for layer in run.layers for p in layer.parameters())  # nothing held between forwards
