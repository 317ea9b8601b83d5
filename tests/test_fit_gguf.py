"""A fit in GGUF formats: units (the token embedding one of them), the planner's bytes of a per-tensor mix, the
tensor-type list llama.cpp's quantize is given and the file it writes (on the embedded SmolLM2: llama.cpp needs a
model loaded from a GGUF), a uniform file's weights read back in transformers' layout, and a whole fit resolved,
built and measured in llama.cpp within its budget."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantlab.errors import RecipeError
from quantlab.fit.units import EMBEDDING, fixed_bytes, model_units, parse_formats, unit_bytes
from quantlab.layouts.gguf import TENSOR_TYPE_FILE, GgufMixedLayout
from quantlab.layouts.gguf_types import gguf_name
from quantlab.methods import get_method
from quantlab.methods.fit import FitConfig
from quantlab.models.load import load_config
from quantlab.plan.shapes import model_shapes
from quantlab.plan.terms import weight_terms
from quantlab.recipe import Recipe, parse_recipe

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/setup.sh")

FORMATS = ("gguf-q4_k", "gguf-q6_k", "gguf-q8_0", "gguf-f16")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("fit-gguf-home")


@pytest.fixture(scope="module")
def smol(home):
    from quantlab.models.source import resolve_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLAB_HOME", str(home))
        return resolve_model(None)


@pytest.fixture(scope="module")
def shapes(smol):
    return model_shapes(load_config(smol.path))


def _cycled(units, formats):
    return tuple((u.name, formats[i % len(formats)]) for i, u in enumerate(units))


def test_the_embedding_is_a_unit_and_formats_are_of_one_family(shapes):
    units = model_units(shapes, "linear", embedding=True)
    assert units[0].name == EMBEDDING and units[0].modules == ((EMBEDDING, shapes.vocab, shapes.hidden),)
    assert gguf_name(EMBEDDING) == "token_embd.weight"
    assert "lm_head" not in {u.name for u in units}  # SmolLM2's head is its embedding
    with pytest.raises(RecipeError, match="all GPTQ .* or all GGUF"):
        parse_formats(["fp", "gguf-q4_k"])
    with pytest.raises(RecipeError, match="Unknown GGUF fit format 'gguf-q4_k_m'"):
        parse_formats(["gguf-q4_k_m", "gguf-q8_0"])
    with pytest.raises(RecipeError, match="are for GGUF formats"):
        FitConfig(weights_budget=10**8, imatrix=True)
    assert parse_recipe("fit-100MiB-gguf-imatrix").config.imatrix
    assert get_method("fit").short_name(parse_recipe("fit-100MiB-gguf").config) == "fit-100MiB-gguf"


@pytest.mark.parametrize("granularity", ["linear", "fused", "block"])
def test_fixed_plus_unit_bytes_is_the_mixed_file(granularity, shapes):
    units = model_units(shapes, granularity, embedding=True)
    alloc = _cycled(units, FORMATS)
    planned = sum(weight_terms(GgufMixedLayout(allocation=alloc), shapes, "cpu").values())
    summed = fixed_bytes(units, shapes, "cpu", "gguf") + sum(unit_bytes(u, f, shapes, "cpu")
                                                             for u, (_, f) in zip(units, alloc))
    assert planned == summed
    # SmolLM2's 576-wide rows hold no 256-value block: Q4_K falls back to Q5_0 there, and costs what Q5_0 costs
    q_proj = next(u for u in model_units(shapes, "linear") if u.name.endswith("q_proj"))
    assert unit_bytes(q_proj, "gguf-q4_k", shapes, "cpu") == unit_bytes(q_proj, "gguf-q5_0", shapes, "cpu")
    down = next(u for u in model_units(shapes, "linear") if u.name.endswith("down_proj"))  # 1536 = 6 x 256
    assert unit_bytes(down, "gguf-q4_k", shapes, "cpu") == 576 * 1536 // 256 * 144


@pytest.fixture(scope="module")
def mixed(smol, shapes, home, tmp_path_factory):
    """A mix of four types, one unit after another, written by llama.cpp's quantize."""
    units = model_units(shapes, "linear", embedding=True)
    alloc = _cycled(units, FORMATS)
    config = FitConfig(weights_budget=10**9, formats=FORMATS, allocation=alloc)
    out = tmp_path_factory.mktemp("mixed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLAB_HOME", str(home))
        notes = get_method("fit").quantize(config, Path(smol.path), out, "cpu")
    return out, config, notes


