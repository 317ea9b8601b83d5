"""A fit on the tiny model: units, the planner's bytes, the GPTQ dynamic overrides, the sensitivity pass's parts,
the recipe names, and (slow) a mixed artifact that reloads, without quantlab, with the formats the allocation chose."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantlab.errors import RecipeError
from quantlab.fit.units import fixed_bytes, model_units, parse_formats, split_fused, unit_bytes
from quantlab.layouts.gptq_mixed import GptqMixedLayout, parse_format
from quantlab.methods import get_method
from quantlab.methods.fit import FitConfig, gptq_dynamic, head_settings, vllm_note
from quantlab.models.load import load_config
from quantlab.plan.shapes import model_shapes
from quantlab.plan.terms import weight_terms
from quantlab.recipe import Recipe, parse_recipe

FORMATS = ("fp", "gptq-w8", "gptq-w4-g32")


@pytest.fixture(scope="module")
def shapes(tiny_dir):
    return model_shapes(load_config(tiny_dir))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from tiny import build_qwen2_dir

    return build_qwen2_dir(tmp_path_factory.mktemp("qwen") / "q")  # untied head, qkv biases


@pytest.fixture(scope="module")
def qwen_shapes(qwen_dir):
    return model_shapes(load_config(qwen_dir))


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    """The tiny Llama with a head of its own (the tiny Qwen2's tokenizer class tokenizes nothing of a word-level
    vocabulary)."""
    from tiny import build_llama_dir

    return build_llama_dir(tmp_path_factory.mktemp("untied") / "llama", tied=False)


def test_units_are_blocks_or_linears(shapes):
    blocks, linears = model_units(shapes, "block"), model_units(shapes, "linear")
    assert [u.name for u in blocks] == ["model.layers.0", "model.layers.1"]
    assert len(linears) == 14 and {u.block for u in linears} == {0, 1}
    assert sum(len(u.modules) for u in blocks) == len(linears)


@pytest.mark.parametrize("granularity", ["block", "fused", "linear"])
def test_fixed_plus_units_is_the_planners_bytes_of_the_allocation(shapes, granularity):
    units = model_units(shapes, granularity)
    rng = random.Random(0)
    for _ in range(5):
        alloc = tuple((u.name, rng.choice(FORMATS)) for u in units)
        planned = sum(weight_terms(GptqMixedLayout(alloc), shapes, "cpu").values())
        summed = fixed_bytes(units, shapes, "cpu") + sum(unit_bytes(u, f, shapes, "cpu") for u, (_, f) in
                                                         zip(units, alloc))
        assert summed == planned


def test_an_untied_head_is_a_unit_after_every_block_and_a_tied_one_is_not(shapes, qwen_shapes):
    assert "lm_head" not in {u.name for u in model_units(shapes, "linear")}  # tied to the embedding
    for granularity in ("block", "fused", "linear"):
        head = model_units(qwen_shapes, granularity)[-1]
        assert (head.name, head.block) == ("lm_head", qwen_shapes.layers)
        assert head.modules == (("lm_head", qwen_shapes.head.out_features, qwen_shapes.head.in_features),)


@pytest.mark.parametrize("granularity", ["block", "fused", "linear"])
def test_with_the_head_a_unit_fixed_plus_units_is_still_the_planners_bytes(qwen_shapes, granularity):
    units = model_units(qwen_shapes, granularity)
    fp_head = sum(weight_terms(GptqMixedLayout(()), qwen_shapes, "cpu").values())
    for fmt in FORMATS:  # the head alone in each format, then random mixes
        alloc = tuple((u.name, fmt if u.name == "lm_head" else "fp") for u in units)
        planned = weight_terms(GptqMixedLayout(alloc), qwen_shapes, "cpu")
        assert (planned["lm_head"] < qwen_shapes.head.weights * 2) == (fmt != "fp")
        assert (sum(planned.values()) < fp_head) == (fmt != "fp")
    rng = random.Random(1)
    for _ in range(5):
        alloc = tuple((u.name, rng.choice(FORMATS)) for u in units)
        planned = sum(weight_terms(GptqMixedLayout(alloc), qwen_shapes, "cpu").values())
        assert planned == fixed_bytes(units, qwen_shapes, "cpu") + sum(
            unit_bytes(u, f, qwen_shapes, "cpu") for u, (_, f) in zip(units, alloc))


def test_a_quantized_head_is_gptqmodels_lm_head_with_its_own_settings_and_an_fp_one_no_rule():
    per_module = {"m.layers.0.a": "gptq-w4-g32", "lm_head": "gptq-w8"}
    base, dynamic = gptq_dynamic(per_module)
    s = head_settings(per_module, dynamic)
    assert s["lm_head"] is True
    assert s["dynamic"][r"+:^lm_head$"] == {"bits": 8, "group_size": -1, "mse": 0.0, "act_group_aware": False,
                                            "sym": True, "desc_act": False}
    fp = head_settings({**per_module, "lm_head": "fp"}, gptq_dynamic({**per_module, "lm_head": "fp"})[1])
    assert fp == {"lm_head": False, "dynamic": {}}


@pytest.mark.parametrize("granularity", ["block", "fused", "linear"])
def test_a_unit_in_fewer_bits_has_fewer_bytes(shapes, granularity):
    for u in model_units(shapes, granularity)[:4]:  # fused: qkv_proj, o_proj, gate_up_proj, down_proj
        sizes = [unit_bytes(u, f, shapes, "cpu") for f in ("fp", "gptq-w8", "gptq-w4-g32")]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3, u.name


def test_dynamic_overrides_name_every_module_off_the_base_format():
    per_module = {"m.layers.0.a": "gptq-w4-g64", "m.layers.0.b": "gptq-w4-g64", "m.layers.1.a": "gptq-w8",
                  "m.layers.1.b": "fp"}
    base, dynamic = gptq_dynamic(per_module)
    assert (base.bits, base.group_size) == (4, 64)
    assert dynamic == {r"+:^m\.layers\.1\.a$": {"bits": 8, "group_size": -1, "mse": 0.0, "act_group_aware": False},
                       r"-:^m\.layers\.1\.b$": {}}
    with pytest.raises(RecipeError, match="every module unquantized"):
        gptq_dynamic({"a": "fp"})


def test_dynamic_rules_name_each_fused_projection_so_gptqmodel_and_vllm_both_apply_them():
    import re

    from gptqmodel.quantization.config import dynamic_get

    attn, mlp = "model.layers.3.self_attn", "model.layers.3.mlp"
    per_module = {f"{attn}.{p}_proj": "gptq-w4-g64" for p in "qkv"} | {f"{attn}.o_proj": "gptq-w8"}
    per_module |= {f"{mlp}.gate_proj": "fp", f"{mlp}.up_proj": "fp", f"{mlp}.down_proj": "gptq-w8"}
    per_module |= {f"model.layers.{i}.self_attn.q_proj": "gptq-w8" for i in range(4, 9)}
    base, dynamic = gptq_dynamic(per_module)
    assert base.name == "gptq-w8"
    assert list(dynamic) == [r"+:^model\.layers\.3\.self_attn\.(?:q_proj|k_proj|v_proj|qkv_proj)$",
                             r"-:^model\.layers\.3\.mlp\.(?:gate_proj|up_proj|gate_up_proj)$"]
    for name, fmt in per_module.items():  # GPTQModel's own resolution, linear by linear
        got = dynamic_get(dynamic, name)
        assert (got is False) if fmt == "fp" else (got is None if fmt == "gptq-w8" else got["bits"] == 4)
    vllm = {f"{attn}.qkv_proj": "+", f"{mlp}.gate_up_proj": "-", f"{attn}.o_proj": None, f"{mlp}.down_proj": None}
    for layer, kind in vllm.items():  # vLLM's: re.match of each rule on the fused layer's name, first match wins
        hit = next((k[0] for k in dynamic if re.match(k[2:], layer)), None)
        assert hit == kind
    assert vllm_note(per_module).startswith("vLLM's GPTQ path")
    per_module[f"{attn}.k_proj"] = "gptq-w8"  # q, v in 4 bits, k in 8: vLLM cannot build that qkv_proj
    _, dynamic = gptq_dynamic(per_module)
    assert r"+:^model\.layers\.3\.self_attn\.q_proj$" in dynamic and not any("qkv" in k for k in dynamic)
    assert split_fused(per_module) == [f"{attn}.qkv_proj"]
    assert vllm_note(per_module).startswith("not loadable by vLLM: 1 fused projection(s)")


def test_fused_units_are_the_projections_vllm_runs_as_one_matmul(untied_dir):
    shapes = model_shapes(load_config(untied_dir))
    names = [u.name for u in model_units(shapes, "fused")]
    assert names[:4] == ["model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
                         "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"] and names[-1] == "lm_head"
    units = model_units(shapes, "fused")
    assert [m[0] for m in units[0].modules] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert len(names) == 4 * shapes.layers + 1
    linear = model_units(shapes, "linear")
    assert sorted(m for u in units for m in u.modules) == sorted(m for u in linear for m in u.modules)


def test_fit_recipe_names_round_trip():
    r = parse_recipe("fit-180MiB")
    assert r.config.weights_budget == 180 * 2**20 and r.name == "fit-180MiB"
    g = parse_recipe("fit-gpu32GB-c8192-b2")
    assert (g.config.gpu_mem, g.config.context, g.config.batch) == (32 * 10**9, 8192, 2)
    resolved = Recipe(r.name, "fit", FitConfig(weights_budget=1000, allocation=(("u", "gptq-w8"),)))
    assert Recipe.from_dict(json.loads(json.dumps(resolved.to_dict()))) == resolved
    assert resolved.bits == 8 and r.bits == 4
    assert r.config.dtype == "float16"  # held as vLLM runs GPTQ; -bf16 names the other
    b = parse_recipe("fit-gpu32GB-c8192-b2-bf16")
    assert b.config.dtype == "bfloat16" and b.name == get_method("fit").short_name(b.config) == "fit-gpu32GB-c8192-b2-bf16"
    assert get_method("fit").layout(b.config).dtype == "bfloat16"


@pytest.mark.parametrize("bad, message", [("fit-180", "Invalid recipe"), ("fit-10MiB-c5", "Invalid recipe"),
                                          ("fit-10MiB-fp32", "Invalid recipe")])
def test_bad_fit_names_are_explained(bad, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(bad)


def test_bad_fit_configs_name_the_fix():
    with pytest.raises(RecipeError, match="one budget"):
        FitConfig()
    with pytest.raises(RecipeError, match="fit dtype must be one of float16, bfloat16"):
        FitConfig(weights_budget=10, dtype="float32")
    with pytest.raises(RecipeError, match="Unknown fit format"):
        FitConfig(weights_budget=10, formats=("fp", "gptq-w3"))
    with pytest.raises(RecipeError, match="two distinct formats"):
        parse_formats(["gptq-w8"])
    assert parse_format("gptq-w4-g128").group_size == 128


def test_unpacked_gptq_weights_are_what_the_loaded_kernel_computes(gptq_artifacts):
    import torch

    from quantlab.fit.sensitivity import gptq_weights
    from quantlab.layerwise.weights import CheckpointReader
    from quantlab.layouts.loading import load_recipe_model

    for bits, (path, _, recipe) in gptq_artifacts.items():
        model = load_recipe_model(str(path), recipe, "cpu")
        names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
        for name, w in gptq_weights(CheckpointReader(path), names, bits).items():
            x = torch.randn(4, w.shape[1])
            with torch.inference_mode():
                y = model.get_submodule(name)(x).float()
            # the kernels compute in bf16 or fp16 on CPU: a relative error of a few 1e-3; a wrong unpack is O(1)
            assert (y - x @ w.T).abs().max() <= 2e-2 * y.abs().max()


def test_forwards_started_mid_way_are_the_whole_forward(tiny_model):
    import torch

    from quantlab.fit.sensitivity import Prefixes

    ids = torch.randint(3, tiny_model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    prefixes = Prefixes(tiny_model, ids, batch_size=2)
    assert prefixes.midway and prefixes.batches() == 2
    whole = prefixes.log_probs(0, 1)
    for block in (1, 2):  # 2: only the final norm and head
        assert torch.allclose(prefixes.log_probs(block, 1), whole, atol=1e-5)


RELOAD = """
import json, sys, torch
from gptqmodel import BACKEND, GPTQModel
model = GPTQModel.load(sys.argv[1], device="cpu", dtype=getattr(torch, sys.argv[2]), backend=BACKEND.TORCH).model
out = {"(embedding dtype)": str(model.get_input_embeddings().weight.dtype)}
for name, m in model.named_modules():
    if hasattr(m, "qweight"):
        group = m.group_size if m.group_size != m.in_features else -1
        out[name] = f"gptq-w{m.bits}" + (f"-g{group}" if group > 0 else "")
    elif type(m).__name__ == "Linear":
        out[name] = "fp"
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_mixed_artifact_reloads_with_the_chosen_formats_and_bytes(tiny_dir, gptq_calib, shapes):
    from quantlab.measure.memory import weight_bytes
    from quantlab.layouts.loading import load_recipe_model
    from quantlab.models.source import resolve_model
    from quantlab.recipe import recipe_from_mapping
    from quantlab.steps.fit import ensure_recipe_artifact

    recipe = recipe_from_mapping({"method": "fit", "weights_budget": 150_000, "formats": list(FORMATS),
                                  "units": "fused", "calibration": str(gptq_calib), "samples": 16, "tokens": 64,
                                  "sensitivity_chunks": 2}, "test")
    art = ensure_recipe_artifact(resolve_model(str(tiny_dir)), recipe, "cpu", 1)
    chosen = art["recipe"].config.module_formats(shapes)
    assert len(set(chosen.values())) >= 2  # a real mix
    reloaded = subprocess.run([sys.executable, "-c", RELOAD, art["artifact"], recipe.config.dtype],
                              capture_output=True, text=True, check=True)
    assert json.loads(reloaded.stdout.strip().splitlines()[-1]) == {"(embedding dtype)": "torch.float16",
                                                                     "lm_head": "fp", **chosen}  # tied: no unit
    measured = weight_bytes(load_recipe_model(art["artifact"], art["recipe"], "cpu"))["weights_bytes"]
    assert measured == art["fit"]["predicted_bytes"] <= 150_000
    manifest = json.loads(open(f"{art['artifact']}/quantlab.json").read())
    assert manifest["method_notes"]["module_formats"] == chosen and "dtype=torch.float16" in manifest["method_notes"]["loader"]
    rules = json.loads(open(f"{art['artifact']}/config.json").read())["quantization_config"]["dynamic"]
    assert rules and all(r.endswith(("qkv_proj)$", "gate_up_proj)$", "o_proj$", "down_proj$")) for r in rules)
    assert manifest["method_notes"]["vllm"].startswith("vLLM's GPTQ path")  # fused units: no projection split

    # each format's column is cached on its own: a table of fewer formats reuses it, its artifact no longer needed
    from quantlab.steps.fit import ensure_sensitivity

    table = json.loads(open(art["fit"]["sensitivity_table"]).read())
    for path in table["artifacts"].values():
        shutil.rmtree(path)  # the test's own cache (QUANTLAB_HOME is a temp dir)
    fewer = dataclasses.replace(recipe.config, formats=("fp", "gptq-w8"))
    again = ensure_sensitivity(resolve_model(str(tiny_dir)), fewer, "cpu", 1)
    assert again["columns"] == {"gptq-w8": table["columns"]["gptq-w8"]} and again["formats"] == ["fp", "gptq-w8"]
    assert again["kld"] == {u: {f: row[f] for f in ("fp", "gptq-w8")} for u, row in table["kld"].items()}
    assert not any(Path(p).exists() for p in table["artifacts"].values())


