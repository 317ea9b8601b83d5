"""Engines: what runs an artifact and reports its log-probs, timings and held memory.

A layout names the engines that can run it (``Layout.engines``, the first its default); every result row names
its engine. transformers is the first engine: the steps load a model through the layout and run it with torch
(``quantlab.measure.latency``, ``quantlab.evaluate.fidelity``). llama.cpp, through llama-cpp-python, is the
second: a GGUF artifact is loaded by ``quantlab.engines.llamacpp.LlamaCppModel``, an ``EngineModel``: the one
interface the steps call on a model an engine of its own runs (log-probs, greedy tokens, timings, bytes and
buffers). Adding an engine (vLLM, for a GPU run) is one module like that one and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from quantlab.device import CPU
from quantlab.errors import RecipeError


@dataclass(frozen=True)
class Engine:
    name: str
    library: str  # the import that runs it
    install: str  # how to install it, for the one-line error when it is missing
    description: str


ENGINES = {
    "transformers": Engine("transformers", "transformers", "bash scripts/setup.sh",
                           "Hugging Face transformers with torch (eager; the layout's own kernels)"),
    "llama.cpp": Engine("llama.cpp", "llama_cpp", "bash scripts/setup.sh (it builds llama-cpp-python 0.3.36 from "
                        "source)", "llama.cpp through llama-cpp-python 0.3.36 (CPU build, GGML_NATIVE=OFF)"),
}


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise RecipeError(f"Unknown engine '{name}' — use one of {', '.join(ENGINES)}")
    return ENGINES[name]


class EngineModel:
    """A model run by an engine of its own rather than by torch through transformers. The steps recognise it by
    this class and make these calls of it: fidelity ``log_probs``, the garbage guard ``greedy``, the bench
    ``measure`` and ``held``, the weights step ``weight_bytes`` and ``buffers_at``, lm-eval ``log_probs`` through
    ``quantlab.engines.harness``; ``close`` frees what the engine holds."""

    engine: ClassVar[str]
    device: ClassVar[str] = CPU

    def log_probs(self, batch):
        """log p(next token) at every position but the last of each window: (windows, tokens - 1, vocab) float32."""
        raise NotImplementedError

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        raise NotImplementedError

    def measure(self, settings) -> dict:
        """Prefill and decode timings (``quantlab.measure.latency``'s result form) as the engine's own bench times
        them."""
        raise NotImplementedError

    def weight_bytes(self) -> dict:
        raise NotImplementedError

    def buffers_at(self, n_ctx: int) -> dict:
        raise NotImplementedError

    def held(self) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError
