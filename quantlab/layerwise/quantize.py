"""Round-to-nearest into torchao's layout one decoder layer at a time, from the fp checkpoint to a sharded artifact.

``from_pretrained`` with a ``TorchAoConfig`` loads the fp model whole and then quantizes it. Here each decoder layer
is read from the safetensors (plain reads), quantized with torchao's ``quantize_`` (the function transformers
applies to each linear), flattened as ``save_pretrained`` flattens torchao tensors, and written as its own shard;
the embedding, final norm and head are streamed across in row blocks. The artifact is the one the in-memory path
writes, sharded (tests/test_layerwise.py checks the loaded weights are equal), and reloads with plain
``from_pretrained``. Peak: one fp layer, its quantized copy and one block.
"""

from __future__ import annotations

import json
from pathlib import Path

from quantlab.device import CPU
from quantlab.errors import ModelLoadError
from quantlab.layerwise.model import model_parts
from quantlab.layerwise.weights import CheckpointReader
from quantlab.layerwise.writer import ShardWriter
from quantlab.conv1d import conv1d_to_linear
from quantlab.models.load import load_config, load_tokenizer
from quantlab.models.shapes import meta_model

BLOCK_BYTES = 64 * 2**20  # rows of an unquantized tensor copied at a time


def quantize_torchao_layer_by_layer(source_dir: Path, out_dir: Path, torchao_config,
                                    trust_remote_code: bool = False) -> None:
    from transformers import TorchAoConfig

    reader = CheckpointReader(source_dir)
    config = load_config(source_dir, trust_remote_code)
    parts = model_parts(meta_model(config, trust_remote_code), reader)
    outside = [n for n in reader.entries if not n.startswith(parts.layers_prefix + ".")]
    first, first_meta = _quantized_layer(parts, 0, torchao_config)
    metadata = _metadata(parts, first_meta, outside)
    writer = ShardWriter(out_dir, metadata)
    writer.add_streamed({name: _blocks(reader, name) for name in outside})
    writer.add(first)
    del first
    for i in range(1, len(parts.layers)):
        tensors, meta = _quantized_layer(parts, i, torchao_config)
        if meta != _renamed(first_meta, i, parts.layers_prefix):
            raise ModelLoadError(f"Layer {i} of {source_dir} is not shaped like layer 0 — quantize it whole "
                                 "(without --max-memory)")
        writer.add(tensors)
        del tensors
    writer.finish()
    config.quantization_config = TorchAoConfig(quant_type=torchao_config)
    save_companions(source_dir, out_dir, config, trust_remote_code)


def write_layer_by_layer(source_dir: Path, out_dir: Path, quantize_layer, *, dtype=None,
                         trust_remote_code: bool = False):
    """The artifact of a method that quantizes each linear on its own (no calibration), one decoder layer at a time:
    every tensor outside the layers streamed across in row blocks (cast to ``dtype`` if given, floats only), then
    each layer read from the safetensors (cast likewise), quantized in place by ``quantize_layer(layer)``, and its
    state, under the names ``save_pretrained`` gives it, written as its own shard.
    Returns the source's config, for the caller to complete and save (``save_companions``). Peak: one fp layer, its
    quantized tensors and a block."""
    reader = CheckpointReader(source_dir)
    config = load_config(source_dir, trust_remote_code)
    model = meta_model(config, trust_remote_code)
    parts = model_parts(model, reader)
    _check_linears_inside(model, parts, source_dir)
    outside = [n for n in reader.entries if not n.startswith(parts.layers_prefix + ".")]
    writer = ShardWriter(out_dir)
    writer.add_streamed({name: _blocks(reader, name, dtype) for name in outside})
    for i in range(len(parts.layers)):
        layer = read_layer(parts, i, dtype)
        quantize_layer(layer)
        tensors = {f"{parts.layers_prefix}.{i}.{k}": v.cpu() for k, v in layer.state_dict().items()}
        del layer
        writer.add(tensors)
        del tensors
    writer.finish()
    return config