@pytest.mark.slow
def test_an_untied_head_is_measured_from_its_head_only_artifact_quantized_and_reloaded(untied_dir, gptq_calib):
    from quantlab.measure.memory import weight_bytes
    from quantlab.layouts.loading import load_recipe_model
    from quantlab.models.source import resolve_model
    from quantlab.recipe import recipe_from_mapping
    from quantlab.steps.fit import ensure_recipe_artifact

    shapes = model_shapes(load_config(untied_dir))
    units = model_units(shapes, "linear")
    size = {f: {u.name: unit_bytes(u, f, shapes, "cpu") for u in units} for f in ("fp", "gptq-w4-g32")}
    fixed = fixed_bytes(units, shapes, "cpu")
    # one byte short of the head fp with every other unit at its smallest: the head must be quantized
    budget = fixed + size["fp"]["lm_head"] + sum(v for k, v in size["gptq-w4-g32"].items() if k != "lm_head") - 1
    recipe = recipe_from_mapping({"method": "fit", "weights_budget": budget, "formats": list(FORMATS),
                                  "units": "fused", "calibration": str(gptq_calib), "samples": 16, "tokens": 64,
                                  "sensitivity_chunks": 2}, "test")
    art = ensure_recipe_artifact(resolve_model(str(untied_dir)), recipe, "cpu", 1)
    chosen = art["recipe"].config.module_formats(shapes)
    assert chosen["lm_head"] != "fp" and len(set(chosen.values())) >= 2
    reloaded = subprocess.run([sys.executable, "-c", RELOAD, art["artifact"], "float16"], capture_output=True,
                              text=True, check=True)
    assert json.loads(reloaded.stdout.strip().splitlines()[-1]) == {"(embedding dtype)": "torch.float16", **chosen}
    measured = weight_bytes(load_recipe_model(art["artifact"], art["recipe"], "cpu"))["weights_bytes"]
    assert measured == art["fit"]["predicted_bytes"] <= budget

    table = json.loads(open(art["fit"]["sensitivity_table"]).read())
    for fmt in ("gptq-w8", "gptq-w4-g32"):  # each format's head-only GPTQ run: the head in fmt, every linear fp
        head_only = json.loads(open(f"{table['head_artifacts'][fmt]}/quantlab.json").read())["method_notes"]
        assert {k: v for k, v in head_only["module_formats"].items() if v != "fp"} == {"lm_head": fmt}
        assert table["kld"]["lm_head"][fmt] > 0 and table["cost"]["head_runs_wall_s"][fmt] > 0
    assert table["kld"]["lm_head"]["gptq-w4-g32"] > table["kld"]["lm_head"]["gptq-w8"]