def test_the_tensor_type_list_is_the_allocation_and_the_file_has_its_types(mixed, shapes):
    import gguf

    out, config, notes = mixed
    layout = get_method("fit").layout(config)
    listed = dict(line.rsplit("=", 1) for line in (out / TENSOR_TYPE_FILE).read_text().split())
    units = model_units(shapes, "linear", embedding=True)
    asked = {"^" + gguf_name(u.name).replace(".", "\\.") + "$": dict(config.allocation)[u.name].removeprefix("gguf-")
             for u in units}
    assert listed == asked
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    written = {t.name: t.tensor_type.name for t in reader.tensors}
    planned = layout.types(shapes)
    assert {n: written[n] for n in planned} == planned == notes["tensor_types"]
    assert {written[n] for n in written if n not in planned} == {"F32"}  # norms
    assert {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "F16"} <= set(planned.values())  # Q4_K where rows allow, else Q5_0
    assert sum(int(t.n_bytes) for t in reader.tensors) == sum(weight_terms(layout, shapes, "cpu").values())


def test_the_mixed_file_reloads_in_a_fresh_process_without_quantlab(mixed, shapes):
    out, config, _ = mixed
    layout = get_method("fit").layout(config)
    code = ("import json, sys, llama_cpp; m = llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=False); "
            "print(json.dumps([llama_cpp.llama_model_size(m._model.model), len(m.tokenize(b'Hello world'))]))")
    done = subprocess.run([sys.executable, "-c", code, str(out / "model.gguf")], capture_output=True, text=True,
                          check=True, cwd=out)
    size, tokens = json.loads(done.stdout.strip().splitlines()[-1])
    assert size == sum(weight_terms(layout, shapes, "cpu").values()) and tokens > 0


def test_a_uniform_file_is_read_back_as_transformers_holds_the_model(smol, shapes, home):
    """The F32 GGUF's tensors, read as the sensitivity pass reads a format's file, are the fp model's weights exactly:
    llama's permuted q and k rows come back in transformers' order."""
    import torch

    from quantlab.fit.sensitivity import GgufWeights
    from quantlab.methods.gguf import unquantized_gguf
    from quantlab.models.load import load_causal_lm

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLAB_HOME", str(home))
        f32 = unquantized_gguf(Path(smol.path))
    model = load_causal_lm(smol.path, device="cpu", dtype=torch.float32)
    names = [EMBEDDING, "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj",
             "model.layers.3.mlp.down_proj"]
    read = GgufWeights(f32, shapes.model_type, shapes.heads, shapes.kv_heads).read(names)
    for name in names:
        assert torch.equal(read[name], model.get_submodule(name).weight.detach()), name


@pytest.mark.slow  # about two minutes: two uniform files, the sensitivity pass, the fit and its fidelity in llama.cpp
def test_a_gguf_fit_is_resolved_built_within_its_budget_and_measured_in_llama_cpp(smol, shapes, home, tiny_text):
    """Block units, two formats, one sensitivity window: the budget halfway between the uniform files' bytes gives a
    mix whose file bytes are the prediction and within the budget; one byte under the smallest file is refused
    with that file's bytes, before any work."""
    from quantlab.sweep.commands import fit_model

    units = model_units(shapes, "block", embedding=True)
    fixed = fixed_bytes(units, shapes, "cpu", "gguf")
    size = {f: fixed + sum(unit_bytes(u, f, shapes, "cpu") for u in units) for f in ("gguf-q4_k", "gguf-q8_0")}
    small = dict(formats=("gguf-q4_k", "gguf-q8_0"), units="block", sensitivity_chunks=1, calibration=str(tiny_text))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLAB_HOME", str(home))
        with pytest.raises(Exception, match=f"smallest that can be met is {size['gguf-q4_k']} bytes"):
            fit_model(None, FitConfig(weights_budget=size["gguf-q4_k"] - 1, **small), "cpu", 1, None, str(tiny_text))
        budget = (size["gguf-q4_k"] + size["gguf-q8_0"]) // 2
        result = fit_model(None, FitConfig(weights_budget=budget, **small), "cpu", 1, None, str(tiny_text))
    fit = result["fit"]
    assert result["measured_bytes"] == fit["predicted_bytes"] <= budget
    assert set(fit["units_per_format"]) == {"gguf-q4_k", "gguf-q8_0"} and all(fit["units_per_format"].values())
    # SmolLM2's embedding is Q8_0 in its source file, so Q8_0 gives it back exactly: KLD 0 against fp, which is that
    # file dequantized
    assert fit["sensitivity"]["kld"][EMBEDDING]["gguf-q4_k"] > fit["sensitivity"]["kld"][EMBEDDING]["gguf-q8_0"] == 0
    assert result["fidelity"]["kld_mean"] > 0  # the file, in llama.cpp (a GGUF artifact holds no transformers model)
    assert (Path(result["artifact"]) / "model.gguf").is_file() and not (Path(result["artifact"]) / "config.json").exists()
    assert result["vllm"] is None and "llama_cpp.Llama" in result["loader"]
    Recipe(result["recipe"], "fit", FitConfig(weights_budget=budget, **small))  # the name round-trips


