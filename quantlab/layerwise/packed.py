"""A GPTQ or AWQ artifact's decoder layers run one at a time with the kernels the artifact loads with whole.

transformers' GPTQ integration (optimum, then GPTQModel) turns the model's linears into the QuantLinear class
GPTQModel selects for the device, loads the packed tensors into them, then converts the v1 zero points and
post-initialises every QuantLinear (``GPTQQuantizer.convert_model`` before loading, ``post_init_model`` after).
Here the same quantizer converts the meta-device model once; each layer, when it runs, gets fresh copies of its
meta QuantLinears filled from the checkpoint and post-initialised the same way, and gets the meta ones back when
it is done. The arithmetic is then the one of the artifact loaded whole (on CPU: GPTQModel's aten int4 kernel in
bf16 at 4 bits, its torch kernel at 8), whatever a kernel converts or caches on first use.

An AWQ artifact goes the same way through transformers' AWQ integration: its quantizer turns the meta model's
linears into the AWQ kernel GPTQModel selects (on CPU ``TorchAtenAwqLinear``, which repacks itself for torch's int4
matmul on its first forward), and each layer's are filled from the checkpoint and post-initialised as GPTQModel's
``hf_gptqmodel_post_init`` does after a whole load.
"""

from __future__ import annotations

import copy

from quantlab.errors import ModelLoadError


def packed_layers(model, config, device: str):
    """The ``GptqLayers`` or ``AwqLayers`` of a GPTQ or AWQ artifact's config, applied to ``model``; else None."""
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    kinds = {"gptq": GptqLayers, "awq": AwqLayers}
    return kinds[method](model, config, device) if method in kinds else None


class GptqLayers:
    """The quantizer of a GPTQ artifact's config, applied to ``model`` (on meta) at construction."""

    format_name = "GPTQ"

    def __init__(self, model, config, device: str):
        import torch
        from optimum.gptq import GPTQQuantizer
        from transformers import GPTQConfig

        self.quantizer = GPTQQuantizer.from_dict(GPTQConfig.from_dict(config.quantization_config).to_dict_optimum())
        self.quantizer.convert_model(model, device_map={"": torch.device(device)})
        self.kind, self.device = self.quantizer.quant_linear, device
        self.templates: dict[int, dict[str, object]] = {}  # layer index -> {module name: its meta QuantLinear}

    def owns(self, layer, param_name: str) -> bool:
        """Whether ``param_name`` of ``layer`` belongs to one of its QuantLinears (filled by ``load``)."""
        owner = param_name.rpartition(".")[0]
        return bool(owner) and isinstance(layer.get_submodule(owner), self.kind)

    def load(self, layer, i: int, prefix: str, reader) -> None:
        """Fill layer ``i``'s QuantLinears from the checkpoint (``prefix``: the layer's name there) and post-init."""
        import torch

        templates = self.templates.setdefault(i, {n: m for n, m in layer.named_modules() if isinstance(m, self.kind)})
        for name, template in templates.items():
            fresh = copy.deepcopy(template)
            for leaf, buf in list(fresh._buffers.items()):
                full = f"{prefix}.{name}.{leaf}"
                if full in reader:
                    fresh._buffers[leaf] = reader.read(full).to(self.device, buf.dtype)
                elif buf is not None and buf.is_meta:
                    fresh._buffers[leaf] = None  # built by post-init (shift tables), if the kernel has any
            layer.set_submodule(name, fresh)
        with torch.inference_mode(False):
            self._post_init(layer)
        missing = [f"{prefix}.{n}.{leaf}" for n, m in layer.named_modules() if isinstance(m, self.kind)
                   for leaf, b in m._buffers.items() if b is not None and b.is_meta]
        if missing:
            raise ModelLoadError(f"{missing[0]} is neither in the {self.format_name} checkpoint nor built by GPTQModel's "
                                 "post-init — "
                                 "this artifact is not run layer by layer; raise --max-memory so it loads whole")

    def _post_init(self, layer) -> None:
        """``GPTQQuantizer.post_init_model`` on one layer: the v1 zero points converted where the kernel needs v2,
        then each QuantLinear's ``post_init``. Its last step, a cache flush (a full ``gc.collect``, seconds in a
        process this size, once per layer and pass), is left out; kernels that need a model-wide scratch space
        (ExLlama) get the whole of it."""
        from gptqmodel.utils.model import hf_convert_gptq_v1_to_v2_format

        q = self.quantizer
        if hasattr(self.kind, "scratch_space_fixed"):
            q.post_init_model(layer)
            return
        hf_convert_gptq_v1_to_v2_format(layer, q.bits, q.quant_linear, q.format, q.meta)
        for module in layer.modules():
            if isinstance(module, self.kind):
                module.post_init()

    def release(self, layer, i: int) -> None:
        """Put layer ``i``'s meta QuantLinears back and free the fresh ones' tensors now.

        A post-initialised QuantLinear sits in reference cycles (one: GPTQModel's torch kernel keeps its compiled
        ``dequantize_weight``, a bound method of the module, on the module), so dropping the module frees nothing
        until the cyclic collector runs: on Qwen2.5-Coder-1.5B's gptq-w8 the packed layers piled up (2.35 GB held
        against 1.18 planned). Emptying its buffers frees the packed weights at once; the small shell goes with
        the next collection."""
        for name, template in self.templates.get(i, {}).items():
            fresh = layer.get_submodule(name)
            if fresh is not template:
                for leaf in fresh._buffers:
                    fresh._buffers[leaf] = None
            layer.set_submodule(name, template)



class AwqLayers(GptqLayers):
    """transformers' AWQ quantizer of an AWQ artifact's config, applied to ``model`` (on meta) at construction: the
    linears it converts (all but those it keeps, the head among them) become the kernel class it selects."""

    format_name = "AWQ"

    def __init__(self, model, config, device: str):
        import torch
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear
        from transformers import AwqConfig
        from transformers.quantizers.quantizer_awq import AwqQuantizer

        AwqQuantizer(AwqConfig.from_dict(config.quantization_config))._process_model_before_weight_loading(
            model, device_map={"": torch.device(device)})
        kinds = {type(m) for m in model.modules() if isinstance(m, BaseQuantLinear)}
        if len(kinds) != 1:
            raise ModelLoadError(f"transformers' AWQ integration made {len(kinds)} kernel classes of this model's "
                                 "linears — this artifact is not run layer by layer; raise --max-memory so it loads "
                                 "whole")
        self.kind, self.device = kinds.pop(), device
        self.templates: dict[int, dict[str, object]] = {}

    def _post_init(self, layer) -> None:
        for module in layer.modules():
            if isinstance(module, self.kind):
                module.post_init()
