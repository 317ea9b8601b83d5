"""GGUF recipes and the llama.cpp engine, on the embedded SmolLM2 (llama.cpp needs a real tokenizer and metadata,
which a model loaded from a GGUF carries): the F32 GGUF is the source dequantized with its metadata; each recipe's
file is what llama.cpp's quantizer writes, its bytes as llama.cpp holds them equal the planner's, it reloads in a
fresh process without quantlab, and llama.cpp's log-probs of the unquantized file match torch's (the engine's
floor) while quantized files stay in their expected order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantlab.errors import RecipeError
from quantlab.methods import get_method
from quantlab.recipe import Recipe, parse_recipe

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/setup.sh")

NAMES = ("gguf-f32", "gguf-q8_0", "gguf-q4_k_m", "gguf-q4_k_m-imatrix")
WINDOWS, TOKENS = 2, 96


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-home")


@pytest.fixture(scope="module")
def smol(home):
    from quantlab.models.source import resolve_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLAB_HOME", str(home))
        return resolve_model(None)


def _recipe(name: str, calibration: Path) -> Recipe:
    recipe = parse_recipe(name)
    if recipe.config.imatrix:  # a short calibration keeps the test in seconds; the defaults are GPTQ's
        config = type(recipe.config)(qtype=recipe.config.qtype, imatrix=True, samples=4, tokens=64,
                                     calibration=str(calibration))
        recipe = Recipe(name, "gguf", config)
    return recipe


@pytest.fixture(scope="module")
def built(smol, home, tmp_path_factory, tiny_text):
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLAB_HOME", str(home))
        for name in NAMES:
            recipe = _recipe(name, tiny_text)
            target = tmp_path_factory.mktemp(name)
            notes = get_method("gguf").quantize(recipe.config, Path(smol.path), target, "cpu")
            out[name] = (target, recipe, notes)
    return out


@pytest.fixture(scope="module")
def windows(smol, tiny_text):
    from quantlab.evaluate.fidelity import FidelitySettings, chunk_ids
    from quantlab.models.load import load_tokenizer

    settings = FidelitySettings(max_chunks=WINDOWS, chunk_tokens=TOKENS)
    return chunk_ids(load_tokenizer(smol.path), Path(tiny_text).read_text(), settings)


def test_the_f32_gguf_is_the_source_dequantized_with_its_metadata(built, smol):
    import gguf
    import numpy as np

    from quantlab.methods.gguf import origin_gguf

    source = gguf.GGUFReader(str(origin_gguf(Path(smol.path))))
    f32 = gguf.GGUFReader(str(built["gguf-f32"][0] / "model.gguf"))
    assert [t.name for t in f32.tensors] == [t.name for t in source.tensors]
    assert {t.tensor_type.name for t in f32.tensors} == {"F32"}
    first = next(t for t in source.tensors if t.tensor_type.name != "F32")
    mine = next(t for t in f32.tensors if t.name == first.name)
    assert np.array_equal(np.asarray(mine.data).reshape(-1),
                          gguf.quants.dequantize(first.data, first.tensor_type).reshape(-1))
    keys = lambda r: {k for k in r.fields if not k.startswith("GGUF.")}  # noqa: E731
    assert keys(f32) == keys(source)
    assert f32.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    assert f32.fields["tokenizer.ggml.tokens"].contents() == source.fields["tokenizer.ggml.tokens"].contents()


@pytest.mark.parametrize("name", NAMES)
def test_predicted_bytes_equal_what_llama_cpp_holds(name, built, smol):
    from quantlab.layouts.loading import load_recipe_model
    from quantlab.plan import PlanSettings, plan_model

    target, recipe, _ = built[name]
    (row,) = plan_model(smol.path, PlanSettings(device="cpu", recipes=(recipe,)))["recipes"]
    model = load_recipe_model(str(target), recipe, "cpu")
    assert row["weights_bytes"] == model.weight_bytes()["weights_bytes"]
    model.close()


@pytest.mark.parametrize("name", NAMES)
def test_each_tensor_has_the_type_the_planner_predicts(name, built, smol):
    from quantlab.models.load import load_config
    from quantlab.plan.shapes import model_shapes

    target, recipe, _ = built[name]
    layout = get_method("gguf").layout(recipe.config)
    stored = layout.stored_types(target)
    predicted = layout.types(model_shapes(load_config(smol.path)))
    assert {k: stored[k] for k in predicted} == predicted
    assert layout.quantizes == (name != "gguf-f32")


RELOAD = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
ids = json.loads(sys.argv[2])
llm = Llama(sys.argv[1], n_ctx=len(ids), n_batch=len(ids), logits_all=True, flash_attn=True, n_threads=1,
            verbose=False)
llm.eval(ids)
print(json.dumps({"sum": float(np.asarray(llm.scores[:len(ids)], dtype=np.float64).sum()),
                  "quantlab_imported": any(k.startswith("quantlab") for k in sys.modules)}))
llm.close()
"""


