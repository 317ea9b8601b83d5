"""Engines: what runs an artifact and reports its log-probs, timings and held memory.

A layout names the engines that can run it (``Layout.engines``, the first its default); every result row names
its engine. transformers is the first engine: the steps load a model through the layout and run it with torch
(``quantlab.measure.latency``, ``quantlab.evaluate.fidelity``). llama.cpp, through llama-cpp-python, is the
second: a GGUF artifact is loaded by ``quantlab.engines.llamacpp.LlamaCppModel``, which answers the same calls
(``log_probs``, ``greedy``) and measures its own timings and buffers. Adding an engine (vLLM, for a GPU run) is
one module like that one and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

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
