"""Prefill latency and decode throughput, after warm-up, with every raw sample kept.

Decode is a greedy loop of single-token forwards through a KV cache. Two cache paths exist in
transformers: the dynamic cache (grows by concatenation) and the static cache (preallocated; on an
H200 it decoded an 8B bf16 model at 141.9 tok/s vs 49.6 dynamic). Each model is timed on both
once and measured on the faster path that works; the choice and the trial times are recorded.
On CUDA, timings use CUDA events with synchronisation; on CPU, time.perf_counter.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from quantlab.device import as_device
from quantlab.errors import MeasurementError

# Peak HBM bandwidth in bytes/s of GPUs we know (NVIDIA's datasheets), by the words of the device name
# (``gpu_key``): "NVIDIA H100 80GB HBM3" is an H100 SXM, "NVIDIA A100-SXM4-40GB" an A100 at 1.555 TB/s.
HBM_BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12,
                 "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100": 1.555e12, "L40S": 0.864e12,
                 "L40": 0.864e12, "L4": 0.3e12, "RTX 4090": 1.008e12, "RTX 5090": 1.792e12, "V100": 0.9e12,
                 "T4": 0.32e12}


DECODE_PATHS = {
    "dynamic": "greedy single-token forwards, transformers DynamicCache, eager",
    "static": "greedy single-token forwards, transformers StaticCache (preallocated), eager",
}

DEFINITIONS = {
    "prefill_ms": "median latency of one forward over the prompt at batch 1",
    "decode_tok_s": "median generated tokens/s (batch x steps / time) of a greedy KV-cache loop, per batch size",
}


@dataclass(frozen=True)
class LatencySettings:
    prompt_tokens: int = 128
    decode_tokens: int = 32
    batch_sizes: tuple[int, ...] = (1, 8)
    warmup: int = 1
    repetitions: int = 5

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LatencySettings":
        return cls(**{k: tuple(v) if k == "batch_sizes" else v for k, v in data.items()})


@dataclass
class Timer:
    """Times each block it wraps with the device's clock (``Device.clock``) and keeps every sample, in seconds."""
    device: str
    samples: list = field(default_factory=list)

    def __enter__(self):
        self._clock = as_device(self.device).clock()
        self._mark = self._clock.start()
        return self

    def __exit__(self, *exc):
        self.samples.append(self._clock.elapsed(self._mark))
        return False


def median_iqr(values) -> dict:
    import numpy as np

    arr = np.asarray(values, dtype=float)
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return {"median": float(med), "iqr": float(q3 - q1), "n": int(arr.size)}


def _prompt(model, batch: int, tokens: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (batch, tokens), generator=gen).to(model.device)


def _make_cache(model, path: str, ids, steps: int):
    from transformers import DynamicCache, StaticCache

    if path == "static":
        return StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps)
    return DynamicCache()


def _prefill(model, ids, steps: int, path: str):
    """Fill a fresh cache of ``path``'s kind with the prompt; returns (cache, first greedy token)."""
    import torch

    cache = _make_cache(model, path, ids, steps)
    out = model(ids, past_key_values=cache, use_cache=True,
                cache_position=torch.arange(ids.shape[1], device=ids.device))
    return cache, out.logits[:, -1:].argmax(-1)


def _decode_from(model, cache, nxt, length: int, steps: int, timer: Timer | None):
    """``steps`` greedy single-token forwards through a prefilled cache (timed)."""
    import contextlib

    import torch

    with timer if timer is not None else contextlib.nullcontext():
        for i in range(steps):
            pos = torch.tensor([length + i], device=nxt.device)
            out = model(nxt, past_key_values=cache, use_cache=True, cache_position=pos)
            nxt = out.logits[:, -1:].argmax(-1)
    return nxt


def _decode(model, ids, steps: int, path: str, timer: Timer | None):
    """Prefill (untimed), then ``steps`` greedy single-token forwards through the cache (timed)."""
    cache, nxt = _prefill(model, ids, steps, path)
    return _decode_from(model, cache, nxt, ids.shape[1], steps, timer)


