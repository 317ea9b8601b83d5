"""A model's memory-relevant shapes, read from its config alone.

The config's own transformers class is instantiated on the meta device (no weights, no memory), so the
planner sees exactly the modules ``from_pretrained`` would create: every ``nn.Linear`` a method
quantizes, fused expert stacks of mixture-of-experts layers, embeddings (tied weights once), norms,
biases and buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quantlab.models import meta_model


@dataclass(frozen=True)
class LinearShape:
    name: str
    out_features: int
    in_features: int
    count: int = 1  # > 1 for a fused stack of experts (count, out, in)

    @property
    def weights(self) -> int:
        return self.count * self.out_features * self.in_features


@dataclass(frozen=True)
class ModelShapes:
    model_type: str
    params: int  # every parameter, tied weights once
    linears: tuple[LinearShape, ...]  # the weights a method quantizes (lm_head excluded)
    unquantized: dict[str, int]  # elements left unquantized, by part: embeddings, lm_head, norms, biases, other
    buffer_bytes: int  # rotary tables and other buffers, at their own dtype
    tied: bool
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    sliding_window: int | None
    sliding_layers: int  # layers whose KV cache is capped at sliding_window tokens
    max_positions: int | None
    experts_per_token: int = 1
    notes: tuple[str, ...] = field(default_factory=tuple)
    linear_biases: tuple[tuple[str, int], ...] = ()  # (linear name, bias elements) of each quantized linear's bias
    head: LinearShape | None = None  # the output linear when it is not tied to the input embedding

    @property
    def quantized_weights(self) -> int:
        return sum(lin.weights for lin in self.linears)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) per layer, the form ``Method.check_model`` takes."""
        return {lin.name: (lin.out_features, lin.in_features) for lin in self.linears}


def model_shapes(config, trust_remote_code: bool = False) -> ModelShapes:
    """Enumerate the modules of ``config``'s causal LM on the meta device."""
    import torch

    model = meta_model(config, trust_remote_code)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and out.weight is inp.weight
    linears, biases, seen, head = [], [], set(), None
    parts = {"embeddings": 0, "lm_head": 0, "norms": 0, "biases": 0, "other": 0}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{name}.{pname}" if name else pname
            if module is out and not tied and isinstance(module, torch.nn.Linear) and pname == "weight":
                head = LinearShape(name, module.out_features, module.in_features)
            if isinstance(module, torch.nn.Linear) and module is not out and pname == "weight":
                linears.append(LinearShape(name, module.out_features, module.in_features))
            elif type(module).__name__.endswith("Experts") and p.dim() == 3:
                linears.append(LinearShape(full, p.shape[1], p.shape[2], count=p.shape[0]))
            else:
                parts[_part(module, pname, inp, out)] += p.numel()
                if isinstance(module, torch.nn.Linear) and module is not out and pname == "bias":
                    biases.append((name, p.numel()))
    buffers = sum(b.numel() * b.element_size() for _, b in model.named_buffers())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    window, sliding = _sliding(text)
    return ModelShapes(
        model_type=config.model_type, params=sum(p.numel() for p in model.parameters()), linears=tuple(linears),
        unquantized=parts, buffer_bytes=buffers, tied=tied, layers=text.num_hidden_layers,
        hidden=text.hidden_size, intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size,
        sliding_window=window, sliding_layers=sliding,
        max_positions=getattr(text, "max_position_embeddings", None),
        experts_per_token=getattr(text, "num_experts_per_tok", None) or 1, linear_biases=tuple(biases),
        head=head,
    )


def _part(module, pname: str, inp, out) -> str:
    if module is inp:
        return "embeddings"
    if module is out:
        return "lm_head"
    if "norm" in type(module).__name__.lower():
        return "norms"
    if pname == "bias":
        return "biases"
    return "other"


def _sliding(text) -> tuple[int | None, int]:
    """(window, number of layers that use it). ``layer_types`` (Gemma-2's alternation) wins; otherwise a
    ``sliding_window`` applies to every layer unless ``use_sliding_window`` is false (Qwen2)."""
    window = getattr(text, "sliding_window", None)
    if not window:
        return None, 0
    types = getattr(text, "layer_types", None)
    if types:
        n = sum(1 for t in types if t == "sliding_attention")
        return (window, n) if n else (None, 0)
    if getattr(text, "use_sliding_window", True) is False:
        return None, 0
    return window, text.num_hidden_layers