def test_a_fits_formats_list_is_one_parameter_and_a_list_of_lists_a_grid():
    from quantlab.recipe import expand_recipes

    recipes = expand_recipes([{"method": "fit", "weights_budget": [150000, 200000], "formats": list(FORMATS)},
                              {"method": "fit", "weights_budget": 150000,
                               "formats": [["fp", "gptq-w8"], ["fp", "gptq-w4-g32"]]}], "test")
    assert [r.config.formats for r in recipes] == [FORMATS, FORMATS, ("fp", "gptq-w8"), ("fp", "gptq-w4-g32")]
    assert [r.name for r in recipes][:2] == ["fit-150000B", "fit-200000B"]
    assert len({r.name for r in recipes}) == 4
    assert FitConfig(weights_budget=10, formats="fp, gptq-w8").formats == ("fp", "gptq-w8")


@pytest.mark.parametrize("args, message", [
    ([], "Give one budget"),
    (["--weights-budget", "1MB", "--gpu-mem", "32GB"], "Give one budget"),
    (["--weights-budget", "1MB", "--formats", "fp,gptq-w3"], "Unknown fit format 'gptq-w3'"),
    (["--weights-budget", "1MB", "--formats", "fp,gptq-w4-g128"], "group size 128 does not divide"),
    (["--weights-budget", "1000B", "--formats", "fp,gptq-w4-g32"], "the smallest that can be met is {least} bytes"),
])
def test_quantlab_fit_refuses_bad_input_in_one_line(tiny_dir, shapes, args, message):
    from click.testing import CliRunner

    from quantlab.cli import cli

    units = model_units(shapes, "block")
    least = fixed_bytes(units, shapes, "cpu") + sum(unit_bytes(u, "gptq-w4-g32", shapes, "cpu") for u in units)
    message = message.format(least=least)
    result = CliRunner().invoke(cli, ["fit", str(tiny_dir), *args], obj={})
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_quantlab_fit_builds_measures_and_answers_within_the_budget(tiny_dir, tiny_text, shapes):
    from click.testing import CliRunner

    from quantlab.cli import cli

    units = model_units(shapes, "fused")
    fp, w4 = (fixed_bytes(units, shapes, "cpu") + sum(unit_bytes(u, f, shapes, "cpu") for u in units)
              for f in ("fp", "gptq-w4-g32"))
    args = ["fit", str(tiny_dir), "--weights-budget", f"{(fp + w4) // 2}B", "--formats", "fp,gptq-w4-g32",
            "--units", "fused", "--text", str(tiny_text)]
    result = CliRunner().invoke(cli, [*args, "--json"], obj={})
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # stdout alone: progress goes to stderr
    assert out["measured_bytes"] == out["fit"]["predicted_bytes"] <= (fp + w4) // 2
    assert set(out["fit"]["unit_formats"].values()) == {"fp", "gptq-w4-g32"}  # halfway: a real mix
    assert out["vllm"].startswith("vLLM's GPTQ path") and out["fidelity"]["kld_mean"] > 0
    text = CliRunner().invoke(cli, args, obj={})  # built once: the answer again, from the cache
    assert text.exit_code == 0 and f"measured {out['measured_bytes']:,} (within the budget" in text.stdout
    assert "vllm: vLLM's GPTQ path" in text.stdout and "load: from gptqmodel import" in text.stdout