def choose_decode_path(model, settings: LatencySettings, device: str) -> dict:
    """Time each KV-cache path once at batch 1 (after one warm-up) and keep the faster that works."""
    trials = {}
    ids = _prompt(model, 1, settings.prompt_tokens)
    for path in DECODE_PATHS:
        timer = Timer(device)
        try:
            _decode(model, ids, settings.decode_tokens, path, None)
            _decode(model, ids, settings.decode_tokens, path, timer)
        except Exception as exc:  # a method whose layers do not support a cache type: record and skip
            trials[path] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            continue
        trials[path] = timer.samples[0]
    working = {p: t for p, t in trials.items() if isinstance(t, float)}
    if not working:
        failures = "; ".join(f"{p} cache {t}" for p, t in trials.items())
        raise MeasurementError(f"Decode failed on both KV-cache paths ({failures}), so its latency cannot be "
                               f"measured on {device} — fix what the errors name, or leave the recipe out")
    return {"chosen": min(working, key=working.get), "trial_s": trials}


def measure_latency(model, settings: LatencySettings, device: str) -> dict:
    """Prefill ms (batch 1) and decode tokens/s per batch size; median, IQR and raw samples."""
    import copy

    import torch

    result = {"settings": settings.to_dict(), "timer": as_device(device).clock().name}
    with torch.inference_mode():
        choice = choose_decode_path(model, settings, device)
        path = choice["chosen"]
        result["decode_path"] = {**choice, "description": DECODE_PATHS[path]}
        ids = _prompt(model, 1, settings.prompt_tokens)
        prefill = Timer(device)
        for i in range(settings.warmup + settings.repetitions):
            with prefill if i >= settings.warmup else Timer(device):
                model(ids, use_cache=True)
        result["prefill_ms"] = median_iqr([s * 1000 for s in prefill.samples])
        result["prefill_ms_samples"] = [s * 1000 for s in prefill.samples]
        result["decode_tok_s"] = {}
        result["decode_tok_s_samples"] = {}
        for batch in settings.batch_sizes:
            # One prefill per batch size; each repetition decodes from a copy of the prefilled cache.
            ids = _prompt(model, batch, settings.prompt_tokens)
            cache, first = _prefill(model, ids, settings.decode_tokens, path)
            timer = Timer(device)
            for i in range(settings.warmup + settings.repetitions):
                _decode_from(model, copy.deepcopy(cache), first, ids.shape[1], settings.decode_tokens,
                             timer if i >= settings.warmup else None)
            rates = [batch * settings.decode_tokens / s for s in timer.samples]
            result["decode_tok_s"][str(batch)] = median_iqr(rates)
            result["decode_tok_s_samples"][str(batch)] = rates
    return result


def not_measured(settings: LatencySettings, reason: str) -> dict:
    """The latency record of a recipe whose kernels cannot be timed meaningfully on this device."""
    return {"settings": settings.to_dict(), "skipped": reason, "prefill_ms": None, "prefill_ms_samples": [],
            "decode_tok_s": {}, "decode_tok_s_samples": {}, "decode_path": None}


def roofline(device_name: str, bytes_per_step: int, steps_per_s: float) -> dict | None:
    """Decode as % of the HBM roofline: each decode step reads at least the weights once."""
    key = gpu_key(device_name)
    if key is None:
        return None
    bandwidth, achieved = HBM_BANDWIDTH[key], bytes_per_step * steps_per_s
    return {"bandwidth_bytes_s": bandwidth, "achieved_bytes_s": achieved,
            "percent_of_roofline": 100.0 * achieved / bandwidth, "gpu_key": key}


def gpu_key(device_name: str) -> str | None:
    """The HBM_BANDWIDTH entry whose words appear in the device name as whole words, in a row (so "L4" is not
    "NVIDIA L40S"); of several, the one with the most words ("H100 PCIe" over "H100"). None: not a GPU we know."""
    words = _words(device_name)
    found = [key for key in HBM_BANDWIDTH
             if any(words[i:i + len(_words(key))] == _words(key) for i in range(len(words)))]
    return max(found, key=lambda key: len(_words(key)), default=None)


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[\s_-]+", name.upper()) if w]
