"""GPT-2's Conv1D layers (the product of nn.Linear with the weight stored transposed, (in, out)) are quantized by
every recipe that runs on CPU as a linear is: bytes below fp and equal to the planner's, a small but nonzero KLD,
and an artifact that reloads the way its layout (and manifest) says. A quantize that quantized nothing (a layer
type no method handles) is refused with one line instead of giving a row that claims bits it does not hold."""

from __future__ import annotations


import pytest
from click.testing import CliRunner
from tiny import with_own_code

from quantlab.cli import cli
from quantlab.errors import ModelLoadError, RecipeError
from quantlab.methods import get_method
from quantlab.layouts.loading import load_recipe_model
from quantlab.plan import PlanSettings, plan_model
from quantlab.recipe import parse_recipe, parse_recipe_list, recipe_from_mapping

#: (out, in) of each Conv1D of one block of ``build_gpt2_dir``'s model: in-features 64 and 256
GPT2_SHAPES = {"attn.c_attn": (192, 64), "attn.c_proj": (64, 64), "mlp.c_fc": (256, 64), "mlp.c_proj": (64, 256)}
LAYERS = 2


def build_gpt2_dir(path):
    """A random-init GPT-2 (tied head, Conv1D projections with biases) plus the word-level tokenizer."""
    import torch
    from tiny import build_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=LAYERS, n_head=4, vocab_size=len(tok), n_positions=128,
                        initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    path.mkdir(parents=True)
    GPT2LMHeadModel(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return build_gpt2_dir(tmp_path_factory.mktemp("gpt2") / "model")


@pytest.fixture(scope="module")
def gpt2_fp(gpt2_dir):
    return load_recipe_model(str(gpt2_dir), parse_recipe("fp"), "cpu")


def _recipe(case: str, text):
    """A short name, or a cheap configuration of the calibrated and trained methods on ``text``."""
    if case == "gptq-w4-g64":
        return recipe_from_mapping({"method": "gptq", "bits": 4, "group_size": 64, "calibration": str(text),
                                    "samples": 8, "tokens": 32}, "test")
    if case == "qat-w4-g32":
        return recipe_from_mapping({"method": "qat", "scheme": "w4", "group_size": 32, "steps": 2, "batch": 2,
                                    "seq_len": 16, "train_text": str(text), "heldout_windows": 1,
                                    "curve_points": 1}, "test")
    return parse_recipe(case)


def _kld(fp, model) -> float:
    """Mean KL(fp || model) per token over two windows of random token ids."""
    import torch

    ids = torch.randint(3, fp.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = torch.log_softmax(fp(ids).logits.float(), -1)
        q = torch.log_softmax(model(ids).logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


CASES = ["bnb-int8", "bnb-nf4", "rtn-w8", "rtn-w4-g64", "rtn-w4-g64-gptqfmt", "torchao-w4-g32", "torchao-a8w4-g32",
         "gptq-w4-g64", "qat-w4-g32"]


@pytest.mark.parametrize("case", CASES)
def test_every_cpu_recipe_quantizes_conv1d(case, gpt2_dir, gpt2_fp, tiny_text, tmp_path):
    from transformers import GPT2LMHeadModel

    from quantlab.measure.memory import weight_bytes

    recipe = _recipe(case, tiny_text)
    method = get_method(recipe.method)
    notes = method.quantize(recipe.config, gpt2_dir, tmp_path, "cpu")
    model = load_recipe_model(str(tmp_path), recipe, "cpu")
    assert type(model) is GPT2LMHeadModel  # reloaded as the model's own class, no quantlab code in it
    held, fp = weight_bytes(model), weight_bytes(gpt2_fp)
    assert 0 < held["quantized_bytes"] and held["weights_bytes"] < fp["weights_bytes"]
    planned = plan_model(str(gpt2_dir), PlanSettings(device="cpu", recipes=(recipe,)))["recipes"][0]
    assert planned["weights_bytes"] == held["weights_bytes"]
    assert 0 < _kld(gpt2_fp, model) < 0.05
    if recipe.method != "bnb":  # transformers' bnb integration transposes Conv1D itself: nothing to say
        assert notes["conv1d"].startswith(f"{len(GPT2_SHAPES) * LAYERS} Conv1D layers")


def test_a_torchao_artifact_is_refused_by_plain_from_pretrained_not_misread(gpt2_dir, tmp_path):
    """Its Conv1D weights are stored as linears (out, in): transformers refuses the shapes rather than load them."""
    from quantlab.models.load import load_causal_lm

    recipe = parse_recipe("rtn-w8")
    get_method("rtn").quantize(recipe.config, gpt2_dir, tmp_path, "cpu")
    with pytest.raises(ModelLoadError, match="size"):
        load_causal_lm(tmp_path)


def test_layer_by_layer_runs_and_quantizes_gpt2(gpt2_dir, gpt2_fp, tmp_path):
    """Under a memory budget: GPT-2's layers (``transformer.h``) run one at a time as the model loaded whole does, and
    RTN quantized layer by layer is the artifact quantized whole (its Conv1D layers stored as linears)."""
    import torch

    from quantlab.layerwise.model import LayerwiseModel
    from quantlab.measure.memory import weight_bytes

    ids = torch.randint(3, gpt2_fp.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))

    def log_probs(model):
        with torch.no_grad():
            return torch.log_softmax(model(ids).logits.float(), -1)[:, :-1]

    assert torch.allclose(LayerwiseModel(gpt2_dir).log_probs(ids), log_probs(gpt2_fp), atol=1e-5)
    recipe, rtn = parse_recipe("rtn-w8"), get_method("rtn")
    notes = rtn.quantize_layer_by_layer(recipe.config, gpt2_dir, tmp_path / "layered", "cpu")
    rtn.quantize(recipe.config, gpt2_dir, tmp_path / "whole", "cpu")
    layered, whole = (load_recipe_model(str(tmp_path / d), recipe, "cpu") for d in ("layered", "whole"))
    assert weight_bytes(layered) == weight_bytes(whole) and weight_bytes(whole)["quantized_bytes"] > 0
    assert torch.equal(log_probs(layered), log_probs(whole)) and notes["conv1d"].startswith("8 Conv1D layers")
    assert torch.allclose(LayerwiseModel(tmp_path / "layered").log_probs(ids), log_probs(whole), atol=1e-5)


def test_the_planner_counts_conv1d_as_linears(gpt2_dir):
    from quantlab.models.load import load_config
    from quantlab.models.shapes import linear_shapes
    from quantlab.plan.shapes import model_shapes

    shapes = model_shapes(load_config(gpt2_dir))
    expected = {f"transformer.h.{i}.{name}": dims for i in range(LAYERS) for name, dims in GPT2_SHAPES.items()}
    assert shapes.linear_shapes() == expected == linear_shapes(load_config(gpt2_dir))
    assert dict(shapes.linear_biases) == {name: out for name, (out, _) in expected.items()}
    res = CliRunner().invoke(cli, ["plan", str(gpt2_dir), "--device", "cpu", "--recipes", "fp,rtn-w8"], obj={})
    assert res.exit_code == 0, res.output
    assert f"rtn-w8: {shapes.quantized_weights} linear weights" in res.stdout and shapes.quantized_weights == 98304


def test_a_group_size_is_checked_against_conv1d_in_features(gpt2_dir):
    row = plan_model(str(gpt2_dir), PlanSettings(device="cpu", recipes=tuple(parse_recipe_list("rtn-w4-g128"))))
    assert not row["recipes"][0]["applicable"] and "group size 128 does not divide in-features [64]" in \
        row["recipes"][0]["reason"]


CONFIGURATION = '''
from transformers import LlamaConfig


class ExoticConfig(LlamaConfig):
    model_type = "quantlab-exotic-llama"
'''

MODELING = '''
import torch
from transformers import LlamaForCausalLM

from .configuration_exotic import ExoticConfig


class Proj(torch.nn.Module):
    """A linear layer that is no nn.Linear (nor Conv1D): no method here knows it."""

    def __init__(self, in_features, out_features, bias):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


class ExoticLlamaForCausalLM(LlamaForCausalLM):
    config_class = ExoticConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            for module in list(layer.modules()):
                for name, child in list(module.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        setattr(module, name, Proj(child.in_features, child.out_features, child.bias is not None))
'''


@pytest.fixture(scope="module")
def exotic_dir(tmp_path_factory, tiny_dir):
    """The tiny Llama's weights under model code (its own, ``auto_map``) whose projections are a class of its own."""
    return with_own_code(tiny_dir, tmp_path_factory.mktemp("exotic") / "model", "quantlab-exotic-llama", CONFIGURATION,
                         MODELING, "ExoticConfig", "ExoticLlamaForCausalLM")


@pytest.mark.parametrize("name", ["rtn-w8", "bnb-int8"])
def test_a_quantize_that_quantized_nothing_is_refused(name, exotic_dir):
    """The quantize step (a process of its own) finds every tensor written floating point: one line, no artifact."""
    from quantlab.artifacts import artifact_path
    from quantlab.models.source import resolve_model
    from quantlab.steps.quantize import ensure_artifact

    source, recipe = resolve_model(str(exotic_dir), trust_remote_code=True), parse_recipe(name)
    with pytest.raises(RecipeError) as err:
        ensure_artifact(source, recipe, "cpu")
    message = str(err.value)
    assert message.startswith(f"{name} quantized nothing in {exotic_dir}: every tensor it wrote is floating point "
                              "(the model's weight layers: Proj) — ") and "\n" not in message
    target = artifact_path(source, recipe, "cpu")
    assert not target.exists() and not [p for p in target.parent.iterdir() if not p.name.startswith(".")]


def test_the_cli_refuses_it_in_one_line(exotic_dir):
    """Through the CLI the model is refused before work, or by the quantize step: one line either way, no artifact."""
    from quantlab.home import quantlab_home

    res = CliRunner().invoke(cli, ["quantize", "rtn-w8", "--model", str(exotic_dir), "--trust-remote-code",
                                   "--device", "cpu"], obj={})
    assert res.exit_code in (1, 2), res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "rtn-w8" in lines[0] and "nothing" in lines[0]
    assert not list((quantlab_home() / "artifacts").rglob("quantlab.json"))