def test_a_gguf_artifact_reloads_in_a_fresh_process_without_quantlab(built, windows):
    import numpy as np

    from quantlab.layouts.loading import load_recipe_model

    target, recipe, _ = built["gguf-q4_k_m"]
    ids = windows[0].tolist()
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(target / "model.gguf"), json.dumps(ids)],
                          capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fresh["quantlab_imported"] is False
    model = load_recipe_model(str(target), recipe, "cpu")
    llm = model._context(len(ids))
    llm.reset()
    llm.eval(ids)
    mine = float(np.asarray(llm.scores[:len(ids)], dtype=np.float64).sum())
    model.close()
    assert mine == pytest.approx(fresh["sum"], rel=1e-6)


def test_llama_cpp_log_probs_of_the_f32_file_match_torch_and_quantized_files_fall_in_order(built, smol, windows):
    """The engine's floor: the unquantized GGUF in llama.cpp against fp32 in torch on the same token ids is a KLD
    far below any quantization's; Q8_0 is closer than Q4_K_M."""
    import torch

    from quantlab.evaluate import fidelity as fid
    from quantlab.layouts.loading import load_recipe_model
    from quantlab.models.load import load_causal_lm

    fp = load_causal_lm(smol.path, device="cpu", dtype=torch.float32)
    baseline = fid._log_probs(fp, windows).numpy()
    kld = {}
    for name in ("gguf-f32", "gguf-q8_0", "gguf-q4_k_m"):
        target, recipe, _ = built[name]
        model = load_recipe_model(str(target), recipe, "cpu")
        per_token = fid.compare(model, windows, baseline, batch_size=2)
        model.close()
        kld[name] = float(per_token["kl"].mean())
        if name == "gguf-f32":
            assert per_token["agree"].mean() > 0.99
    assert kld["gguf-f32"] < 1e-3 and kld["gguf-f32"] < kld["gguf-q8_0"] / 3 < kld["gguf-q4_k_m"] / 3, kld


def test_the_importance_matrix_reaches_llama_cpp(built):
    import gguf
    import numpy as np

    _, _, notes = built["gguf-q4_k_m-imatrix"]
    assert notes["imatrix_entries"] == 30 * 7  # every linear of SmolLM2's 30 layers (its head is tied)
    plain = gguf.GGUFReader(str(built["gguf-q4_k_m"][0] / "model.gguf"))
    weighted = gguf.GGUFReader(str(built["gguf-q4_k_m-imatrix"][0] / "model.gguf"))
    name = "blk.0.ffn_down.weight"  # a K-quant tensor: its blocks differ when weighted by the imatrix
    a, b = (next(t for t in r.tensors if t.name == name) for r in (plain, weighted))
    assert a.tensor_type == b.tensor_type and not np.array_equal(np.asarray(a.data), np.asarray(b.data))


