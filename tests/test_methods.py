"""Contract suite: every quantizing method writes a directory plain transformers reloads."""

import json
import subprocess
import sys

import pytest
import torch

from quantlab.methods import get_method
from quantlab.recipe import parse_recipe

CASES = ["bnb-int8", "bnb-nf4", "bnb-fp4", "bnb-nf4-dq", "rtn-w8", "rtn-w4-g32", "rtn-w4-g64-asym"]

RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.arange(2, 34).unsqueeze(0)
with torch.no_grad():
    logits = m(ids).logits
print(json.dumps({"sum": logits.double().sum().item(), "absmax": logits.abs().max().item(),
                  "quantlab_imported": any(k.startswith("quantlab") for k in sys.modules)}))
"""


@pytest.fixture(scope="module")
def quantized(tiny_dir, tmp_path_factory):
    out = {}
    for name in CASES:
        recipe = parse_recipe(name)
        target = tmp_path_factory.mktemp(name)
        get_method(recipe.method).quantize(recipe.config, tiny_dir, target, "cpu")
        out[name] = target
    return out


@pytest.mark.parametrize("name", CASES)
def test_artifact_reloads_in_fresh_process_without_quantlab(name, quantized):
    from quantlab.evaluate.fidelity_job import load_recipe_model

    proc = subprocess.run([sys.executable, "-c", RELOAD, str(quantized[name])], capture_output=True, text=True,
                          cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fresh["quantlab_imported"] is False
    model = load_recipe_model(str(quantized[name]), parse_recipe(name), "cpu")
    with torch.no_grad():
        logits = model(torch.arange(2, 34).unsqueeze(0)).logits
    assert abs(logits.double().sum().item() - fresh["sum"]) <= 1e-3 * max(1.0, abs(fresh["sum"]))


@pytest.mark.parametrize("name", CASES)
def test_quantized_layers_really_are_quantized(name, quantized):
    from safetensors import safe_open

    with safe_open(str(quantized[name] / "model.safetensors"), "pt") as fh:
        dtypes = {k: fh.get_slice(k).get_dtype() for k in fh.keys() if "layers.0.mlp.up_proj" in k}
    assert any(d in ("I8", "U8") for d in dtypes.values()), dtypes
    assert not any(k.endswith("up_proj.weight") and d in ("F32", "BF16", "F16") for k, d in dtypes.items())


@pytest.mark.parametrize("name", ["rtn-w8", "rtn-w4-g32", "rtn-w4-g64-asym"])
def test_rtn_artifact_equals_plain_torch_reference(name, quantized, tiny_model):
    """The torchao layout holds exactly the plain-torch RTN result."""
    from quantlab.evaluate.fidelity_job import load_recipe_model
    from quantlab.methods.rtn import fake_quantize

    recipe = parse_recipe(name)
    loaded = load_recipe_model(str(quantized[name]), recipe, "cpu")
    for layer in ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"):
        w_fp = tiny_model.get_submodule(layer).weight.detach()
        qw = loaded.get_submodule(layer).weight
        deq = qw.dequantize() if hasattr(qw, "dequantize") else qw
        ref = fake_quantize(w_fp, recipe.config.bits, recipe.config.group_size, recipe.config.symmetric)
        torch.testing.assert_close(deq.float(), ref, atol=1e-6, rtol=0)


def test_rtn_error_shrinks_with_bits(tiny_model):
    from quantlab.methods.rtn import fake_quantize

    w = tiny_model.model.layers[0].mlp.down_proj.weight.detach()
    err = {b: (fake_quantize(w, b, 32, True) - w).abs().mean().item() for b in (8, 4)}
    assert 0 < err[8] < err[4] / 8
