"""A GGUF file dequantized once into an HF directory under QUANTLAB_HOME/models, checked against free memory first.

The default ``smollm2-135m`` is a Q4_1 GGUF, so the "fp" baseline of a GGUF model is that file dequantized, not
the original bf16 checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from quantlab.errors import ModelLoadError
from quantlab.fsutil import atomic_write_json, cached_entry, file_lock
from quantlab.gguf_file import gguf_note, gguf_reader, gguf_weights
from quantlab.home import quantlab_home
from quantlab.models.fingerprint import cached_sha256
from quantlab.models.load import first_line
from quantlab.provenance import require_library


SOURCE_INFO = "quantlab-source.json"  # beside a converted model: the GGUF it came from, its sha256 and mix

def convert_gguf(gguf: Path) -> tuple[Path, str]:
    """Dequantize a GGUF into a cached HF directory once (parsing takes ~20-50 s); later calls reuse it."""
    require_library("gguf", "gguf conversion")
    digest = cached_sha256(gguf)
    target = quantlab_home() / "models" / f"{gguf.stem}-{digest[:12]}"
    marker = target / SOURCE_INFO
    cached_entry(target, lambda tmp: _convert_into(gguf, digest, tmp),
                 is_complete=lambda d: (d / marker.name).is_file())
    info = json.loads(marker.read_text())
    if "tensor_types" not in info:  # converted before the note named the file type and the mix
        with file_lock(target.parent / f".{target.name}.lock"):
            info = {**json.loads(marker.read_text()), **_gguf_info(gguf)}
            atomic_write_json(marker, info)
    return target, info["note"]


def _gguf_info(gguf: Path) -> dict:
    file_type, mix = gguf_weights(gguf)
    return {"file_type": file_type, "tensor_types": {name: round(share, 4) for name, share in mix},
            "note": gguf_note(gguf, file_type, mix)}


def conversion_peak_bytes(gguf: Path) -> int:
    """Predicted peak memory of converting ``gguf``: transformers dequantizes every tensor to fp32 before the
    model is saved, so fp32 weights + the GGUF file (memory-mapped) + the largest tensor's fp32 copy in flight.
    Measured: 9.30 GB (GNU time: 9,083,744 KiB) for Qwen2.5-Coder-1.5B Q4_K_M, predicted 9.16 (reports/bench/fetch.txt)."""
    sizes = [int(t.n_elements) * 4 for t in gguf_reader(gguf).tensors]
    return sum(sizes) + gguf.stat().st_size + max(sizes, default=0)


def available_memory_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def _check_conversion_memory(gguf: Path) -> None:
    """The one-time conversion runs outside any --max-memory budget; it is checked against the machine first."""
    need, have = conversion_peak_bytes(gguf), available_memory_bytes()
    if need > have:
        raise ModelLoadError(f"Converting {gguf.name} needs about {need / 1e9:.1f} GB of memory and "
                             f"{have / 1e9:.1f} GB is available — free memory, or convert it once on a larger "
                             "machine and pass the HF directory with --model")


def _convert_into(gguf: Path, digest: str, tmp: Path) -> None:
    """Dequantize ``gguf`` and save the HF directory into ``tmp`` (the cache entry's temp dir)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _check_conversion_memory(gguf)
    info = _gguf_info(gguf)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except Exception as exc:  # transformers raises many types for an unreadable GGUF
        raise ModelLoadError(f"Could not convert GGUF {gguf}: {first_line(exc)} — check the file is a llama.cpp GGUF "
                             "of a causal LM transformers supports") from None
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    atomic_write_json(tmp / SOURCE_INFO, {"gguf": str(gguf), "gguf_sha256": digest, **info})
