"""The fit planner: every memory term against hand-worked numbers, the issue's fit questions, the CLI."""

import json

import pytest
from click.testing import CliRunner

from quantlab.cli import cli
from quantlab.errors import UsageError
from quantlab.methods import get_method
from quantlab.plan import GB, PlanSettings, parse_size, plan_model, terms
from quantlab.recipe import parse_recipe, parse_recipe_list


def _shapes(ref):
    from quantlab.plan.known import resolve_config
    from quantlab.plan.shapes import model_shapes

    return model_shapes(resolve_config(ref)[0])


def test_parse_size():
    assert parse_size("32GB") == 32 * 10**9
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("80") == 80 * 10**9
    assert parse_size("512 MiB") == 512 * 2**20
    with pytest.raises(UsageError, match="not a memory size"):
        parse_size("lots")


# SmolLM2's down_proj (out 576, in 1536); the measured bytes of each layout were read off loaded artifacts.
@pytest.mark.parametrize("recipe,data,scales", [
    ("bnb-int8", 576 * 1536, 576 * 4),  # int8 + fp32 SCB per row: 887,040 measured
    ("bnb-nf4", 576 * 1536 // 2, 576 * 1536 // 64 * 4 + 16 * 4),  # 497,728 measured
    ("bnb-nf4-dq", 576 * 1536 // 2, 13824 + 54 * 4 + 256 * 4 + 4 + 16 * 4),  # 13,824 blocks -> 54 nested blocks
    ("rtn-w8", 576 * 1536, 576 * (4 + 1)),  # 887,616 measured: one fp32 scale and int8 zero per row
    ("torchao-w4-g32", 576 * 1536, 576 * 48 * (4 + 1)),  # 1,022,976 measured
    ("gptq-w4-g64", 1536 * 576 // 2, 24 * 576 * 2 + 24 * 576 // 2 + 1536 * 4 + 2 * 8 * 4),  # 483,136 measured
    ("gptq-w8", 1536 * 576, 1 * 576 * 2 + 1 * 576 + 1536 * 4 + 2 * 4 * 4),
    ("fp", 576 * 1536 * 4, 0),
])
def test_linear_layouts_on_cpu(recipe, data, scales):
    r = parse_recipe(recipe)
    got = get_method(r.method).layout(r.config).linear_bytes(576, 1536, "cpu")
    assert got == {"data": data, "scales": scales}


def test_kv_cache_gqa_and_sliding_window():
    llama = _shapes("meta-llama/Llama-3.1-8B")
    assert terms.kv_cache_bytes(llama, 8192, 1, 2) == 2 * 8 * 128 * 32 * 8192 * 2 == 1_073_741_824
    gemma = _shapes("google/gemma-2-9b")
    assert (gemma.sliding_window, gemma.sliding_layers, gemma.layers) == (4096, 21, 42)
    assert terms.kv_cache_bytes(gemma, 8192, 2, 2) == 2 * 8 * 256 * (21 * 8192 + 21 * 4096) * 2 * 2
    assert terms.kv_cache_bytes(gemma, 2048, 1, 2) == 2 * 8 * 256 * 42 * 2048 * 2
    qwen = _shapes("Qwen/Qwen2.5-7B")  # its config has a window but use_sliding_window false
    assert qwen.sliding_layers == 0 and qwen.kv_heads == 4


def test_activation_term():
    llama = _shapes("Llama-3.1-8B")
    assert terms.activation_bytes(llama, 8192, 1, 2) == 8192 * (2 * 4096 + 3 * 14336) * 2 + 128256 * 4


def test_unquantized_parts_tied_biases_experts():
    small = _shapes("meta-llama/Llama-3.2-1B")
    assert small.tied and small.unquantized["lm_head"] == 0 and small.unquantized["embeddings"] == 128256 * 2048
    qwen = _shapes("Qwen/Qwen2.5-7B")
    assert qwen.unquantized["biases"] == 28 * (3584 + 512 + 512)  # q, k, v biases
    assert qwen.unquantized["lm_head"] == 152064 * 3584
    mixtral = _shapes("mistralai/Mixtral-8x7B-v0.1")
    per_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 8 * 3 * 4096 * 14336
    assert mixtral.quantized_weights == 32 * per_layer
    assert mixtral.unquantized["other"] == 32 * 8 * 4096  # routers stay unquantized


def test_llama_8b_matches_the_h200_reference_points():
    plan = plan_model("meta-llama/Llama-3.1-8B", PlanSettings(context=4096))
    rows = {r["recipe"]: r for r in plan["recipes"]}
    assert rows["fp"]["weights_bytes"] == 8_030_261_248 * 2 + 512  # bf16 + fp32 rotary tables
    for name, measured in (("bnb-nf4", 5.59e9), ("bnb-int8", 9.08e9)):
        c = rows[name]["components"]
        footprint = rows[name]["weights_bytes"] - c["linear_scales"] - c["buffers"]  # what get_memory_footprint counts
        assert abs(footprint - measured) / measured < 0.005


def test_32b_fits_only_at_4_bit_and_70b_not_at_all():
    plan = plan_model("Qwen/Qwen2.5-32B", PlanSettings(gpu_mem=32 * GB))
    fits = {r["recipe"]: r["fits"] for r in plan["recipes"] if r["applicable"]}
    assert fits and all(fits[n] == (parse_recipe(n).bits == 4) for n in fits)
    plan = plan_model("meta-llama/Llama-3.1-70B", PlanSettings(gpu_mem=32 * GB))
    assert not any(r["fits"] for r in plan["recipes"])
    advice = " ".join(plan["advice"])
    assert "Nothing fits" in advice and "bits per weight" in advice and "48 GB GPU" in advice


def test_max_context_is_the_largest_that_fits():
    from quantlab.plan import plan_recipe

    shapes = _shapes("google/gemma-2-27b")
    settings = PlanSettings(gpu_mem=32 * GB, context=4096)
    row = plan_recipe(parse_recipe("bnb-int8"), shapes, settings)
    n = row["max_context"]
    assert 0 < n < shapes.max_positions
    at = plan_recipe(parse_recipe("bnb-int8"), shapes, PlanSettings(gpu_mem=32 * GB, context=n))
    above = plan_recipe(parse_recipe("bnb-int8"), shapes, PlanSettings(gpu_mem=32 * GB, context=n + 1))
    assert at["fits"] and not above["fits"]


def test_predicted_weights_equal_the_loaded_tiny_model(tiny_dir):
    """Real loads in this process: fp, bnb 4-bit with double quant, torchao intx."""
    import torch
    from transformers import TorchAoConfig

    from quantlab.measure.memory import weight_bytes
    from quantlab.models.load import load_causal_lm

    recipes = parse_recipe_list("fp,bnb-nf4-dq,rtn-w4-g32")
    plan = {r["recipe"]: r for r in plan_model(str(tiny_dir), PlanSettings(device="cpu", recipes=tuple(recipes)))["recipes"]}
    bnb = get_method("bnb")
    loaded = {
        "fp": load_causal_lm(tiny_dir, dtype=torch.float32),
        "bnb-nf4-dq": load_causal_lm(tiny_dir, dtype=torch.float32,
                                     quantization_config=bnb.hf_config(recipes[1].config, "cpu")),
        "rtn-w4-g32": load_causal_lm(tiny_dir, dtype=torch.float32, quantization_config=TorchAoConfig(
            get_method("rtn").torchao_config(recipes[2].config))),
    }
    for name, model in loaded.items():
        assert plan[name]["weights_bytes"] == weight_bytes(model)["weights_bytes"], name


def test_recipe_that_does_not_apply_says_why(tiny_dir):
    plan = plan_model(str(tiny_dir), PlanSettings(recipes=tuple(parse_recipe_list("gptq-w4-g128"))))
    row = plan["recipes"][0]
    assert not row["applicable"] and "group size 128" in row["reason"]


def _invoke(*args):
    return CliRunner().invoke(cli, list(args), obj={})


def test_cli_plan_table_json_and_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = _invoke("plan", "meta-llama/Llama-3.1-8B", "--gpu-mem", "32GB", "--context", "8192")
    assert res.exit_code == 0, res.output
    assert "KV cache = 2 x 8 kv heads x 128 x 32 layers x 8192 tokens x batch 1 x 2 B = 1.07 GB" in res.output
    assert "quantlab's table of published configs" in res.output
    res = _invoke("plan", "Qwen2.5-32B", "--json", "--recipes", "bnb-nf4,bnb-int8")
    data = json.loads(res.output)
    assert [r["fits"] for r in data["recipes"]] == [True, False]
    res = _invoke("plan", "Lama-3.1-70B")
    assert res.exit_code == 1 and "Did you mean 'Llama-3.1-70B'?" in res.output and "Traceback" not in res.output
    res = _invoke("plan", "Llama-3.1-8B", "--gpu-mem", "lots")
    assert res.exit_code == 2 and "not a memory size" in res.output


def test_the_accuracy_step_is_planned_with_its_batch_of_logits_and_skipped_over_the_budget():
    from transformers import Qwen2Config

    from quantlab.plan.shapes import model_shapes
    from quantlab.plan.steps import ACCURACY_TOKENS, IN_MEMORY, SKIPPED, layout_weights, plan_accuracy
    from quantlab.recipe import parse_recipe

    shapes = model_shapes(Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=150000,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    hqq, gguf = parse_recipe("hqq-w4-g64"), parse_recipe("gguf-q4_k_m")
    free = plan_accuracy(hqq, shapes, "cpu", None)
    assert free.mode == IN_MEMORY and free.batch == 8
    assert free.components["logits and log-softmax"] == 2 * 8 * ACCURACY_TOKENS * shapes.vocab * 4
    budget = layout_weights(hqq, shapes, "cpu") + free.components["logits and log-softmax"] // 2
    skipped = plan_accuracy(hqq, shapes, "cpu", budget)
    assert skipped.mode == SKIPPED and "accuracy not measured" in skipped.reason
    # llama.cpp scores one request at a time (quantlab.engines.harness): a GGUF fits where transformers does not
    assert plan_accuracy(gguf, shapes, "cpu", budget).mode == IN_MEMORY
    assert plan_accuracy(gguf, shapes, "cpu", None).batch == 1


def test_under_a_budget_the_bench_leaves_out_the_batch_sizes_that_do_not_fit():
    from transformers import LlamaConfig

    from quantlab.measure.latency import LatencySettings
    from quantlab.plan.shapes import model_shapes
    from quantlab.plan.steps import IN_MEMORY, SKIPPED, bench_components, plan_bench, step_peak
    from quantlab.recipe import parse_recipe

    shapes = model_shapes(LlamaConfig(hidden_size=256, intermediate_size=2048, num_hidden_layers=2, vocab_size=32000,
                                      num_attention_heads=4, num_key_value_heads=2))
    recipe, latency = parse_recipe("rtn-w8"), LatencySettings(batch_sizes=(1, 8, 32), prompt_tokens=512)
    peak = {b: step_peak(bench_components(recipe, shapes, latency, "cpu", b)) for b in (1, 8, 32)}
    assert peak[1] < peak[8] < peak[32]
    full = plan_bench(recipe, shapes, latency, "cpu", None)
    assert (full.mode, full.batch, full.reason) == (IN_MEMORY, 32, "")
    part = plan_bench(recipe, shapes, latency, "cpu", (peak[8] + peak[32]) // 2)
    assert (part.mode, part.batch, part.peak_bytes) == (IN_MEMORY, 8, peak[8]) and "batch 32 not timed" in part.reason
    assert plan_bench(recipe, shapes, latency, "cpu", peak[1] - 1).mode == SKIPPED