def test_the_importance_matrix_is_captured_once_per_source_and_calibration(built, smol, home, tiny_text, tmp_path):
    """A second GGUF recipe on the same calibration reads the first one's cached matrix."""
    _, _, first = built["gguf-q4_k_m-imatrix"]
    recipe = _recipe("gguf-q8_0-imatrix", tiny_text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLAB_HOME", str(home))
        notes = get_method("gguf").quantize(recipe.config, Path(smol.path), tmp_path, "cpu")
    assert notes["imatrix_cache"] == {"path": first["imatrix_cache"]["path"], "reused": True}
    assert first["imatrix_cache"]["reused"] is False and notes["imatrix_entries"] == first["imatrix_entries"]


def test_the_llama_cpp_bench_times_prefill_and_decode_and_reads_its_buffers(built):
    from quantlab.layouts.loading import load_recipe_model
    from quantlab.measure.latency import LatencySettings

    target, recipe, _ = built["gguf-q8_0"]
    model = load_recipe_model(str(target), recipe, "cpu")
    lat = model.measure(LatencySettings(prompt_tokens=32, decode_tokens=8, batch_sizes=(1,), warmup=1,
                                        repetitions=2))
    held = model.held()
    model.close()
    assert lat["prefill_ms"]["median"] > 0 and lat["decode_tok_s"]["1"]["median"] > 0
    assert len(lat["prefill_ms_samples"]) == 2 and lat["engine"] == "llama.cpp"
    assert held["model"] > 100e6 and held["KV"] > 0 and held["compute"] > 0


def test_a_model_directory_is_refused_before_work(tiny_dir):
    with pytest.raises(RecipeError, match="need a model loaded from a .gguf"):
        get_method("gguf").check_source(parse_recipe("gguf-q4_k_m").config, str(tiny_dir))


@pytest.mark.slow  # about a minute: HFLM and llama.cpp each score the requests on SmolLM2
def test_lm_eval_scores_a_gguf_in_llama_cpp_as_hflm_scores_fp_in_torch(built, smol):
    """The F32 file in llama.cpp and fp32 in torch give the same lm-eval log-likelihoods and greedy flags on the
    same requests: the suite path of the llama.cpp engine is HFLM's, up to the engine's floor."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from quantlab.engines.harness import engine_lm
    from quantlab.layouts.loading import load_recipe_model
    from quantlab.models.load import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(smol.path)
    pairs = [("The capital of France is", " Paris"), ("Water boils at 100 degrees", " Celsius."),
             ("Question: what is two plus two? Answer:", " four")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, ("A short paragraph about rivers and the sea.",), 0)]
    hf = HFLM(pretrained=load_causal_lm(smol.path, device="cpu", dtype=torch.float32), tokenizer=tokenizer,
              batch_size=1)
    target, recipe, _ = built["gguf-f32"]
    model = load_recipe_model(str(target), recipe, "cpu")
    own = load_tokenizer(target)  # the artifact carries the source's tokenizer, as the accuracy step loads it
    assert [own(p + c)["input_ids"] for p, c in pairs] == [tokenizer(p + c)["input_ids"] for p, c in pairs]
    lm = engine_lm(model, own)
    mine, theirs = lm.loglikelihood(requests), hf.loglikelihood(requests)
    assert [g for _, g in mine] == [g for _, g in theirs]
    # within the engine's floor (llama.cpp keeps its KV cache in F16): a tenth of a percent of each log-likelihood
    assert [ll for ll, _ in mine] == pytest.approx([ll for ll, _ in theirs], rel=2e-3)
    assert lm.loglikelihood_rolling(rolling) == pytest.approx(hf.loglikelihood_rolling(rolling), rel=2e-3)
    model.close()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_importance_matrix_is_the_same_captured_layer_by_layer(tied, tmp_path):
    """The budgeted capture (decoder run one layer at a time, windows batched) gives the statistic of the whole
    model's, for every linear and, untied, the head (``output.weight``: the decoder's output)."""
    import numpy as np
    from tiny import build_llama_dir

    from quantlab.methods.gguf import importance_matrix

    source = build_llama_dir(tmp_path / "llama", layers=2, tied=tied)
    rng = np.random.default_rng(0)
    windows = [[int(t) for t in rng.integers(0, 60, 16)] for _ in range(11)]  # batches of 8 and 3
    whole = importance_matrix(source, windows, "cpu", False)
    layered = importance_matrix(source, windows, "cpu", False, layer_by_layer=True)
    assert sorted(whole) == sorted(layered) and len(whole) == 2 * 7 + (0 if tied else 1)
    assert ("output.weight" in whole) is not tied
    for name, values in whole.items():
        np.testing.assert_allclose(layered[name], values, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", ["gguf-q4_k_m", "gguf-q8_0"])
def test_the_planner_predicts_llama_cpp_s_buffers(name, built, smol):
    """llama.cpp's model buffers are the file's tensor bytes plus its CPU repack of Q4_0/Q4_K matrix weights; its
    KV cache and compute buffer at a context are what the planner's llama.cpp terms say (``held_terms``)."""
    from quantlab.layouts.loading import load_recipe_model
    from quantlab.models.load import load_config
    from quantlab.plan.shapes import model_shapes
    from quantlab.plan.steps import layout_weights

    target, recipe, _ = built[name]
    shapes = model_shapes(load_config(smol.path))
    layout = get_method("gguf").layout(recipe.config)
    planned = layout.engine_terms(shapes, 1, 256)
    model = load_recipe_model(str(target), recipe, "cpu")
    held = model.buffers_at(256)
    model.close()
    repacked = planned["llama.cpp: repacked copies of Q4_0/Q4_K weights (CPU)"]
    assert (repacked > 0) == (name == "gguf-q4_k_m")
    norms = shapes.unquantized["norms"] * 4  # F32 1-D tensors: in the file, and in the layout's weights
    assert held["model"] == pytest.approx(layout_weights(recipe, shapes, "cpu") + repacked, rel=0.01, abs=norms)
    assert held["KV"] == pytest.approx(planned["llama.cpp: KV cache (F16)"], rel=0.01)
    assert held["compute"] == pytest.approx(planned["llama.cpp: compute buffer (a micro-batch's logits)"], rel=0.05)


