"""A model's memory-relevant shapes, read from its config alone.

The config's own transformers class is instantiated on the meta device (no weights, no memory), so the
planner sees exactly the modules ``from_pretrained`` would create: every ``nn.Linear`` a method
quantizes, fused expert stacks of mixture-of-experts layers, embeddings (tied weights once), norms,
biases and buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quantlab.errors import ModelLoadError
from quantlab.models.shapes import linear_dims, meta_model

#: The most decoder layers quantlab builds a model of. The planner and every method see each linear by name (a
#: fit allocates per linear), so the work is per layer (about 1 ms each, on the meta device); 1024 is 8x the
#: deepest published causal LM (Llama-3.1-405B: 126 layers) and plans in about a second, while a config of 10^7
#: layers would take hours and is a typo.
MAX_LAYERS = 1024
#: Shape fields every planned model's (text) config gives, and those it may give; each a positive integer.
REQUIRED_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
OPTIONAL_FIELDS = ("intermediate_size", "num_key_value_heads", "head_dim", "max_position_embeddings")


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
    buffer_bytes: int  # rotary tables and other buffers made in a dtype of their own, at that dtype
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
    """Enumerate the modules of ``config``'s causal LM on the meta device (``check_config`` first)."""
    import torch

    check_config(config)
    model = meta_model(_in_float64(config), trust_remote_code)
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
            dims = linear_dims(module) if module is not out else None  # nn.Linear or GPT-2's Conv1D: (out, in)
            if dims and pname == "weight":
                linears.append(LinearShape(name, *dims))
            elif type(module).__name__.endswith("Experts") and p.dim() == 3:
                linears.append(LinearShape(full, p.shape[1], p.shape[2], count=p.shape[0]))
            else:
                parts[_part(module, pname, inp, out)] += p.numel()
                if dims and pname == "bias":
                    biases.append((name, p.numel()))
    # a buffer made in the model's dtype (Gemma3's embed_scale) is held in the dtype the model loads in, as its
    # parameters are ("other" elements); one made in a dtype of its own (rotary tables: float32) keeps it
    buffers = sum(b.numel() * b.element_size() for _, b in model.named_buffers() if b.dtype != torch.float64)
    parts["other"] += sum(b.numel() for _, b in model.named_buffers() if b.dtype == torch.float64)
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


def check_config(config, require: tuple[str, ...] = REQUIRED_FIELDS) -> None:
    """The config's shape fields, checked before any module is built: one line naming the field, where a zero, a
    negative or a missing count would otherwise be a ZeroDivisionError or a negative dimension deep in the
    planner, and an absurd layer count hours of building. ``require``: the fields it must give (the planner
    reads them all; a model without attention heads can still be quantized). A field the config leaves out
    takes its transformers default, as ``from_pretrained`` would build it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    where = _config_name(config)
    shape = {name: getattr(text, name, None) for name in REQUIRED_FIELDS + OPTIONAL_FIELDS}
    for name, value in shape.items():
        if value is None and name in require:
            raise ModelLoadError(f"{where} gives no {name} — quantlab plans a causal LM from its "
                                 f"{', '.join(REQUIRED_FIELDS)}")
        if value is not None and (type(value) is not int or value < 1):
            raise ModelLoadError(f"{where}: {name} must be a positive integer (got {value!r}) — fix it in the config")
    if (shape["num_hidden_layers"] or 0) > MAX_LAYERS:
        raise ModelLoadError(f"{where}: num_hidden_layers is {shape['num_hidden_layers']:,}, over the {MAX_LAYERS} "
                             "layers quantlab builds (the deepest published causal LMs have about 126) — fix it "
                             "in the config")
    heads, kv, hidden = shape["num_attention_heads"], shape["num_key_value_heads"], shape["hidden_size"]
    if heads and kv and heads % kv:
        raise ModelLoadError(f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                             f"({kv}) — fix one of them in the config")
    if heads and hidden and shape["head_dim"] is None and hidden % heads:
        raise ModelLoadError(f"{where}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) "
                             "and no head_dim is given — fix one of them, or give head_dim")


def require_linears(count: int, where: str, why: str = "nothing to plan") -> None:
    """A model with no linear layer a method quantizes: every quantized recipe would be the fp model under another
    name (0 quantized bytes), and the planner's bits per weight would divide by zero."""
    if not count:
        raise ModelLoadError(f"{where} has no linear layer a method quantizes (nn.Linear or Conv1D outside the "
                             f"output head): {why} — quantlab quantizes the linear layers of a causal LM")


def _config_name(config) -> str:
    path = getattr(config, "_name_or_path", "") or ""
    return f"The config of {path}" if path else f"The {getattr(config, 'model_type', '')} config"


def _in_float64(config):
    """A copy of ``config`` whose model is built in float64, a dtype no checkpoint is loaded in: what comes out in
    float64 follows the model's dtype, and what does not has a dtype of its own."""
    import copy

    import torch

    config = copy.deepcopy(config)
    for part in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: config)())}.values():
        part.dtype = torch.float64
    return config


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