def test_a_gpu_budget_leaves_the_weights_what_quantlab_plan_does_not_give_the_rest(tiny_dir, shapes):
    from quantlab.plan import PlanSettings, plan_model
    from quantlab.steps.fit import fit_budget

    config = FitConfig(gpu_mem=10**9, context=512, batch=2)
    row = plan_model(str(tiny_dir), PlanSettings(gpu_mem=10**9, context=512, batch=2, device="cuda",
                                                 recipes=(parse_recipe("gptq-w4-g32"),)))["recipes"][0]
    rest = sum(row["components"][k] for k in ("kv_cache", "activations", "runtime"))
    assert fit_budget(config, shapes, "cuda") == 10**9 - rest
    assert fit_budget(FitConfig(weights_budget=12345), shapes, "cuda") == 12345


def _column(fmt: str, klds: dict, wall: float, peak) -> dict:
    return {"formats": [fmt], "units": [{"name": u} for u in klds], "granularity": "block",
            "text": {"windows": 2}, "versions": {}, "definitions": {}, "midway_forwards": True,
            "kld_per_window": {u: {fmt: v} for u, v in klds.items()}, "artifacts": {fmt: f"/a/{fmt}"},
            "artifact_costs": {fmt: {"quantize_wall_s": 100 * wall}},
            "path": f"/c/{fmt}/table.json",
            "cost": {"quantize_wall_s": wall, "quantize_cpu_s": 2 * wall, "forwards_wall_s": wall / 2,
                     "quantize_peak_rss_bytes": peak}}


