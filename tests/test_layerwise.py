"""Layer-by-layer execution against the in-memory forward, on tiny models of both real architectures."""

from __future__ import annotations

import pytest
import torch
from tiny import build_qwen2_dir

from quantlab.errors import ModelLoadError
from quantlab.evaluate import fidelity as fid
from quantlab.evaluate import guard
from quantlab.layerwise.model import LayerwiseModel
from quantlab.layerwise.weights import CheckpointReader
from quantlab.models.load import load_causal_lm


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_qwen2_dir(tmp_path_factory.mktemp("qwen") / "q", max_shard_size="60KB")


def _ids(vocab, n=3, length=48, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_layer_by_layer_log_probs_match_the_in_memory_forward(which, tiny_dir, qwen_dir):
    path = tiny_dir if which == "llama" else qwen_dir
    model = load_causal_lm(path)
    ids = _ids(model.config.vocab_size)
    whole = fid._log_probs(model, ids)
    # head slices smaller than the vocabulary, so the head really is computed slice by slice
    layered = LayerwiseModel(path, head_rows=7)
    assert layered.layers[0].self_attn.q_proj.weight.is_meta  # no layer is held between forwards
    parts = fid._log_probs(layered, ids)
    assert parts.shape == whole.shape
    assert (parts - whole).abs().max().item() < 1e-4
    assert layered.layers[-1].mlp.down_proj.weight.is_meta
    assert guard.greedy_continuation(layered.model, ids) == guard.greedy_continuation(model, ids)


def test_the_reader_reads_sharded_checkpoints_rows_and_tensors(qwen_dir):
    from safetensors.torch import load_file

    assert len(list(qwen_dir.glob("*.safetensors"))) > 1
    reader = CheckpointReader(qwen_dir)
    expected = {}
    for f in qwen_dir.glob("*.safetensors"):
        expected.update(load_file(f))
    assert set(reader.entries) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(reader.read(name), tensor)
    head = expected["lm_head.weight"]
    assert torch.equal(reader.read("lm_head.weight", (3, 9)), head[3:9])
    index = torch.tensor([5, 1, 5, 0])
    assert torch.equal(reader.read_rows("model.embed_tokens.weight", index), expected["model.embed_tokens.weight"][index])


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path, qwen_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(qwen_dir, broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="truncated"):
        LayerwiseModel(broken).log_probs(_ids(40))


@pytest.mark.parametrize("name", ["rtn-w8", "rtn-w4-g32"])
def test_rtn_layer_by_layer_writes_the_in_memory_artifact_and_runs_layer_by_layer(name, qwen_dir, tmp_path):
    from quantlab.methods import get_method
    from quantlab.layouts.loading import load_recipe_model
    from quantlab.recipe import parse_recipe

    recipe = parse_recipe(name)
    method = get_method("rtn")
    method.quantize(recipe.config, qwen_dir, tmp_path / "whole", "cpu")
    method.quantize_layer_by_layer(recipe.config, qwen_dir, tmp_path / "layered", "cpu")
    assert len(list((tmp_path / "layered").glob("model-*.safetensors"))) == 4  # the rest, then one per layer
    whole = load_recipe_model(str(tmp_path / "whole"), recipe, "cpu")
    layered = load_recipe_model(str(tmp_path / "layered"), recipe, "cpu")
    a, b = whole.state_dict(), layered.state_dict()
    assert a.keys() == b.keys()
    for key, x in a.items():
        parts = x.__tensor_flatten__()[0] if type(x) is not torch.Tensor else [None]
        for part in parts:
            assert torch.equal(getattr(x, part) if part else x, getattr(b[key], part) if part else b[key]), key
    ids = _ids(whole.config.vocab_size)
    run = LayerwiseModel(tmp_path / "layered", head_rows=7)
    assert type(run.reader.read_subclass("model.layers.0.mlp.up_proj.weight")).__name__ == "IntxUnpackedToInt8Tensor"
    assert (fid._log_probs(run, ids) - fid._log_probs(whole, ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_a_gptq_artifact_runs_layer_by_layer_with_the_kernels_it_loads_with(bits, gptq_artifacts):
    from quantlab.layouts.loading import load_recipe_model

    path, _, recipe = gptq_artifacts[bits]
    whole = load_recipe_model(str(path), recipe, "cpu")
    run = LayerwiseModel(path, head_rows=7)
    kernel = type(whole.model.layers[0].self_attn.q_proj)
    assert kernel.__name__ != "Linear" and type(run.layers[0].self_attn.q_proj) is kernel
    assert run.layers[0].self_attn.q_proj.qweight.is_meta  # filled only while its layer runs
    ids = _ids(whole.config.vocab_size)
    first, again = fid._log_probs(run, ids), fid._log_probs(run, ids)
    assert torch.equal(first, again)  # each pass builds its kernels afresh from the checkpoint
    assert (first - fid._log_probs(whole, ids)).abs().max().item() < 1e-4
    assert guard.greedy_continuation(run.model, ids) == guard.greedy_continuation(whole, ids)


def test_a_gptq_layer_s_packed_weights_are_freed_when_it_is_released_without_a_collection(gptq_artifacts):
    import gc
    import weakref

    path, _, _ = gptq_artifacts[8]
    run = LayerwiseModel(path, head_rows=7)
    seen = []

    def capture(layer, args, out):
        seen.extend(weakref.ref(m.qweight) for m in layer.modules() if isinstance(m, run.quantized.kind))

    for layer in run.layers:
        layer.register_forward_hook(capture, prepend=True)  # before the layer is released
    passes, per_layer = 3, sum(isinstance(m, run.quantized.kind) for m in run.layers[0].modules())
    gc.disable()  # a fresh QuantLinear sits in a reference cycle: only refcounting may free its weights here
    try:
        for _ in range(passes):
            fid._log_probs(run, _ids(run.model.config.vocab_size, n=1))
        alive = sum(ref() is not None for ref in seen)
    finally:
        gc.enable()
    assert len(seen) == passes * len(run.layers) * per_layer
    # torch.compile may keep the tensors of the one call it traced last; nothing else may survive its layer
    assert alive <= per_layer


@pytest.mark.parametrize("bits", [8, 4])
def test_a_torchao_quantized_layer_is_freed_when_it_is_dropped_without_a_collection(bits):
    """torchao's quantize_ binds each linear's extra_repr to the linear (a reference cycle); released, the layer
    and its quantized weights go at once, with the cyclic collector off."""
    import gc
    import weakref

    from torchao.quantization import quantize_

    from quantlab.layerwise.quantize import release_quantized
    from quantlab.methods import get_method
    from quantlab.recipe import parse_recipe

    recipe = parse_recipe("rtn-w8" if bits == 8 else "rtn-w4-g64")
    config = get_method("rtn").torchao_config(recipe.config)
    gc.disable()
    try:
        kept = []
        for release in (False, True):
            layer = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 128))
            quantize_(layer, config)
            ref = weakref.ref(layer[0])
            if release:
                release_quantized(layer)
            del layer
            kept.append(ref() is not None)
        assert kept == [True, False]  # the cycle keeps an unreleased one alive; a released one is gone
    finally:
        gc.enable()
        gc.collect()
