"""llama.cpp as an engine, through llama-cpp-python: a GGUF file's log-probs, greedy tokens, timings and buffers.

``LlamaCppModel`` answers what the fidelity step and the guard ask a loaded model (``log_probs`` of token windows,
``greedy`` continuation), from llama.cpp's own logits: the token ids are quantlab's (the fp model's tokenizer),
so both engines score the very same tokens. ``measure`` times prefill and decode the way llama-bench defines them
(``-p``: the prompt's tokens in one batch from an empty KV cache; ``-n``: that many tokens generated one at a time
from an empty cache; tokens/s of each), and reads what llama.cpp holds: its model, KV and compute buffers from its
own load log, the tensor bytes from ``llama_model_size``, and the process's RSS.

A context is made for the longest sequence asked so far (the KV cache it allocates is that long), and remade when
a longer one comes. Every call runs on ``threads`` threads (``n_threads`` and ``n_threads_batch``), with llama.cpp's
own defaults where llama-cpp-python's differ: flash attention on (llama-bench's, llama-perplexity's and llama-cli's
"auto", which the CPU backend turns on; llama-cpp-python turns it off) and micro-batches of at most 512 tokens
(``n_ubatch``). On SmolLM2's gguf-q4_k_m at one thread (scripts/bench_gguf.py), flash attention off and prompt and
generation runs interleaved gave 0.87x llama-bench's prefill and 0.85x its decode speed, and a PPL 0.06 % off
llama-perplexity's on its own tokens and positions; as here, 1.00x, 1.02x and 0.001 %.
"""

from __future__ import annotations

import ctypes
import re
import time
from pathlib import Path

from quantlab.engines import EngineModel
from quantlab.errors import MissingExtraError, UsageError
from quantlab.gguf_file import gguf_reader
from quantlab.measure.latency import LatencySettings, median_iqr

UBATCH = 512  # llama.cpp's default micro-batch (llama-bench, llama-perplexity, llama-cli)
#: the KV cache types llama.cpp takes (``-ctk``/``-ctv``, common/arg.cpp's kv_cache_types): name -> (ggml type id,
#: values per block, bytes per block); a quantized V cache needs flash attention, which the engine always turns on
KV_TYPES = {"f32": (0, 1, 4), "f16": (1, 1, 2), "bf16": (30, 1, 2), "q8_0": (8, 32, 34), "q4_0": (2, 32, 18),
            "q4_1": (3, 32, 20), "iq4_nl": (20, 32, 18), "q5_0": (6, 32, 22), "q5_1": (7, 32, 24)}
KV_PAD = 256  # llama.cpp rounds a context's cells up to a multiple of this (llama-context.cpp, GGML_PAD(n_ctx, 256))
BUFFER_LINE = re.compile(r"(\w+) (model|KV|compute|output|RS) buffer size =\s+([\d.]+) MiB")
MIB = 1024 * 1024
_log: list[str] = []
_callback = None  # the ctypes callback must outlive every call into llama.cpp


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise MissingExtraError("GGUF recipes run in llama.cpp, and llama-cpp-python is not installed — run "
                                "bash scripts/setup.sh (it builds llama-cpp-python 0.3.36 for this CPU)") from None
    _capture_log(llama_cpp)
    return llama_cpp


def _capture_log(llama_cpp) -> None:
    """llama.cpp's log goes to a list (read for its buffer sizes), not to stderr."""
    global _callback
    if _callback is None:
        @llama_cpp.llama_log_callback
        def keep(level, text, user_data):
            _log.append(text.decode("utf-8", "replace"))

        _callback = keep
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def buffers(lines: list[str]) -> dict[str, int]:
    """llama.cpp's buffers from its load log, by kind ("model", "KV", "compute", "output") summed over backends,
    in bytes (the log gives MiB to two decimals: within 5 kB)."""
    out: dict[str, int] = {}
    for line in lines:
        for _, kind, mib in BUFFER_LINE.findall(line):
            out[kind] = out.get(kind, 0) + round(float(mib) * MIB)
    return out