@pytest.mark.parametrize("type_k,type_v", [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q8_0"), ("f16", "q4_0")])
def test_kv_cache_bytes_are_llama_cpp_s_kv_buffer(type_k, type_v, built, smol):
    """The planner's KV bytes of a cache type are llama.cpp's KV buffer (its log gives MiB to two decimals), at a
    context llama.cpp rounds up to 256 cells."""
    from quantlab.engines.llamacpp import LlamaCppModel, kv_bytes
    from quantlab.models.load import load_config
    from quantlab.plan.shapes import model_shapes

    shapes = model_shapes(load_config(smol.path))
    model = LlamaCppModel(built["gguf-q8_0"][0] / "model.gguf", type_k=type_k, type_v=type_v)
    held = model.buffers_at(300)
    model.close()
    assert abs(held["KV"] - kv_bytes(shapes, 300, 1, type_k, type_v)) <= 0.005 * 2**20
    assert kv_bytes(shapes, 300, 1, type_k, type_v) == kv_bytes(shapes, 512, 1, type_k, type_v)


def test_a_quantized_kv_cache_costs_kld_against_the_f16_cache(built, windows):
    """The same model in llama.cpp with its cache in F16 twice gives KLD 0; q8_0 costs something, q4_0 more."""
    from quantlab.engines.kv import cache_kld, caches_kld

    path = built["gguf-q8_0"][0] / "model.gguf"
    rows = windows.tolist()
    same = cache_kld(path, rows, "f16", "f16")
    q8, q4 = cache_kld(path, rows, "q8_0", "q8_0"), cache_kld(path, rows, "q4_0", "q4_0")
    assert same["kld_mean"] == 0 and same["top1"] == 1
    assert 0 < q8["kld_mean"] < q4["kld_mean"] and q8["top1"] >= q4["top1"]
    assert q8["positions"] == WINDOWS * (TOKENS - 1 - TOKENS // 2)
    # measured together against one F16 forward, each pair's numbers are the ones it has alone
    both = caches_kld(path, rows, [("q8_0", "q8_0"), ("q4_0", "q4_0")])
    assert [b["kld_per_window"] for b in both] == [q8["kld_per_window"], q4["kld_per_window"]]
    assert [b["top1"] for b in both] == [q8["top1"], q4["top1"]]
