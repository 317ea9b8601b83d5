"""What a quantized KV cache costs in llama.cpp: the KLD of a model's next-token distributions with its keys and
values held in a cache type (q8_0, q4_0, ...) against the same model with llama.cpp's default F16 cache.

One model is loaded once and two contexts are made on it (``context_kld`` compares two files the same way), the
F16 cache's and the candidate's (llama.cpp lets contexts share a model; each holds its own cache), with flash
attention on (a quantized V cache needs it; both have it, so only the cache differs). Each window of tokens is
decoded in both, micro-batch by micro-batch, the logits of the scored positions requested; a micro-batch's logits
are log-softmaxed in float32 and compared at once, so nothing the length of the window is held but the caches.
Several cache types are measured against one F16 forward (``caches_kld``). The scored positions are the second half
of each window, as ``llama-perplexity --kl-divergence`` scores them: each has at least half the window in the cache
before it.
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

    def decode(self, batch) -> None:
        self.ctx.decode(batch)

    def log_probs(self, n_tokens: int):
        """log p of the ``n_tokens`` positions whose logits the micro-batch just decoded asked for, float32
        (tokens, vocab), a copy."""
        import numpy as np
        import torch

        pointer = ctypes.cast(self.ctx.get_logits(), ctypes.POINTER(ctypes.c_float))
        logits = torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(n_tokens, self.n_vocab)).copy())
        return logits - torch.logsumexp(logits, dim=-1, keepdim=True)

    def close(self) -> None:
        self.ctx.close()


def cache_kld(path: str | Path, windows: list[list[int]], type_k: str, type_v: str, threads: int = 1,
              ubatch: int = UBATCH) -> dict:
    """KL(F16 cache || the ``type_k``/``type_v`` cache) of the GGUF at ``path`` on ``windows`` (token ids, each
    window one sequence from an empty cache); see the module docstring and ``DEFINITION``."""
    return caches_kld(path, windows, [(type_k, type_v)], threads, ubatch)[0]


def caches_kld(path: str | Path, windows: list[list[int]], pairs: list[tuple[str, str]], threads: int = 1,
               ubatch: int = UBATCH) -> list[dict]:
    """``cache_kld`` of each (type_k, type_v) pair, the F16 cache's forward computed once for all of them."""
    return contexts_kld((path, "f16", "f16"), [(path, k, v) for k, v in pairs], windows, threads, ubatch)


def context_kld(reference: tuple, candidate: tuple, windows: list[list[int]], threads: int = 1,
                ubatch: int = UBATCH) -> dict:
    """KL(reference || candidate) on ``windows``, each a (GGUF path, type_k, type_v): two files, or one file (loaded
    once) with two caches; scored as the module docstring says."""
    return contexts_kld(reference, [candidate], windows, threads, ubatch)[0]


def contexts_kld(reference: tuple, candidates: list[tuple], windows: list[list[int]], threads: int = 1,
                 ubatch: int = UBATCH) -> list[dict]:
    """``context_kld`` of each candidate against one reference, decoded in lockstep: each micro-batch goes through
    the reference's context once and every candidate's; logits are asked for the scored positions only."""
    from llama_cpp._internals import LlamaBatch, LlamaModel

    llama_cpp = require_llama_cpp()
    for _, k, v in (reference, *candidates):
        check_kv_type(k), check_kv_type(v)
    paths = dict.fromkeys(str(p) for p, _, _ in (reference, *candidates))
    models = {p: LlamaModel(path_model=p, params=llama_cpp.llama_model_default_params(), verbose=False) for p in paths}
    n_ctx = max(len(w) for w in windows)
    contexts = [_Context(llama_cpp, models[str(p)], n_ctx, k, v, threads, ubatch)
                for p, k, v in (reference, *candidates)]
    batch = LlamaBatch(n_tokens=ubatch, embd=0, n_seq_max=1, verbose=False)
    try:
        sums = [_window_klds(contexts, batch, window, ubatch) for window in windows]
    finally:
        batch.close()
        for c in contexts:
            c.close()
        for m in models.values():
            m.close()
    out = []
    for i, candidate in enumerate(candidates):
        per_window = [w[i][0] for w in sums]
        agree, scored = sum(w[i][1] for w in sums), sum(w[i][2] for w in sums)
        out.append({"reference": [str(reference[0]), *reference[1:]], "candidate": [str(candidate[0]), *candidate[1:]],
                    "kld_mean": sum(per_window) / len(per_window), "kld_per_window": per_window, "top1": agree / scored,
                    "positions": scored, "window_tokens": n_ctx, "definition": DEFINITION})
    return out


def _window_klds(contexts: list, batch, window: list[int], ubatch: int) -> list[tuple[float, int, int]]:
    """One window through every context from an empty cache: per candidate (mean KL over the scored positions,
    argmax agreements, positions scored)."""
    import torch

    for c in contexts:
        c.clear()
    first = len(window) // 2  # the scored positions: the second half, the last one predicting nothing
    kl = [torch.zeros((), dtype=torch.float64) for _ in contexts[1:]]
    agree, scored = [0] * len(kl), 0
    for start in range(0, len(window) - 1, ubatch):
        chunk = window[start:start + ubatch]
        lo, hi = max(first - start, 0), min(len(chunk), len(window) - 1 - start)
        batch.set_batch(chunk, start, logits_all=False)
        if lo < hi:
            for i in range(len(chunk)):
                batch.batch.logits[i] = lo <= i < hi
        for c in contexts:
            c.decode(batch)
        if lo >= hi:
            continue  # the cache filled; nothing scored yet
        p, *rows = (c.log_probs(hi - lo) for c in contexts)
        prob = p.exp()
        for i, q in enumerate(rows):
            kl[i] += (prob * (p - q)).sum(dtype=torch.float64)
            agree[i] += int((p.argmax(-1) == q.argmax(-1)).sum())
        scored += hi - lo
    n = len(window) - 1 - first
    return [(float(kl[i]) / n, agree[i], scored) for i in range(len(kl))]