@pytest.mark.slow  # about three minutes: the weights' fit as above, and three cache pairs measured at 1024 tokens
def test_a_gpu_plan_chooses_the_kv_cache_types_beside_the_weights(smol, shapes, home, tiny_text):
    """With --gpu-mem a GGUF fit's KV cache is a unit: its pair of types is chosen beside the weights' formats, its
    bytes at the context are in the plan, and the artifact runs with those types."""
    from quantlab.artifacts import read_manifest
    from quantlab.engines.llamacpp import compute_bytes, kv_bytes
    from quantlab.sweep.commands import fit_model

    units = model_units(shapes, "block", embedding=True)
    fixed = fixed_bytes(units, shapes, "cpu", "gguf")
    size = {f: fixed + sum(unit_bytes(u, f, shapes, "cpu") for u in units) for f in ("gguf-q4_k", "gguf-q8_0")}
    gpu = compute_bytes(shapes, 1024) + (size["gguf-q4_k"] + size["gguf-q8_0"]) // 2 + kv_bytes(shapes, 1024)
    config = FitConfig(gpu_mem=gpu, context=1024, formats=("gguf-q4_k", "gguf-q8_0"), units="block",
                       sensitivity_chunks=1, calibration=str(tiny_text), kv_formats=("f16", "q8_0"), kv_windows=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLAB_HOME", str(home))
        result = fit_model(None, config, "cpu", 1, None, str(tiny_text))
    fit = result["fit"]
    type_k, type_v = fit["kv_cache"].split("/")
    assert fit["kv_bytes"] == kv_bytes(shapes, 1024, 1, type_k, type_v)
    assert fit["predicted_bytes"] == result["measured_bytes"] + fit["kv_bytes"] <= gpu - compute_bytes(shapes, 1024)
    assert set(fit["kv_table"]["kld"]) == {"f16/f16", "f16/q8_0", "q8_0/f16", "q8_0/q8_0"}
    assert fit["kv_table"]["kld"]["q8_0/q8_0"] > 0 == fit["kv_table"]["kld"]["f16/f16"]
    notes = read_manifest(result["artifact"])["method_notes"]
    assert notes["kv_cache"]["type_k"] == type_k and f"-ctk {type_k} -ctv {type_v}" in notes["kv_cache"]["llama_cpp"]


def test_a_gpu_plan_nothing_meets_is_refused_with_the_smallest_gpu_memory(shapes):
    """The refusal speaks of the GPU memory given: the smallest is every unit and the cache in their smallest formats,
    beside llama.cpp's compute buffer."""
    from quantlab.engines.llamacpp import compute_bytes, kv_bytes
    from quantlab.errors import UsageError
    from quantlab.steps.fit import solve

    units = model_units(shapes, "linear", embedding=True)
    least = (compute_bytes(shapes, 8192) + kv_bytes(shapes, 8192, 1, "q4_0", "q4_0") + fixed_bytes(units, shapes, "cpu", "gguf")
             + sum(unit_bytes(u, "gguf-q4_k", shapes, "cpu") for u in units))
    config = FitConfig(gpu_mem=least - 1, context=8192, formats=("gguf-q4_k", "gguf-q8_0"))
    assert config.kv_formats == ("f16", "q8_0", "q4_0")  # a GGUF GPU plan chooses its cache by default
    with pytest.raises(UsageError, match=f"GPU of {least - 1} bytes at context 8192 x batch 1: the smallest that can "
                                         f"be met is {least} bytes"):
        solve(config, None, shapes, "cpu")
    assert solve(dataclasses.replace(config, gpu_mem=least), None, shapes, "cpu").bytes == least - compute_bytes(shapes, 8192)
