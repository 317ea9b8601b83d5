"""Each memory term of the planner, one small function each, so each can be checked by hand.

Units are bytes. Definitions:

- linear data / scales: ``Layout.linear_bytes`` of every quantized linear weight (see quantlab/layouts/);
- unquantized: embeddings, lm_head (unless tied: counted once; a fit's mixed GPTQ layout may quantize an untied
  one, ``Layout.head_bytes``), norms, biases and routers at the dtype the method leaves them in (fp32 on CPU, bf16
  on CUDA unless the recipe names one; GPTQ biases fp16); buffers at their own dtype;
- KV cache: 2 (K and V) x layers x kv_heads x head_dim x tokens x batch x bytes, where a sliding-window
  layer holds at most ``sliding_window`` tokens (GQA through kv_heads);
- prefill activations: the transient peak of one forward over the prompt; see ``activation_bytes``;
- runtime: a constant for the CUDA context and library workspaces, outside PyTorch's allocator.
"""

from __future__ import annotations

from quantlab.device import CUDA_RUNTIME_BYTES, as_device  # noqa: F401 (CUDA_RUNTIME_BYTES re-exported)
from quantlab.plan.shapes import ModelShapes


def weight_terms(layout, shapes: ModelShapes, device: str) -> dict[str, int]:
    """Bytes of the model as loaded in ``layout`` (a ``quantlab.layouts.Layout``), by component."""
    own = layout.weight_terms(shapes, device)
    if own is not None:
        return own
    data = scales = 0
    for lin in shapes.linears:
        per = layout.named_linear_bytes(lin.name, lin.out_features, lin.in_features, device)
        data += lin.count * per["data"]
        scales += lin.count * per["scales"]
    elem = layout.unquantized_dtype_bytes(device)
    parts = shapes.unquantized
    return {
        "linear_data": data,
        "linear_scales": scales,
        "embeddings": parts["embeddings"] * elem,
        "lm_head": layout.head_bytes(shapes.head, parts["lm_head"], device),
        "norms_biases_other": (parts["norms"] + parts["other"]) * elem
                              + parts["biases"] * layout.bias_dtype_bytes(device),
        "buffers": shapes.buffer_bytes,
    }


def kv_cache_bytes(shapes: ModelShapes, context: int, batch: int, elem: int) -> int:
    full = shapes.layers - shapes.sliding_layers
    windowed = min(context, shapes.sliding_window) if shapes.sliding_window else context
    tokens = full * context + shapes.sliding_layers * windowed  # summed over layers
    return 2 * shapes.kv_heads * shapes.head_dim * tokens * batch * elem


def activation_bytes(shapes: ModelShapes, context: int, batch: int, elem: int) -> int:
    """Peak transient bytes of one prefill forward over ``context`` tokens (generate's prefill keeps the
    logits of the last position only, in fp32).

    Inside the MLP, gate, up and act(gate)*up coexist (3 x intermediate per token; for a mixture of experts
    the routed copies, experts_per_token x that), beside the residual stream and the normed input
    (2 x hidden); attention runs through SDPA, which does not materialise the context x context scores.
    """
    per_token = 2 * shapes.hidden + 3 * shapes.intermediate * shapes.experts_per_token
    return batch * context * per_token * elem + batch * shapes.vocab * 4


def runtime_bytes(device: str) -> int:
    """Memory the runtime holds outside torch's allocator on ``device`` (``Device.runtime_bytes``)."""
    return as_device(device).runtime_bytes
