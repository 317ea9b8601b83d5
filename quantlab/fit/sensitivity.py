"""Per-unit sensitivity: the KLD against fp of the model with only one unit quantized, for every unit and format.

The quantized weights are those the format's uniform run produced, unpacked to fp32: a GPTQ format's uniform GPTQ
artifact, a GGUF format's file with every tensor at that type (dequantized as transformers dequantizes a GGUF, in
its layout), the unit's own weights, not a proxy's. One at a time they replace the unit's weights in the fp model,
and the model's log-probs on the sensitivity text are compared with the cached fp log-probs, token by token over
the full vocabulary, as the fidelity step does. Blocks before the unit's compute what fp computes, so their outputs are
captured once and each unit's forward starts at its own block (checked once against a full forward; a model
whose decoder cannot start mid-way runs every forward whole).
"""

from __future__ import annotations

import math

from quantlab.errors import MeasurementError
from quantlab.evaluate import fidelity as fid
from quantlab.gguf_file import gguf_reader
from quantlab.layouts.gguf_types import gguf_name
from quantlab.layouts.gptq import unpack_weight

START_TOLERANCE = 1e-3  # largest |Δ log p| allowed between a forward started mid-way and a whole one


class Prefixes:
    """Each decoder block's input on every window, from one fp forward, and forwards that start at a block."""

    def __init__(self, model, ids, batch_size: int):
        import torch

        self.model, self.ids, self.batch = model, ids, batch_size
        self.decoder = model.get_decoder()
        self.layers = self.decoder.layers
        self.inputs: list[list] = [[] for _ in range(len(self.layers) + 1)]  # the last: the final norm's input
        hooks = [layer.register_forward_pre_hook(self._capture(i), with_kwargs=True)
                 for i, layer in enumerate(self.layers)]
        hooks.append(self.decoder.norm.register_forward_pre_hook(self._capture(len(self.layers)), with_kwargs=True))
        try:
            with torch.inference_mode():
                for start in range(0, ids.shape[0], batch_size):
                    self.decoder(ids[start:start + batch_size], use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        self.midway = self._check_midway()

    def _capture(self, i: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs[i].append(hidden.detach().clone())
        return hook

    def log_probs(self, block: int, batch_index: int):
        """log p(next token) of batch ``batch_index``, the forward started at decoder block ``block``."""
        import torch

        if not self.midway:
            block = 0
        start = batch_index * self.batch
        with torch.inference_mode():
            if block == 0:
                hidden = self.decoder(self.ids[start:start + self.batch], use_cache=False).last_hidden_state
            else:
                kept = self.decoder.layers
                self.decoder.layers = torch.nn.ModuleList(list(kept)[block:])
                try:
                    hidden = self.decoder(inputs_embeds=self.inputs[block][batch_index],
                                          position_ids=self._positions(batch_index), use_cache=False).last_hidden_state
                finally:
                    self.decoder.layers = kept
            logits = self.model.get_output_embeddings()(hidden[:, :-1, :])
            return torch.log_softmax(logits.float(), dim=-1)

    def _positions(self, batch_index: int):
        import torch

        n, length = self.inputs[0][batch_index].shape[:2]
        return torch.arange(length).unsqueeze(0).expand(n, -1)

    def _check_midway(self) -> bool:
        """Whether a forward started at the middle block gives the whole forward's log-probs."""
        mid = len(self.layers) // 2
        if mid == 0:
            return False
        self.midway = True
        whole, started = self.log_probs(0, 0), self.log_probs(mid, 0)
        return bool((whole - started).abs().max() <= START_TOLERANCE)

    def batches(self) -> int:
        return len(self.inputs[0])


def unit_kld(prefixes: Prefixes, block: int, baseline) -> list[float]:
    """Mean per-token KL(fp || model) of each window, the forward started at ``block``."""
    out = {k: [] for k in ("kl", "agree", "nll", "nll_baseline")}
    targets = prefixes.ids[:, 1:]
    for b in range(prefixes.batches()):
        lq = prefixes.log_probs(block, b)
        for j in range(lq.shape[0]):
            index = b * prefixes.batch + j
            fid.compare_window(lq[j], _as_tensor(baseline[index]), targets[index], out)
    return [float(k.double().mean()) for k in out["kl"]]


def _as_tensor(array):
    import torch

    return torch.from_numpy(array)


def swapped(model, weights: dict):
    """A context manager: the named linears' weights replaced by ``weights`` (name -> (out, in) tensor), then put
    back."""
    import contextlib

    @contextlib.contextmanager
    def swap():
        kept = {}
        try:
            for name, w in weights.items():
                param = model.get_submodule(name).weight
                kept[name] = param.data.clone()
                param.data.copy_(w.to(param.dtype))
            yield
        finally:
            for name, w in kept.items():
                model.get_submodule(name).weight.data.copy_(w)

    return swap()


def gptq_weights(reader, names, bits: int) -> dict:
    """The fp32 (out, in) weights of the GPTQ linears ``names`` in a checkpoint (a ``CheckpointReader``)."""
    return {n: unpack_weight(reader.read(f"{n}.qweight"), reader.read(f"{n}.qzeros"), reader.read(f"{n}.scales"),
                             reader.read(f"{n}.g_idx"), bits) for n in names}


class GgufWeights:
    """The fp32 weights of a GGUF file's tensors in the HF layout (transformers' GGUF tensor processor: llama's
    q and k rows un-permuted), by HF module name."""

    def __init__(self, path, arch: str, heads: int, kv_heads: int):
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        self.tensors = {t.name: t for t in gguf_reader(path).tensors}
        config = {"num_attention_heads": heads, "num_key_value_heads": kv_heads}
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)

    def read(self, names) -> dict:
        import gguf
        import numpy as np
        import torch

        out = {}
        for name in names:
            tensor = self.tensors[gguf_name(name)]
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            values = self.processor.process(values, tensor.name).weights
            out[name] = torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: the file's pages are read-only
        return out


def measure_table(model, prefixes: Prefixes, baseline, units, formats, weights_of, progress=None) -> dict:
    """``{unit: {format: [KLD of each window]}}``: a format without bits (fp, gguf-f32) is 0 by definition; every
    other's weights for a unit are ``weights_of(format, unit)`` (name -> fp32 (out, in) tensor)."""
    table = {u.name: {} for u in units}
    windows = prefixes.ids.shape[0]
    for fmt in formats:
        for u in units:
            if fmt.bits is None:
                table[u.name][fmt.name] = [0.0] * windows
                continue
            weights = weights_of(fmt, u)
            with swapped(model, weights):
                table[u.name][fmt.name] = unit_kld(prefixes, u.block, baseline)
            if not all(math.isfinite(k) for k in table[u.name][fmt.name]):  # NaN: the allocation's sums mean nothing
                raise MeasurementError(f"The sensitivity of {u.name} in {fmt.name} is not a number (NaN or inf) — "
                                       "that format's uniform weights break the model: leave the format out "
                                       "(--formats) or check the calibration text")
            if progress:
                progress()
    return table