def _check_linears_inside(model, parts, source_dir) -> None:
    """Refuse a model with a linear outside its decoder layers other than the head: the whole-model route would
    quantize it, and this one copies what lies outside the layers as it is."""
    import torch

    head = model.get_output_embeddings()
    stray = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
             and not name.startswith(parts.layers_prefix + ".")]
    if stray:
        raise ModelLoadError(f"{source_dir} has linears outside its decoder layers ({', '.join(stray[:3])}), which "
                             "layer-by-layer quantization does not write — quantize it whole (raise --max-memory)")


def read_layer(parts, i: int, dtype=None):
    """Decoder layer ``i`` as a real module on CPU, its weights read from the checkpoint (floats cast to ``dtype``
    if given); the skeleton's layer stays on the meta device."""
    import copy

    layer = copy.deepcopy(parts.layers[i])
    layer.to_empty(device=CPU)
    if dtype is not None:
        layer.to(dtype)
    prefix = f"{parts.layers_prefix}.{i}."
    for name, param in layer.named_parameters():
        parts.reader.read_into(prefix + name, param.data)
    return layer


def save_companions(source_dir: Path, out_dir: Path, config, trust_remote_code: bool = False) -> None:
    """What ``save_pretrained`` writes beside the weights: the config, and the source's tokenizer and generation
    config where it has them."""
    from transformers import GenerationConfig

    config.save_pretrained(out_dir)
    load_tokenizer(source_dir, trust_remote_code).save_pretrained(out_dir)
    try:
        GenerationConfig.from_pretrained(source_dir).save_pretrained(out_dir)
    except OSError:
        pass  # the source has no generation config


def _quantized_layer(parts, i: int, torchao_config) -> tuple[dict, dict]:
    """Layer ``i`` read, quantized and flattened: its tensors as torchao's safetensors format names them, and
    their metadata entries."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from torchao.quantization import quantize_

    layer = read_layer(parts, i)
    prefix = f"{parts.layers_prefix}.{i}."
    conv1d_to_linear(layer)  # torchao quantizes nn.Linear only: GPT-2's Conv1D stored as linears, as in memory
    quantize_(layer, torchao_config)
    tensors, meta = flatten_tensor_state_dict({prefix + k: v for k, v in layer.state_dict().items()})
    release_quantized(layer)
    del layer
    return tensors, {k: v for k, v in meta.items() if k != "tensor_names"}


def release_quantized(layer) -> None:
    """Break the reference cycle torchao's ``quantize_`` leaves on every linear it quantizes (its ``extra_repr``
    is a method bound to the module, kept on the module), so the layer's quantized tensors go when the layer does,
    not at the cyclic collector's next full pass: without this, up to 7 finished layers of qwen2.5-coder-1.5b
    (0.33 GB at 8 bits) were alive at once."""
    for module in layer.modules():
        module.__dict__.pop("extra_repr", None)


def _renamed(entries: dict, i: int, layers_prefix: str) -> dict:
    old, new = f"{layers_prefix}.0.", f"{layers_prefix}.{i}."
    return {new + k[len(old):]: v for k, v in entries.items()}


def _metadata(parts, first: dict, outside: list[str]) -> dict[str, str]:
    """The whole checkpoint's torchao metadata, known before its first shard is written: every layer's entries are
    layer 0's renamed (checked as each layer is quantized), the tensors outside the layers plain."""
    plain = json.dumps({"_type": "Tensor"})
    meta = {name: plain for name in outside}
    for i in range(len(parts.layers)):
        meta.update(_renamed(first, i, parts.layers_prefix))
    meta["tensor_names"] = json.dumps(list(meta))
    return meta


def _blocks(reader: CheckpointReader, name: str, dtype=None):
    """``ShardWriter.add_streamed``'s (dtype, shape, row blocks) of a checkpoint tensor, floats cast to ``dtype``."""
    import torch

    e = reader.entry(name)
    stored = getattr(torch, e.dtype)
    target = dtype if dtype is not None and stored.is_floating_point else stored
    rows = max(1, BLOCK_BYTES // max(e.row_bytes, 1)) if e.shape else 1
    total = e.shape[0] if e.shape else 1
    blocks = (reader.read(name, (start, min(start + rows, total))).to(target)
              for start in range(0, total, rows))
    return target, e.shape, blocks
