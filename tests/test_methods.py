"""Contract suite, generated from the method registry: every example recipe of every registered method that applies
to the tiny model writes a directory plain transformers reloads in a fresh process without quantlab, holds
the bytes the planner predicts, and round-trips its short name. A new method joins by registering."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import TINY_SHAPES

from quantlab.errors import RecipeError
from quantlab.methods import all_methods, get_method
from quantlab.recipe import Recipe, parse_recipe

EXAMPLES = [name for m in all_methods() for name in get_method(m).example_names]


#: methods whose artifacts another engine runs, with their contract in that engine's test file: a GGUF needs a
#: model loaded from a GGUF (a real tokenizer), so tests/test_gguf.py runs it on the embedded SmolLM2
OTHER_ENGINES = {"gguf": "tests/test_gguf.py"}


def _applies(name: str) -> bool:
    recipe = parse_recipe(name)
    method = get_method(recipe.method)
    if "transformers" not in method.layout(recipe.config).engines:
        return False
    try:
        method.check_model(recipe.config, TINY_SHAPES)
    except RecipeError:
        return False  # e.g. group 128 on in-features of 64
    return method.writes_artifact and not method.resolved_first  # a fit's contract: tests/test_fit_build.py


CASES = [name for name in EXAMPLES if _applies(name)] + ["rtn-w4-g64-asym"]  # + a variant no example shows


def test_the_contract_covers_every_method_that_writes_artifacts():
    covered = {parse_recipe(n).method for n in CASES} | set(OTHER_ENGINES)
    assert covered == {m for m in all_methods() if get_method(m).writes_artifact and not get_method(m).resolved_first}
    for method, tests in OTHER_ENGINES.items():
        assert f'get_method("{method}")' in (Path(__file__).parents[1] / tests).read_text()


@pytest.mark.parametrize("name", EXAMPLES)
def test_short_names_round_trip(name):
    recipe = parse_recipe(name)
    assert recipe.name == name and get_method(recipe.method).short_name(recipe.config) == name
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


RELOAD = r"""
import json, sys, torch
out = {}
for path, source in zip(sys.argv[1::2], sys.argv[2::2]):
    scope = {}
    exec(source, scope)  # the layout's standalone_load: how a user loads it without quantlab
    m = scope["load"](path)
    with torch.no_grad():
        logits = m(torch.arange(2, 34).unsqueeze(0)).logits
    out[path] = {"sum": logits.double().sum().item(), "absmax": logits.abs().max().item()}
out["quantlab_imported"] = any(k.startswith("quantlab") for k in sys.modules)
print(json.dumps(out))
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


@pytest.fixture(scope="module")
def fresh_reloads(quantized):
    """Every artifact loaded by plain transformers in one fresh process that never imports quantlab."""
    args = [a for name, path in quantized.items()
            for a in (str(path), get_method(parse_recipe(name).method).layout(parse_recipe(name).config).standalone_load)]
    proc = subprocess.run([sys.executable, "-c", RELOAD, *args], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CASES)
def test_artifact_reloads_in_fresh_process_without_quantlab(name, quantized, fresh_reloads):
    from quantlab.layouts.loading import load_recipe_model

    assert fresh_reloads["quantlab_imported"] is False
    fresh = fresh_reloads[str(quantized[name])]
    model = load_recipe_model(str(quantized[name]), parse_recipe(name), "cpu")
    with torch.no_grad():
        logits = model(torch.arange(2, 34).unsqueeze(0)).logits
    assert abs(logits.double().sum().item() - fresh["sum"]) <= 1e-3 * max(1.0, abs(fresh["sum"]))


@pytest.mark.parametrize("name", CASES)
def test_predicted_bytes_equal_the_loaded_artifact(name, quantized, tiny_dir):
    from quantlab.measure.memory import weight_bytes
    from quantlab.layouts.loading import load_recipe_model
    from quantlab.plan import PlanSettings, plan_model

    recipe = parse_recipe(name)
    (row,) = plan_model(str(tiny_dir), PlanSettings(device="cpu", recipes=(recipe,)))["recipes"]
    loaded = weight_bytes(load_recipe_model(str(quantized[name]), recipe, "cpu", prepare=False))["weights_bytes"]
    assert row["weights_bytes"] == loaded


@pytest.mark.parametrize("name", CASES)
def test_quantized_layers_really_are_quantized(name, quantized):
    from safetensors import safe_open

    with safe_open(str(quantized[name] / "model.safetensors"), "pt") as fh:
        dtypes = {k: fh.get_slice(k).get_dtype() for k in fh.keys() if "layers.0.mlp.up_proj" in k}
    assert any(d in ("I8", "U8", "I32", "F8_E4M3") for d in dtypes.values()), dtypes
    assert not any(k.endswith("up_proj.weight") and d in ("F32", "BF16", "F16") for k, d in dtypes.items())


@pytest.mark.parametrize("name", ["rtn-w8", "rtn-w4-g32", "rtn-w4-g64-asym"])
def test_rtn_artifact_equals_plain_torch_reference(name, quantized, tiny_model):
    """The torchao layout holds exactly the plain-torch RTN result."""
    from quantlab.layouts.loading import load_recipe_model
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


def test_rtn_in_gptq_format_holds_the_same_grid(quantized, tiny_model):
    """GPTQModel's RTN, packed eight int4 values per int32, stores torchao's symmetric int4 grid."""
    from safetensors import safe_open

    from quantlab.methods.rtn import fake_quantize

    layer = "model.layers.0.mlp.up_proj"
    with safe_open(str(quantized["rtn-w4-g64-gptqfmt"] / "model.safetensors"), "pt") as fh:
        qweight, qzeros, scales = (fh.get_tensor(f"{layer}.{k}") for k in ("qweight", "qzeros", "scales"))
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = ((qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF).reshape(-1, qweight.shape[1])  # (in, out)
    zeros = ((qzeros.unsqueeze(2) >> shifts.view(1, 1, 8)) & 0xF).reshape(qzeros.shape[0], -1) + 1  # v1 stores z-1
    assert torch.all(zeros == 8)  # symmetric: zero point in the middle of [0, 15]
    group = q.shape[0] // scales.shape[0]
    w = tiny_model.get_submodule(layer).weight.detach()
    ref_scale = w.t().reshape(-1, group, w.shape[0]).abs().amax(dim=1) / 7.5
    torch.testing.assert_close(scales.float(), ref_scale, rtol=1e-3, atol=0)  # scales are stored in fp16
    scale_full = ref_scale.repeat_interleave(group, dim=0)
    ref_int = torch.round(fake_quantize(w, 4, group, True).t() / scale_full)
    # The same integers everywhere except on the rounding tie: each group's negative extreme sits at
    # exactly -7.5 steps, which float arithmetic may round either way (-8 or -7).
    differ = q - 8 != ref_int
    at_tie = ((w.t() / scale_full).abs() - 7.5).abs() < 1e-5
    assert differ.float().mean().item() < 0.01
    assert not torch.any(differ & ~at_tie)
