"""Memory as it really is: bytes of every tensor a loaded model holds, quantization statistics included.

``get_memory_footprint()`` counts parameters and buffers but not bitsandbytes' 4-bit quant_state
(absmax, code, nested statistics), so it undercounts 4-bit models by a few percent. Here each
parameter is expanded into the tensors that actually hold its data: a bnb Params4bit into its packed
bytes plus quant_state tensors, an Int8Params into int8 data plus row scales (SCB), a torchao tensor
subclass into its flattened components (qdata, scale, zero_point). GPTQ's QuantLinear holds its weight in plain
int32 and fp16 buffers (qweight, qzeros, scales, g_idx and its kernel's shift tables), counted as quantized by
the module that holds them; so are an FP8 linear's float8 weight and its scale.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

# The host's RSS readers live with the device (a CPU device's memory is the process's); re-exported here.
from quantlab.device import (CPU, anon_rss_bytes, as_device, current_rss_bytes, peak_rss_bytes,  # noqa: F401
                             reset_peak_rss)
from quantlab.fsutil import dir_bytes

DEFINITIONS = {
    "weights_bytes": "bytes of all parameters and buffers as loaded, quantization statistics included, tied weights once",
    "disk_bytes": "bytes of the artifact's weight files",
    "quantized_bytes": "bytes of the quantized weights with their statistics: int8/uint8 tensors (bitsandbytes, with "
                       "their quant_state and row scales; HQQ, with the scale and zero of its meta), tensor "
                       "subclasses (torchao), and every tensor of a GPTQ packed linear but its bias (qweight, "
                       "qzeros, scales, g_idx, shift tables)",
    "unquantized_bytes": "bytes of everything else as loaded: embeddings, norms, an untied head, biases, buffers",
    "peak_bytes": "peak RSS of the bench process on CPU; max reserved CUDA memory on GPU",
    "held_peak_bytes": "what a step held at its peak above its libraries: peak RSS (VmHWM) minus RSS after the step's "
                       "libraries were imported; on CUDA, max reserved GPU memory. RSS counts the pages of a checkpoint "
                       "transformers memory-maps (its weights, when loaded without a copy); layer-by-layer steps read "
                       "with plain reads and hold only what they copy. peak_anon_bytes (RssAnon, sampled every 5 ms) "
                       "is beside it",
}


def tensor_bytes(t) -> int:
    """Bytes held by one tensor, expanding quantized tensor types into their components."""
    total = _plain_bytes(t)
    state = getattr(t, "quant_state", None)
    if state is not None:
        total += _quant_state_bytes(state)
    scb = getattr(t, "SCB", None)
    if scb is not None:
        total += _plain_bytes(scb)
    return total


def _plain_bytes(t) -> int:
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t).__name__ not in ("Params4bit", "Int8Params", "Parameter"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


def _quant_state_bytes(state) -> int:
    total = 0
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if value is not None and hasattr(value, "element_size"):
            total += value.numel() * value.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested)
    return total


def weight_bytes(model) -> dict:
    """Bytes of parameters and buffers (tied weights counted once), split into quantized and not."""
    import torch

    seen: set[int] = set()
    quantized = other = 0
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    packed = packed_linear_tensors(model)
    outside = held_outside_parameters(model)
    tensors += outside
    packed |= {id(t) for name, t in outside if name != "bias"}
    for _, t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        nbytes = tensor_bytes(t)
        is_quant = (t.dtype in (torch.int8, torch.uint8) or type(t) not in (torch.Tensor, torch.nn.Parameter)
                    or id(t) in packed)
        if is_quant:
            quantized += nbytes
        else:
            other += nbytes
    return {"weights_bytes": quantized + other, "quantized_bytes": quantized, "unquantized_bytes": other}


def held_outside_parameters(model) -> list[tuple[str, object]]:
    """Tensors a layer holds that are neither parameters nor buffers: an HQQLinear's (hqq) scale and zero, kept in
    its ``meta`` dict, and its bias, a plain attribute. Without them HQQ's bytes as loaded would lack its scales."""
    import torch

    out = []
    for module in model.modules():
        meta = getattr(module, "meta", None)
        if isinstance(meta, dict) and hasattr(module, "W_q"):
            out += [(key, t) for key, t in meta.items() if isinstance(t, torch.Tensor)]
            if isinstance(getattr(module, "bias", None), torch.Tensor):
                out.append(("bias", module.bias))
    return out


def packed_linear_tensors(model) -> set[int]:
    """ids of the tensors of GPTQ packed linears (a module holding a ``qweight``) and of FP8 linears (a float8 weight
    beside its ``weight_scale``), their bias excepted."""
    return {id(t) for module in model.modules() if hasattr(module, "qweight") or _holds_float8(module)
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            if name != "bias"}


def _holds_float8(module) -> bool:
    return "float8" in str(getattr(getattr(module, "weight", None), "dtype", ""))


def disk_bytes(path: str | Path) -> int:
    return dir_bytes(path)


@contextlib.contextmanager
def measure_memory(preload: tuple[str, ...] = ("torch", "transformers"), device: str = CPU, interval: float = 0.005):
    """Yields a dict that, when the block ends, holds the block's memory (see ``held_peak_bytes``).

    ``preload`` is imported first, so the baseline includes the libraries the block uses."""
    import importlib

    for name in preload:
        importlib.import_module(name)
    reset_peak_rss()
    out: dict = {"baseline_anon_bytes": anon_rss_bytes(), "baseline_rss_bytes": current_rss_bytes()}
    peak = [out["baseline_anon_bytes"]]
    stop = threading.Event()

    def sample():
        while not stop.wait(interval):
            peak[0] = max(peak[0], anon_rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], anon_rss_bytes())
        out.update(peak_anon_bytes=peak[0], peak_rss_bytes=peak_rss_bytes())
        out["held_peak_bytes"] = as_device(device).memory.held_peak(out["peak_rss_bytes"] - out["baseline_rss_bytes"])


def return_freed_memory() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mapping, returned to the system when freed.

    By default glibc raises its mmap threshold after each large free (up to 32 MiB), so a step that allocates and
    frees a layer's tensors again and again keeps the freed memory in its heap, held but unused. Under a memory
    budget a step holds what it uses (Linux/glibc; a no-op elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    """Return the heap's freed memory to the system now (glibc's ``malloc_trim``; a no-op elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
