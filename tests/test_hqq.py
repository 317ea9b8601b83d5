"""HQQ on tiny models: names and checks, fidelity against RTN at the same bits and group, bytes with hqq's scales.

The reload in a fresh process without quantlab, and the planner's bytes on the default tiny model, are the method
contract's (tests/test_methods.py)."""

import pytest
import torch
from tiny import build_llama_dir

from quantlab.errors import RecipeError
from quantlab.methods import get_method
from quantlab.recipe import parse_recipe, recipe_from_mapping


@pytest.fixture(scope="module")
def peaked_dir(tmp_path_factory):
    """A tiny Llama with peaked next-token distributions, so that 4-bit error shows in the KLD."""
    return build_llama_dir(tmp_path_factory.mktemp("peaked") / "llama", init_std=0.1)


def _quantize(name, source, tmp_path_factory):
    from quantlab.layouts.loading import load_recipe_model

    recipe = parse_recipe(name)
    out = tmp_path_factory.mktemp(name)
    get_method("hqq").quantize(recipe.config, source, out, "cpu")
    return load_recipe_model(str(out), recipe, "cpu")


def test_short_names_and_settings():
    config = parse_recipe("hqq-w4-g32").config
    assert (config.bits, config.group_size, config.iters) == (4, 32, 5)
    assert recipe_from_mapping({"method": "hqq", "iters": 20}, "test").config.iters == 20
    with pytest.raises(RecipeError, match="bits must be 8 or 4"):
        parse_recipe("hqq-w3-g64")
    with pytest.raises(RecipeError, match="group_size must be one of"):
        parse_recipe("hqq-w4-g48")
    with pytest.raises(RecipeError, match="iters must be in"):
        recipe_from_mapping({"method": "hqq", "iters": 0}, "test")
    with pytest.raises(RecipeError, match="name one: hqq-w4-g64"):
        parse_recipe("hqq-w4")


def test_layers_that_do_not_group_or_pack_are_refused():
    method = get_method("hqq")
    with pytest.raises(RecipeError, match="does not divide in-features \\[576\\]"):
        method.check_model(parse_recipe("hqq-w4-g128").config, {"q": (576, 576)})
    with pytest.raises(RecipeError, match="odd number of groups"):  # 3 rows x 1 group: the nibbles cannot pair up
        method.check_model(parse_recipe("hqq-w4-g64").config, {"k": (3, 64)})
    method.check_model(parse_recipe("hqq-w8-g64").config, {"k": (3, 64)})  # 8 bits: one code per byte


@pytest.mark.parametrize("bits, group", [(4, 64), (4, 32), (8, 64)])
def test_kld_is_at_most_rtn_at_the_same_bits_and_group(bits, group, peaked_dir, tiny_text, tmp_path_factory):
    """HQQ starts from the asymmetric min/max grid of RTN and moves each zero to lower the weight error: on the
    model's outputs it must not lose to RTN, symmetric or asymmetric (measured: w4-g64 KLD 0.0224 against RTN
    0.0259 asymmetric, 0.0372 symmetric)."""
    from transformers import AutoModelForCausalLM

    import quantlab.evaluate.fidelity as fid
    from quantlab.methods.rtn import fake_quantize
    from quantlab.models.load import load_tokenizer

    settings = fid.FidelitySettings(chunk_tokens=32, max_chunks=8, bootstrap=100)
    ids = fid.chunk_ids(load_tokenizer(peaked_dir), tiny_text.read_text(), settings)
    cache = tmp_path_factory.mktemp("baseline")
    fid.baseline_cache(AutoModelForCausalLM.from_pretrained(peaked_dir).eval(), ids, cache, settings)
    baseline = fid.load_baseline(cache)[0]

    def kld(model):
        return fid.summarize(fid.compare(model, ids, baseline), settings)["kld_mean"]

    hqq = kld(_quantize(f"hqq-w{bits}-g{group}", peaked_dir, tmp_path_factory))
    for symmetric in (True, False):
        rtn = AutoModelForCausalLM.from_pretrained(peaked_dir).eval()
        with torch.no_grad():
            for module in rtn.model.layers.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(fake_quantize(module.weight, bits, group, symmetric))
        assert 0 < hqq <= kld(rtn), (symmetric, hqq)


def test_loaded_bytes_count_the_scales_hqq_keeps_outside_its_parameters(tmp_path_factory):
    """An untied head (saved, unlike a tied one) and every HQQLinear's scale and zero, held in its ``meta`` dict, are
    in the bytes as loaded, which equal the planner's."""
    from quantlab.layouts.hqq import HqqLayout
    from quantlab.measure.memory import weight_bytes
    from quantlab.plan import PlanSettings, plan_model

    source = build_llama_dir(tmp_path_factory.mktemp("untied") / "llama", tied=False)
    model = _quantize("hqq-w4-g64", source, tmp_path_factory)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    linears = [m for m in model.modules() if hasattr(m, "W_q")]
    assert len(linears) == 14  # 2 layers x 7; the head stays unquantized
    layout = HqqLayout(4, 64)
    expected = sum(sum(layout.linear_bytes(m.out_features, m.in_features, "cpu").values()) for m in linears)
    in_parameters = sum(m.W_q.numel() for m in linears)
    measured = weight_bytes(model)
    assert measured["quantized_bytes"] == expected > in_parameters
    (row,) = plan_model(str(source), PlanSettings(device="cpu", recipes=(parse_recipe("hqq-w4-g64"),)))["recipes"]
    assert row["weights_bytes"] == measured["weights_bytes"]


def test_proximal_iterations_are_capped_only_inside_the_block():
    from hqq.core.quantize import Quantizer

    from quantlab.methods.hqq import proximal_iterations

    default = Quantizer.optimize_weights
    with proximal_iterations(3):
        assert Quantizer.optimize_weights.keywords["opt_params"]["iters"] == 3
    assert Quantizer.optimize_weights is default


def test_a_sharded_artifact_reloads_with_the_same_logits(tiny_dir, tmp_path):
    """A larger model's ``save_pretrained`` writes shards and an index: the standalone loader reads them all and ties
    the head again."""
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    from quantlab.layouts.hqq import load_hqq_safetensors

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=4, group_size=32, axis=1),
                                  compute_dtype=torch.float32, device="cpu")
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ids = torch.arange(2, 34).unsqueeze(0)
    reloaded = load_hqq_safetensors(str(tmp_path))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_the_solver_in_blocks_gives_the_whole_tensor_s_solve():
    """Every step of hqq's proximal solver is per element or per group, so solving blocks of groups gives the whole
    tensor's codes, scales and zeros (while no block stops early, as here: five iterations that all lower the error)."""
    from hqq.core.optimize import optimize_weights_proximal_legacy

    from quantlab.methods.hqq import _PROXIMAL, SOLVER_BLOCK_GROUPS, solve_in_blocks

    torch.manual_seed(0)
    w = (torch.randn(2 * SOLVER_BLOCK_GROUPS + 100, 64) * 0.02)
    lo, hi = w.min(1, keepdim=True)[0], w.max(1, keepdim=True)[0]
    scale = 15 / (hi - lo)
    args = dict(tensor=w, scale=scale, zero=-lo * scale, min_max=[0, 15], axis=1, device="cpu")
    settings = {**_PROXIMAL, "iters": 5}
    whole = optimize_weights_proximal_legacy(**args, opt_params=settings)
    blocks = solve_in_blocks(**args, opt_params=settings)
    assert all(torch.equal(a, b) for a, b in zip(whole, blocks))