def test_columns_join_into_one_table_in_format_order_fp_zero_costs_summed():
    from quantlab.steps.fit import joined_table

    w4 = _column("gptq-w4-g32", {"b0": [0.2, 0.4], "b1": [0.1, 0.1]}, 10.0, 500)
    w8 = _column("gptq-w8", {"b0": [0.02, 0.04], "b1": [0.0, 0.02]}, 6.0, 700)
    table = joined_table(["fp", "gptq-w8", "gptq-w4-g32"], [w4, w8])
    assert table["formats"] == ["fp", "gptq-w8", "gptq-w4-g32"]
    assert table["kld"]["b0"] == pytest.approx({"fp": 0.0, "gptq-w8": 0.03, "gptq-w4-g32": 0.3})
    assert table["kld_per_window"]["b1"]["fp"] == [0.0, 0.0]
    assert table["cost"]["quantize_wall_s"] == 16.0 and table["cost"]["quantize_peak_rss_bytes"] == 700
    assert table["cost"]["gptq_runs_wall_s"] == {"gptq-w4-g32": 1000.0, "gptq-w8": 600.0}
    assert table["artifacts"] == {"gptq-w4-g32": "/a/gptq-w4-g32", "gptq-w8": "/a/gptq-w8"}
    assert table["columns"] == {"gptq-w4-g32": "/c/gptq-w4-g32/table.json", "gptq-w8": "/c/gptq-w8/table.json"}


