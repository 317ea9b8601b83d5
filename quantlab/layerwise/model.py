"""A causal LM run one decoder layer at a time, for a model whose weights do not fit the memory budget.

The model is built on the meta device (every module, no weights) and runs its own ``forward`` and ``generate``,
so masks, rotary tables and layer types are the model's. Three parts hold real weights only while they work:

- the input embedding reads just the rows of the tokens it is given;
- each decoder layer reads its weights from the safetensors (``CheckpointReader``: plain reads, no memory map)
  in a forward pre-hook, and drops them in its forward hook;
- the output head computes the logits one slice of the vocabulary at a time, each slice's rows read when used.

Everything else (final norm, rotary tables) is small and held throughout. The peak is then one layer's weights,
one head slice and the activations of one forward, whatever the model's size. The model runs in fp32. A quantized
artifact's layers are read as they load whole: torchao's intx tensors rebuilt from their parts, GPTQ's and AWQ's
packed linears into the kernels transformers' GPTQ and AWQ integrations select (``quantlab.layerwise.packed``), float8
and bitsandbytes 4-bit linears into the modules they load whole into (``quantlab.layerwise.linears``); an
artifact's embedding, head and norms are plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from quantlab.errors import ModelLoadError
from quantlab.layerwise.linears import swapped_linears
from quantlab.layerwise.packed import packed_layers
from quantlab.layerwise.weights import CheckpointReader
from quantlab.conv1d import conv1d_names, conv1d_to_linear
from quantlab.models.load import load_config
from quantlab.models.shapes import meta_model


@lru_cache(maxsize=1)
def _modules():
    """The two nn.Module classes, defined on first use so that importing this module loads no torch."""
    import torch

    class RowEmbedding(torch.nn.Module):
        """An input embedding that reads only the rows of the token ids it embeds."""

        def __init__(self, reader, name, dtype, device):
            super().__init__()
            self.reader, self.name, self.dtype = reader, name, dtype
            # the model's first parameter, so ``model.device`` is where the work happens
            self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=dtype, device=device), requires_grad=False)

        def forward(self, ids):
            rows = self.reader.read_rows(self.name, ids.reshape(-1).cpu())
            return rows.to(self.anchor.device, self.dtype).reshape(*ids.shape, -1)

    class SlicedHead(torch.nn.Module):
        """An output projection computed ``rows`` vocabulary entries at a time, each slice read when used."""

        def __init__(self, reader, name, rows, dtype, device):
            super().__init__()
            self.reader, self.name, self.rows, self.dtype, self.device = reader, name, rows, dtype, device
            self.vocab = reader.entry(name).shape[0]
            bias = name.removesuffix(".weight") + ".bias"
            self.bias_name = bias if bias in reader else None

        def forward(self, hidden):
            out = torch.empty((*hidden.shape[:-1], self.vocab), dtype=hidden.dtype, device=hidden.device)
            flat, rows = hidden.reshape(-1, hidden.shape[-1]), out.view(-1, self.vocab)
            for start in range(0, self.vocab, self.rows):
                stop = min(start + self.rows, self.vocab)
                w = self.reader.read(self.name, (start, stop)).to(self.device, self.dtype)
                for i in range(0, flat.shape[0], 256):  # 256 positions at a time: a small product in flight
                    rows[i:i + 256, start:stop] = flat[i:i + 256] @ w.T
                if self.bias_name:
                    out[..., start:stop] += self.reader.read(self.bias_name, (start, stop)).to(self.device, self.dtype)
                del w
            return out

    return RowEmbedding, SlicedHead


@dataclass
class ModelParts:
    """Where a meta-device model's parts are: the checkpoint's names of its embedding and head, its layers."""

    reader: CheckpointReader
    embed_name: str
    head_name: str
    layers: object  # the decoder's nn.ModuleList
    layers_prefix: str


def model_parts(model, reader: CheckpointReader) -> ModelParts:
    names = {id(m): n for n, m in model.named_modules()}
    embed_name = names[id(model.get_input_embeddings())] + ".weight"
    head_name = names[id(model.get_output_embeddings())] + ".weight"
    if head_name not in reader:
        head_name = embed_name  # tied: the head is the input embedding
    layers = decoder_layers(model)
    return ModelParts(reader, embed_name, head_name, layers, names[id(layers)])


def decoder_layers(model):
    """The decoder's list of layers: ``layers`` (Llama and most), or its one list as long as the config's layer count
    (GPT-2's ``h``)."""
    import torch

    decoder = model.get_decoder()
    if isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):
        return decoder.layers
    count = model.config.get_text_config().num_hidden_layers
    found = [m for m in decoder.children() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if not found:
        raise ModelLoadError(f"Layer-by-layer execution finds no list of {count} decoder layers in "
                             f"{type(decoder).__name__} — raise --max-memory so the model loads whole")
    return found[0]


def stored_as_linear(model, reader: CheckpointReader) -> None:
    """Turn ``model``'s Conv1D layers into ``nn.Linear`` where the checkpoint holds them as torchao's linears (a
    torchao artifact of GPT-2: ``quantlab.conv1d``); an fp or GPTQ checkpoint keeps them."""
    if any(reader.is_subclass(f"{name}.weight") for name in conv1d_names(model)):
        conv1d_to_linear(model)


def _set_param(module, name: str, value) -> None:
    import torch

    owner, _, leaf = name.rpartition(".")
    (module.get_submodule(owner) if owner else module)._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


class LayerwiseModel:
    """``self.model`` is the model class of ``model_dir`` with its weights read as described above."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", head_rows: int = 16384,
                 trust_remote_code: bool = False):
        import torch

        self.device, self.dtype = device, torch.float32
        self.reader = CheckpointReader(model_dir)
        config = load_config(model_dir, trust_remote_code)
        model = meta_model(config, trust_remote_code)
        stored_as_linear(model, self.reader)
        parts = model_parts(model, self.reader)
        self.layers, self.layers_prefix = parts.layers, parts.layers_prefix
        self.quantized = (packed_layers(model, config, device)
                          or swapped_linears(config, self.reader, self.layers, self.layers_prefix, device))
        self.head_tied = parts.head_name == parts.embed_name  # the checkpoint holds no head of its own
        row_embedding, sliced_head = _modules()
        model.set_input_embeddings(row_embedding(self.reader, self._need(parts.embed_name), self.dtype, device))
        model.set_output_embeddings(sliced_head(self.reader, self._need(parts.head_name), head_rows, self.dtype, device))
        self.model = model.eval()
        self._materialize_rest(config)
        for i, layer in enumerate(self.layers):
            self._check_layer(i, layer)
            layer.register_forward_pre_hook(lambda mod, args, i=i: self._load(mod, i))
            layer.register_forward_hook(lambda mod, args, out, i=i: self._release(mod, i))

    def _need(self, name: str) -> str:
        if name not in self.reader:
            raise ModelLoadError(f"The checkpoint has no tensor {name} — layer-by-layer execution cannot map this "
                                 "model's weights; raise --max-memory so it loads whole")
        return name

    def _check_layer(self, i: int, layer) -> None:
        for name, _ in layer.named_parameters():
            full = f"{self.layers_prefix}.{i}.{name}"
            if not (self.reader.is_subclass(full) or (self.quantized and self.quantized.owns(layer, name))):
                self._need(full)

    def _materialize_rest(self, config) -> None:
        """Read every weight outside the layers, embedding and head; rebuild buffers the checkpoint lacks."""
        import torch

        for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
            owner, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(owner)
            if name.startswith(self.layers_prefix + ".") or not getattr(module, leaf).is_meta:
                continue
            if name in self.reader:
                value = self.reader.read(name).to(self.device, self.dtype if tensor.is_floating_point() else tensor.dtype)
                if leaf in module._parameters:
                    module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
                else:
                    module._buffers[leaf] = value
            elif "rotary" in type(module).__name__.lower():
                parent, _, attr = owner.rpartition(".")
                with torch.device(self.device):  # its tables are computed from the config, on the device
                    setattr(self.model.get_submodule(parent), attr, type(module)(config))
            else:
                raise ModelLoadError(f"{name} is neither in the checkpoint nor a rotary table — layer-by-layer "
                                     "execution cannot rebuild it; raise --max-memory so the model loads whole")

    def _load(self, layer, i: int) -> None:
        """Layer ``i``'s weights onto the device: plain tensors read in place, torchao's rebuilt from their parts,
        GPTQ's QuantLinears filled and post-initialised."""
        import torch

        if self.quantized:
            self.quantized.load(layer, i, f"{self.layers_prefix}.{i}", self.reader)
        for name, param in list(layer.named_parameters()):
            full = f"{self.layers_prefix}.{i}.{name}"
            if self.quantized and self.quantized.owns(layer, name):
                continue
            if self.reader.is_subclass(full):
                value = self.reader.read_subclass(full).to(self.device)
            else:
                value = torch.empty(param.shape, dtype=param.dtype, device=self.device)
                self.reader.read_into(full, value)
            _set_param(layer, name, value)

    def generate(self, *args, **kwargs):
        """``generate`` of the model, run layer by layer (used by the garbage guard's greedy continuation)."""
        return self.model.generate(*args, **kwargs)

    def log_probs(self, batch):
        """log p(next token) for every position but the last, (batch, tokens - 1, vocab) fp32, normalised in place:
        the head's logits are the only vocabulary-sized tensor held."""
        import torch

        with torch.inference_mode():
            hidden = self.model.get_decoder()(batch.to(self.device), use_cache=False).last_hidden_state
            logits = self.model.get_output_embeddings()(hidden[:, :-1, :])
            del hidden
            for row in logits:  # one window at a time, so logsumexp's temporaries are one window's
                row -= torch.logsumexp(row, dim=-1, keepdim=True)
            return logits.cpu()

    def _release(self, layer, i: int) -> None:
        import torch

        if self.quantized:
            self.quantized.release(layer, i)
        for name, param in list(layer.named_parameters()):
            _set_param(layer, name, torch.empty(param.shape, dtype=param.dtype, device="meta"))

    def layer_bytes(self) -> int:
        """Bytes of the largest decoder layer's weights as read."""
        return max(sum(p.numel() for p in layer.parameters()) for layer in self.layers) * self.dtype.itemsize
