"""Storage layouts: how a quantized model's weights are held once loaded, apart from the algorithms that fill them.

A layout owns its bytes formula (``linear_bytes``: the planner reads layouts only), the dtype of what it leaves
unquantized, the ``from_pretrained`` kwargs that load it, whether its latency can be measured on a device, and
the libraries it needs. An algorithm (``quantlab.methods``) names its layout with ``Method.layout(config)``:
RTN, torchao and QAT all fill the intx layout; GPTQ, and RTN with ``format: gptq``, the packed GPTQ layout.
"""

from __future__ import annotations

from typing import ClassVar

from quantlab.device import as_device
from quantlab.models.load import load_causal_lm


#: Python source defining ``load(path)`` for a plain transformers checkpoint (see ``Layout.standalone_load``)
TRANSFORMERS_LOAD = """
def load(path):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
"""


class Layout:
    libraries: ClassVar[tuple[str, ...]] = ()
    #: how a user loads an artifact of this layout in a fresh process without quantlab: Python source defining
    #: ``load(path)``, which returns a model whose ``model(ids).logits`` are the artifact's (the contract tests run
    #: it); plain ``from_pretrained`` for every layout transformers reloads
    standalone_load: ClassVar[str] = TRANSFORMERS_LOAD
    #: whether ``quantlab.layerwise`` can run an artifact of this layout one decoder layer at a time
    layer_by_layer: ClassVar[bool] = False
    #: whether loading copies the quantized linears out of the memory-mapped checkpoint, so that while a model
    #: loads its pages and the copies are resident together (the planner adds them once)
    load_copies_linears: ClassVar[bool] = False
    #: with ``load_copies_linears``: the load copies the unquantized tensors (embeddings, head, norms) too
    load_copies_everything: ClassVar[bool] = False
    #: whether the layout stores linear weights as codes (integers, packed words, 8-bit floats): an artifact of such a
    #: layout that holds no tensor of that kind quantized nothing, and the quantize step refuses it
    quantizes: ClassVar[bool] = True
    #: the engines that can run an artifact of this layout, the first its default (``quantlab.engines``)
    engines: ClassVar[tuple[str, ...]] = ("transformers",)

    def linear_bytes(self, out_features: int, in_features: int, device: str) -> dict[str, int]:
        """Predicted bytes one quantized ``nn.Linear`` weight (out, in) holds once loaded on ``device``.

        Split into ``data`` (the integers or floats of the weight) and ``scales`` (per-group scales, zero
        points, absmax and codebooks, group indices): the overhead memory calculators forget. Bias excluded.
        """
        raise NotImplementedError

    def named_linear_bytes(self, name: str, out_features: int, in_features: int, device: str) -> dict[str, int]:
        """``linear_bytes`` of the linear ``name``: the same for every linear but in a mixed layout."""
        return self.linear_bytes(out_features, in_features, device)

    def head_bytes(self, head, elements: int, device: str) -> int:
        """Bytes of the output head's ``elements`` (weight and bias; 0 when tied to the embedding); ``head`` is its
        shape (a ``LinearShape``) when untied, else None. Every layout here leaves it unquantized; a mixed one may
        not."""
        return elements * self.unquantized_dtype_bytes(device)

    def weight_terms(self, shapes, device: str) -> dict[str, int] | None:
        """The model's bytes as loaded, by component, for a layout that counts them its own way (GGUF: tensor by
        tensor); None: ``linear_bytes`` per linear and the unquantized parts at their dtype (``quantlab.plan.terms``)."""
        return None

    def stored_types(self, artifact) -> dict[str, str] | None:
        """Each stored tensor's type, for a layout whose files are not safetensors; None: read the safetensors."""
        return None

    def note(self) -> str:
        """One line naming what ``linear_bytes`` counts, for the planner's arithmetic."""
        return ""

    def unquantized_dtype_bytes(self, device: str) -> int:
        """Bytes per element of the parts left alone (embeddings, norms, biases, lm_head)."""
        return as_device(device).default_dtype_bytes

    def bias_dtype_bytes(self, device: str) -> int:
        """Bytes per element of a quantized layer's bias (most layouts keep it at the unquantized dtype)."""
        return self.unquantized_dtype_bytes(device)

    def engine_terms(self, shapes, windows: int, tokens: int) -> dict[str, int] | None:
        """What the layout's own engine holds beside the weights while it scores ``windows`` windows of ``tokens``
        tokens (``windows`` 0: one sequence, as a bench or lm-eval request), by component; None for a layout that
        transformers runs, whose forward the planner models itself (``quantlab.plan.steps``)."""
        return None

    def load_terms(self, shapes, device: str) -> dict[str, int]:
        """What a model of this layout loaded whole holds beside its weights as loaded, by component: keys
        ``"load: ..."`` only while it loads (pages it reads, a conversion in flight), the rest throughout (what a
        kernel converts its tensors into beyond the layout's bytes). Nothing by default."""
        return {}

    def dequantize_bytes_per_value(self, device: str) -> int:
        """Bytes per weight value a linear's kernel holds in flight while it dequantizes that linear (the planner
        counts it for the largest linear); the default is one copy at the unquantized dtype."""
        return self.unquantized_dtype_bytes(device)

    def load_kwargs(self, device: str) -> dict:
        """Extra ``from_pretrained`` kwargs for loading an artifact of this layout."""
        return {"dtype": as_device(device).checkpoint_dtype}

    def load(self, path: str, device: str, trust_remote_code: bool = False):
        """The artifact at ``path`` loaded whole, with plain ``from_pretrained`` and ``load_kwargs``."""
        return load_causal_lm(path, device=device, trust_remote_code=trust_remote_code, **self.load_kwargs(device))

    def prepare(self, model, device: str) -> None:
        """Run once on a model loaded whole, after it is weighed and before its first forward: a kernel's one-time
        conversion of its tensors (AWQ on CPU). Nothing by default."""

    def latency_skipped(self, device: str) -> str | None:
        """None when latency can be measured on ``device``; otherwise the reason it is not."""
        return None


def groups_of(group_size: int, in_features: int) -> int:
    """Quantization groups along the input dimension (-1: one group per output channel)."""
    return 1 if group_size == -1 else -(-in_features // group_size)
