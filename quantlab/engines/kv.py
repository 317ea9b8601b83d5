"""What a quantized KV cache costs in llama.cpp: the KLD of a model's next-token distributions with its keys and
values held in a cache type (q8_0, q4_0, ...) against the same model with llama.cpp's default F16 cache.

One model is loaded once and two contexts are made on it (``context_kld`` compares two files the same way), the
F16 cache's and the candidate's (llama.cpp lets contexts share a model; each holds its own cache), with flash
attention on (a quantized V cache needs it; both have it, so only the cache differs). Each window of tokens is decoded in both, micro-batch by micro-batch, every
position's logits requested; a micro-batch's logits are log-softmaxed in float32 and compared at once, so nothing
the length of the window is held but the two caches. The scored positions are the second half of each window, as
``llama-perplexity --kl-divergence`` scores them: each has at least half the window in the cache before it.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from quantlab.engines.llamacpp import KV_TYPES, UBATCH, check_kv_type, require_llama_cpp

DEFINITION = ("mean over the scored positions (the second half of each window) of KL(p_f16 || p_cache) in "
              "nats/token, p the next-token distribution llama.cpp computes from the same model with its KV cache in "
              "F16 (p_f16) or in the cache's types; top1: the share of those positions where both argmaxes agree; "
              "flash attention on in both")


class _Context:
    """A llama.cpp context on a shared model, with its own cache types."""

    def __init__(self, llama_cpp, model, n_ctx: int, type_k: str, type_v: str, threads: int, ubatch: int):
        from llama_cpp._internals import LlamaContext

        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, ubatch, ubatch
        params.n_threads = params.n_threads_batch = threads
        params.type_k, params.type_v = KV_TYPES[type_k][0], KV_TYPES[type_v][0]
        params.flash_attn_type = 1  # enabled
        self.llama_cpp = llama_cpp
        self.ctx = LlamaContext(model=model, params=params, verbose=False)
        self.n_vocab = model.n_vocab()

    def clear(self) -> None:
        self.llama_cpp.llama_memory_clear(self.ctx.memory, True)

    def log_probs(self, batch, n_tokens: int):
        """log p of every position of the micro-batch just decoded, float32 (tokens, vocab), a copy."""
        import numpy as np
        import torch

        self.ctx.decode(batch)
        pointer = ctypes.cast(self.ctx.get_logits(), ctypes.POINTER(ctypes.c_float))
        logits = torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(n_tokens, self.n_vocab)).copy())
        return logits - torch.logsumexp(logits, dim=-1, keepdim=True)

    def close(self) -> None:
        self.ctx.close()


def cache_kld(path: str | Path, windows: list[list[int]], type_k: str, type_v: str, threads: int = 1,
              ubatch: int = UBATCH) -> dict:
    """KL(F16 cache || the ``type_k``/``type_v`` cache) of the GGUF at ``path`` on ``windows`` (token ids, each
    window one sequence from an empty cache); see the module docstring and ``DEFINITION``."""
    return context_kld((path, "f16", "f16"), (path, type_k, type_v), windows, threads, ubatch)


def context_kld(reference: tuple, candidate: tuple, windows: list[list[int]], threads: int = 1,
                ubatch: int = UBATCH) -> dict:
    """KL(reference || candidate) on ``windows``, each a (GGUF path, type_k, type_v): two files, or one file (loaded
    once) with two caches; scored as the module docstring says."""
    import torch
    from llama_cpp._internals import LlamaBatch, LlamaModel

    llama_cpp = require_llama_cpp()
    for _, k, v in (reference, candidate):
        check_kv_type(k), check_kv_type(v)
    paths = dict.fromkeys(str(p) for p, _, _ in (reference, candidate))
    models = {p: LlamaModel(path_model=p, params=llama_cpp.llama_model_default_params(), verbose=False) for p in paths}
    n_ctx = max(len(w) for w in windows)
    base, cand = (_Context(llama_cpp, models[str(p)], n_ctx, k, v, threads, ubatch)
                  for p, k, v in (reference, candidate))
    batch = LlamaBatch(n_tokens=ubatch, embd=0, n_seq_max=1, verbose=False)
    per_window, agree, scored = [], 0, 0
    try:
        for window in windows:
            base.clear(), cand.clear()
            first = len(window) // 2  # the scored positions: the second half, the last one predicting nothing
            kl_sum = torch.zeros((), dtype=torch.float64)
            for start in range(0, len(window) - 1, ubatch):
                chunk = window[start:start + ubatch]
                batch.set_batch(chunk, start, logits_all=True)
                p, q = base.log_probs(batch, len(chunk)), cand.log_probs(batch, len(chunk))
                lo, hi = max(first - start, 0), min(len(chunk), len(window) - 1 - start)
                if lo >= hi:
                    continue
                p, q = p[lo:hi], q[lo:hi]
                kl_sum += (p.exp() * (p - q)).sum(dtype=torch.float64)
                agree += int((p.argmax(-1) == q.argmax(-1)).sum())
                scored += hi - lo
            per_window.append(float(kl_sum) / (len(window) - 1 - first))
    finally:
        batch.close(), cand.close(), base.close()
        for m in models.values():
            m.close()
    return {"reference": [str(reference[0]), *reference[1:]], "candidate": [str(candidate[0]), *candidate[1:]],
            "kld_mean": sum(per_window) / len(per_window), "kld_per_window": per_window, "top1": agree / scored,
            "positions": scored, "window_tokens": n_ctx, "definition": DEFINITION}