def test_a_module_parked_on_disk_under_two_accelerate_hooks_is_moved_back():
    """What a quantized head's calibration meets in GPTQModel 7.6: the final norm offloaded under a SequentialHook,
    which its ``move_to`` refuses; ``restore_sequential_offload`` brings the weights back."""
    import torch
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from gptqmodel.utils.model import move_to
    from gptqmodel.utils.torch import CPU

    from quantlab.methods.gptqmodel_runner import restore_sequential_offload

    norm = torch.nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    kept = {k: v.clone() for k, v in norm.state_dict().items()}
    add_hook_to_module(norm, AlignDevicesHook(execution_device=CPU))
    add_hook_to_module(norm, AlignDevicesHook(execution_device=CPU, offload=True, weights_map=dict(kept)), append=True)
    assert norm.weight.is_meta
    with pytest.raises(NotImplementedError, match="without offload hooks"):
        move_to(norm, CPU)

    class Model:  # GPTQModel's post_quantize on a CPU run moves the module to the CPU
        def post_quantize(self, module):
            return move_to(module, CPU)

    model = Model()
    restore_sequential_offload(model)
    restored = model.post_quantize(norm)
    assert not restored.weight.is_meta and torch.equal(restored.weight, kept["weight"])
    plain = torch.nn.Linear(2, 2)
    assert model.post_quantize(plain) is plain  # every other module: GPTQModel's own path