class LlamaCppModel(EngineModel):
    """A GGUF file loaded by llama.cpp (CPU); see the module docstring."""

    dtype = ""  # llama.cpp computes in F32 on the CPU whatever its tensors' types
    engine = "llama.cpp"

    def __init__(self, path: str | Path, threads: int = 1, type_k: str = "f16", type_v: str = "f16"):
        self.path = str(path)
        self.threads = max(1, int(threads))
        self.type_k, self.type_v = check_kv_type(type_k), check_kv_type(type_v)
        self._llm = None
        self._n_ctx = 0
        self.load_log: list[str] = []

    def _context(self, n_ctx: int, logits_all: bool = True):
        if self._llm is None or n_ctx > self._n_ctx or self._llm._logits_all != logits_all:
            self.close()
            llama_cpp = require_llama_cpp()
            start = len(_log)
            self._llm = llama_cpp.Llama(self.path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, UBATCH),
                                        logits_all=logits_all, flash_attn=True, n_threads=self.threads,
                                        n_threads_batch=self.threads, type_k=KV_TYPES[self.type_k][0],
                                        type_v=KV_TYPES[self.type_v][0], verbose=False)
            self.load_log = _log[start:]
            self._n_ctx = n_ctx
        return self._llm

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def __del__(self):
        self.close()

    def log_probs(self, batch):
        """log p(next token) at every position but the last of each window of ``batch`` (windows, tokens), as
        a float32 torch tensor (windows, tokens - 1, vocab): llama.cpp's logits, log-softmaxed in float32."""
        import numpy as np
        import torch

        windows, length = batch.shape
        llm = self._context(length)
        out = torch.empty((windows, length - 1, llm.n_vocab()), dtype=torch.float32)
        for i, row in enumerate(batch.tolist()):
            llm.reset()
            llm.eval(row)
            window = out[i]
            window.copy_(torch.from_numpy(np.asarray(llm.scores[:length - 1], dtype=np.float32)))
            window -= torch.logsumexp(window, dim=-1, keepdim=True)  # normalised in place: one window's temporary
        return out

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        """``new_tokens`` greedy tokens (argmax of llama.cpp's logits) after ``prompt``."""
        import numpy as np

        llm = self._context(len(prompt) + new_tokens)
        llm.reset()
        llm.eval(prompt)
        out = []
        for _ in range(new_tokens):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        return out

    def weight_bytes(self) -> dict:
        """The bytes of the GGUF's tensors as llama.cpp holds them (``llama_model_size``), split into quantized
        tensors and those left at F32/F16 (read from the file's header)."""
        import gc

        # the header first, while llama.cpp holds nothing: gguf-py's parse of a large vocabulary is half a gigabyte
        # (Qwen2.5-Coder-1.5B), which would otherwise sit on top of the loaded model in the step's peak
        plain = sum(int(t.n_bytes) for t in gguf_reader(Path(self.path)).tensors
                    if t.tensor_type.name in ("F32", "F16", "BF16"))
        gc.collect()
        llama_cpp = require_llama_cpp()
        total = int(llama_cpp.llama_model_size(self._context(8)._model.model))
        return {"weights_bytes": total, "quantized_bytes": total - plain, "unquantized_bytes": plain}

    def measure(self, settings: LatencySettings) -> dict:
        """Prefill and decode as llama-bench times them (module docstring), batch 1 only, after ``warmup`` runs;
        median, IQR and raw samples in quantlab's latency record."""
        import numpy as np

        rng = np.random.default_rng(0)
        llm = self._context(max(settings.prompt_tokens, settings.decode_tokens), logits_all=False)
        prompt = rng.integers(0, llm.n_vocab(), settings.prompt_tokens).tolist()
        gen_tokens = rng.integers(0, llm.n_vocab(), settings.decode_tokens).tolist()
        # Prompt runs, then generation runs, each after its own warm-up, as llama-bench's -p and -n tests: timed right
        # after a prompt, a generation ran 6 % slower (SmolLM2 gguf-q4_k_m, one thread: 130 vs 137 tok/s).
        prefill, decode = [], []
        for i in range(settings.warmup + settings.repetitions):
            llm.reset()
            start = time.perf_counter()
            llm.eval(prompt)
            if i >= settings.warmup:
                prefill.append((time.perf_counter() - start) * 1000)
        for i in range(settings.warmup + settings.repetitions):
            llm.reset()
            start = time.perf_counter()
            for tok in gen_tokens:
                llm.eval([tok])
            if i >= settings.warmup:
                decode.append(settings.decode_tokens / (time.perf_counter() - start))
        return {"settings": settings.to_dict(), "timer": "perf_counter", "engine": self.engine,
                "threads": self.threads,
                "decode_path": {"chosen": "llama.cpp", "description": DECODE_DEFINITION},
                "prefill_ms": median_iqr(prefill), "prefill_ms_samples": prefill,
                "prefill_tok_s": median_iqr([settings.prompt_tokens * 1000 / ms for ms in prefill]),
                "decode_tok_s": {"1": median_iqr(decode)}, "decode_tok_s_samples": {"1": decode}}

    def buffers_at(self, n_ctx: int) -> dict:
        """What llama.cpp allocates for a context of ``n_ctx`` tokens: model, KV and compute buffers (bytes)."""
        self.close()
        self._context(n_ctx, logits_all=False)
        return self.held()

    def held(self) -> dict:
        """What llama.cpp allocated for the context last made: model, KV and compute buffers (bytes)."""
        return buffers(self.load_log)


