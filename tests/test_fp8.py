"""FP8 weight-only (W8A16, e4m3, per output channel): the stored values, the checkpoint form vLLM reads, how quantlab
holds it once loaded, and its fidelity beside RTN's on a tiny model. The contract suite (tests/test_methods.py)
covers its reload without quantlab and its planned bytes."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from tiny import build_llama_dir

from quantlab.layouts.loading import load_recipe_model
from quantlab.measure.memory import weight_bytes
from quantlab.methods import get_method
from quantlab.recipe import parse_recipe

LAYERS = ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj")


def _quantize(name, source, target):
    recipe = parse_recipe(name)
    target.mkdir(parents=True, exist_ok=True)
    get_method(recipe.method).quantize(recipe.config, source, target, "cpu")
    return target


@pytest.fixture(scope="module")
def fp8_dir(tiny_dir, tmp_path_factory):
    return _quantize("fp8", tiny_dir, tmp_path_factory.mktemp("fp8") / "out")


def test_stored_weights_are_the_plain_torch_e4m3_rounding_of_w_over_the_row_scale(fp8_dir, tiny_model):
    with safe_open(str(fp8_dir / "model.safetensors"), "pt") as fh:
        for layer in LAYERS:
            w = tiny_model.get_submodule(layer).weight.detach().float()  # (out, in)
            q, scale = fh.get_tensor(f"{layer}.weight"), fh.get_tensor(f"{layer}.weight_scale")
            assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
            assert scale.dtype == torch.float32 and scale.shape == (w.shape[0], 1)
            assert torch.equal(scale, w.abs().amax(dim=1, keepdim=True) / 448)
            ref = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))  # bit for bit
            assert torch.equal(q.float().abs().amax(dim=1), torch.full((w.shape[0],), 448.0))  # each row's absmax
            # e4m3 keeps 3 mantissa bits: a normal value (≥ 2^-6 after scaling) is off by at most 2^-4 of itself
            normal = (w / scale).abs() >= 2 ** -6
            err = (q.float() * scale - w).abs()
            assert torch.all(err[normal] <= 2 ** -4 * w.abs()[normal] * (1 + 1e-6))
        assert not any(k.startswith("lm_head") for k in fh.keys())  # tied head: the embedding, unquantized
        assert fh.get_slice("model.embed_tokens.weight").get_dtype() == "F32"


def test_the_checkpoint_is_what_vllm_reads_as_compressed_tensors_w8a16_fp8(fp8_dir):
    """vLLM's CompressedTensorsConfig takes a float-quantized group with a float, 8-bit, symmetric, static, channel
    weight scheme and no input scheme as CompressedTensorsW8A16Fp8 (``_is_fp8_w8a16``), whose ``create_weights``
    registers ``weight`` float8_e4m3fn (out, in) and ``weight_scale`` float32 (out, 1) per linear. The config is
    parsed here by compressed-tensors itself, the library vLLM parses it with."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy, QuantizationType

    raw = json.loads((fp8_dir / "config.json").read_text())["quantization_config"]
    assert raw["quant_method"] == "compressed-tensors" and raw["format"] == "float-quantized"
    config = QuantizationConfig.model_validate(raw)
    assert config.ignore == ["lm_head"] and list(config.config_groups) == ["group_0"]
    scheme = config.config_groups["group_0"]
    assert scheme.targets == ["Linear"] and scheme.input_activations is None and scheme.output_activations is None
    weights = scheme.weights
    assert (weights.type, weights.num_bits, weights.strategy) == (QuantizationType.FLOAT, 8,
                                                                   QuantizationStrategy.CHANNEL)
    assert weights.symmetric and not weights.dynamic
    with safe_open(str(fp8_dir / "model.safetensors"), "pt") as fh:
        tensors = {k: (fh.get_slice(k).get_dtype(), fh.get_slice(k).get_shape()) for k in fh.keys()
                   if k.startswith("model.layers.0.mlp.gate_proj.")}
    assert tensors == {"model.layers.0.mlp.gate_proj.weight": ("F8_E4M3", [128, 64]),
                       "model.layers.0.mlp.gate_proj.weight_scale": ("F32", [128, 1])}


def test_quantlab_holds_float8_through_a_forward_and_matches_plain_transformers(fp8_dir):
    """compressed-tensors in transformers decompresses to dense fp32 on the first forward; quantlab's load keeps the
    float8 weights (the bytes it reports) and gives the very same logits."""
    from transformers import AutoModelForCausalLM

    ids = torch.arange(2, 40).unsqueeze(0)
    held = load_recipe_model(str(fp8_dir), parse_recipe("fp8"), "cpu")
    before = weight_bytes(held)
    with torch.no_grad():
        ours = held(ids).logits
    assert weight_bytes(held) == before and before["quantized_bytes"] > 0
    assert held.get_submodule(LAYERS[0]).weight.dtype == torch.float8_e4m3fn
    plain = AutoModelForCausalLM.from_pretrained(str(fp8_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = plain(ids).logits
    assert plain.get_submodule(LAYERS[0]).weight.dtype == torch.float32  # decompressed: dense
    assert torch.equal(ours, theirs)


def test_fp8_fidelity_sits_between_rtn_w8_and_rtn_w4(tmp_path):
    """e4m3 rounds each weight to 3 mantissa bits (a step of 2^-4 of its own size) where int8 per channel has a
    uniform step of absmax/127: on near-Gaussian weights fp8's KLD is above rtn-w8's (about 10x on this model) and far
    below 4-bit RTN's. A peaked tiny model (init_std 0.1) makes the gaps visible."""
    source = build_llama_dir(tmp_path / "src", init_std=0.1)
    ids = torch.randint(3, 81, (4, 64), generator=torch.Generator().manual_seed(0))  # the tiny vocabulary: 81
    logp = {}
    for name in ("fp", "fp8", "rtn-w8", "rtn-w4-g32"):
        path = source if name == "fp" else _quantize(name, source, tmp_path / name)
        with torch.no_grad():
            logp[name] = torch.log_softmax(load_recipe_model(str(path), parse_recipe(name), "cpu")(ids).logits.double(), -1)
        if path != source:
            shutil.rmtree(path)
    kld = {n: (logp["fp"].exp() * (logp["fp"] - lp)).sum(-1).mean().item() for n, lp in logp.items()}
    assert 0 < kld["rtn-w8"] < kld["fp8"] < kld["rtn-w4-g32"] / 4, kld


def test_sixteen_bit_activations_load_as_planned_and_as_plain_transformers(fp8_dir, tiny_dir):
    """``compute_dtype: bfloat16``: the unquantized parts and the row scales at 2 bytes, the planner's bytes exactly,
    and the logits plain transformers gives at bf16."""
    from transformers import AutoModelForCausalLM

    from quantlab.plan import PlanSettings, plan_model
    from quantlab.recipe import recipe_from_mapping

    recipe = recipe_from_mapping({"method": "fp8", "compute_dtype": "bfloat16"}, "test")
    held = load_recipe_model(str(fp8_dir), recipe, "cpu")
    (row,) = plan_model(str(tiny_dir), PlanSettings(device="cpu", recipes=(recipe,)))["recipes"]
    assert weight_bytes(held)["weights_bytes"] == row["weights_bytes"]
    ids = torch.arange(2, 34).unsqueeze(0)
    plain = AutoModelForCausalLM.from_pretrained(str(fp8_dir), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(held(ids).logits, plain(ids).logits)