def test_a_resolved_fits_quantize_plan_keeps_its_fp_linears_and_solves_a_quantized_head(qwen_shapes):
    from quantlab.plan.steps import plan_quantize, step_peak

    units = model_units(qwen_shapes, "linear")
    base = FitConfig(weights_budget=10**9, formats=FORMATS, units="linear")
    unresolved = plan_quantize(Recipe("fit", "fit", base), qwen_shapes, "cpu", None).components
    quantized = dataclasses.replace(base, allocation=tuple((u.name, "fp" if u.name == "lm_head" else "gptq-w8")
                                                           for u in units))
    assert plan_quantize(Recipe("fit", "fit", quantized), qwen_shapes, "cpu", None).components == {
        **unresolved, "fp linears, kept once read": 0}
    fp_first = {units[0].name}
    mixed = dataclasses.replace(base, allocation=tuple(
        (u.name, "fp" if u.name in fp_first else "gptq-w4-g32") for u in units))
    comp = plan_quantize(Recipe("fit", "fit", mixed), qwen_shapes, "cpu", None).components
    first = next(lin for lin in qwen_shapes.linears if lin.name == units[0].name)
    assert comp["fp linears, kept once read"] == first.weights * 4
    head = qwen_shapes.head
    solve = (3 * head.weights + head.out_features * max(head.in_features - 128, 0)) * 4  # 4-bit: the clipping search's
    assert comp["head: its clipping search or solve, the larger (fp32)"] == max(solve, 5 * head.weights * 4)
    eight = dataclasses.replace(mixed, allocation=tuple((n, "gptq-w8" if f != "fp" else f) for n, f in mixed.allocation))
    assert plan_quantize(Recipe("fit", "fit", eight), qwen_shapes, "cpu", None).components[
        "head: its clipping search or solve, the larger (fp32)"] == solve  # 8 bits: no clipping search (mse 0)
    assert step_peak(comp) > step_peak(unresolved)


def test_quantlab_fits_answer_names_the_units_off_the_most_common_format():
    from quantlab.table import render_fit

    formats = {f"model.layers.{i}": "gptq-w4-g64" for i in range(20)}
    formats |= {"model.layers.2": "gptq-w8", "lm_head": "fp"} | {f"model.layers.{i}": "gptq-w8" for i in range(5, 19)}
    result = {"recipe": "fit-1GB", "fit": {"unit_formats": formats, "units_per_format": {}, "budget_bytes": 10,
                                          "predicted_bytes": 9, "predicted_kld": 0.1},
              "fidelity": {"kld_mean": 0.1, "ci95": {"kld_mean": [0.09, 0.11]}}, "measured_bytes": 9,
              "text": {"name": "t"}, "loader": "GPTQModel.load", "artifact": "/a"}
    lines = render_fit(result).splitlines()
    assert lines[1] == "units not in gptq-w8:"  # 15 blocks in gptq-w8, 5 in gptq-w4-g64
    assert lines[2] == "  gptq-w4-g64: model.layers.0, model.layers.1, model.layers.3, model.layers.4, model.layers.19"
    assert lines[3] == "  fp: lm_head"
    many = {f"u{i}": "gptq-w8" if i % 2 else "fp" for i in range(41)}  # fp 21, gptq-w8 20
    line = render_fit({**result, "fit": {**result["fit"], "unit_formats": many}}).splitlines()[2]
    assert line.startswith("  gptq-w8: u1, u3,")
    assert line.endswith("… 8 more (the artifact's quantlab.json lists every unit)")