DECODE_DEFINITION = ("llama.cpp through llama-cpp-python, as llama-bench defines it: prefill = the prompt's tokens "
                     "in one batch from an empty KV cache; decode = tokens generated one at a time from an empty KV "
                     "cache (llama-bench -n), all prompt runs before all generation runs, each after a warm-up; "
                     "batch 1; flash attention on, F16 KV cache, micro-batches of 512 (llama-bench's defaults on a "
                     "CPU)")


def check_kv_type(name: str) -> str:
    if name not in KV_TYPES:
        raise UsageError(f"Unknown KV cache type '{name}' — use one of {', '.join(KV_TYPES)} (llama.cpp's -ctk/-ctv)")
    return name


def kv_bytes(shapes, context: int, batch: int = 1, type_k: str = "f16", type_v: str = "f16") -> int:
    """The bytes of llama.cpp's KV cache for ``batch`` sequences of ``context`` tokens, exactly as it allocates them
    (llama-kv-cache.cpp): ``n_ctx = batch x context`` rounded up to 256 cells, each sequence's share rounded up to
    256 again (a stream per sequence, llama.cpp's default), and per cell and layer one row of keys and one of values,
    ``kv_heads x head_dim`` values each, in their types' blocks (q8_0: 34 bytes per 32 values). Every layer holds the
    whole context: llama.cpp's default keeps a sliding-window layer's cache full size too (``swa_full``)."""
    per_seq = _pad(_pad(context * batch) // batch)
    width = shapes.kv_heads * shapes.head_dim
    row = 0
    for name in (type_k, type_v):
        _, block, size = KV_TYPES[check_kv_type(name)]
        if width % block:
            raise UsageError(f"A {name} KV cache needs rows of a multiple of {block} values, and this model's are "
                             f"{width} — use f16")
        row += width // block * size
    return shapes.layers * row * per_seq * batch


def compute_bytes(shapes, tokens: int) -> int:
    """llama.cpp's compute buffer for sequences of ``tokens``: a micro-batch's logits, F32 (within 5 % of its log on
    SmolLM2, tests/test_gguf.py)."""
    return min(tokens, UBATCH) * shapes.vocab * 4


def _pad(n: int) -> int:
    return -(-n // KV_PAD) * KV_PAD


#: ggml types llama.cpp's CPU backend repacks for its x86 AVX2 kernels (``ggml_repack_get_optimal_repack_type`` in
#: ggml-cpu/repack.cpp: Q4_0, Q4_K, IQ4_NL and MXFP4, when the rows are a multiple of 8), as a second copy beside the
#: mapped file: a weight of a matrix product (not the token embedding, which is read by rows)
REPACKED_TYPES = ("Q4_0", "Q4_K", "IQ4_NL", "MXFP4")


def held_terms(tensors: dict[str, tuple[str, tuple[int, ...], int]], shapes, windows: int, tokens: int,
               type_k: str = "f16", type_v: str = "f16") -> dict:
    """What llama.cpp holds beside the file's tensor bytes when it scores ``windows`` windows of ``tokens`` tokens
    one at a time (``LlamaCppModel.log_probs``; ``windows`` 0: a bench or lm-eval request), in bytes by component. ``tensors``: GGUF name -> (ggml type, ggml
    shape, bytes). Qwen2.5-Coder-1.5B gguf-q4_k_m at 256 tokens, from llama.cpp's log: model buffers 1729.1 MB
    (the mapped file 1059.9 MiB and the repacked Q4_K copies), compute 158.7 MB, KV 7.3 MB."""
    repacked = sum(size for name, (kind, shape, size) in tensors.items()
                   if kind in REPACKED_TYPES and name != "token_embd.weight" and shape[1] % 8 == 0)
    return {"llama.cpp: repacked copies of Q4_0/Q4_K weights (CPU)": repacked,
            f"llama.cpp: KV cache ({type_k.upper()}, {type_v.upper()})" if (type_k, type_v) != ("f16", "f16")
            else "llama.cpp: KV cache (F16)": kv_bytes(shapes, tokens, 1, type_k, type_v),
            "llama.cpp: compute buffer (a micro-batch's logits)": compute_bytes(shapes, tokens),
            "llama.cpp: logits of every position": tokens * shapes.vocab * 4,
            "llama-cpp-python: scores array": tokens * shapes.vocab * 4,
            **({"log-probs of the windows": windows * (tokens - 1) * shapes.vocab * 4,
                "one window's normalisation temporary": (tokens - 1) * shapes.vocab * 4} if windows else {})}
