"""Keep library chatter out of the user's terminal: errors still show, per-layer notices do not."""

from __future__ import annotations

import logging
import re
import warnings

#: logger -> the message of it that is noise on every run, filtered by itself (the logger's other records pass)
NOISE = {
    # torchao's optional CUDA kernels, built for another Python or GPU: it loads and runs without them
    "torchao": r"^Failed to load \S*/torchao/_C\w*\.[\w.-]*so\b",
    # torch telling torchao (on its import) that registering its enums with pytree is deprecated
    "torch.utils._pytree": r"is an Enum subclass and is now natively supported by torch\.compile",
    # lm-eval warning that quantlab hands it an in-memory model, which is how quantlab always runs it
    "lm_eval.models.huggingface": r"^(`pretrained` model kwarg is not of type `str`|Passed an already-initialized model)",
}


class _Noise(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def filter_library_noise() -> None:
    """Drop exactly the ``NOISE`` lines libraries log on import, in any quantlab process (the CLI's, each
    step's); cheap, imports nothing, and torch's logging setup on import keeps loggers' filters."""
    for name, pattern in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Noise) for f in logger.filters):
            logger.addFilter(_Noise(pattern))


_LOGGERS = ("bitsandbytes", "torchao", "transformers", "accelerate", "torch._dynamo",
            "tokenicer", "tokenicer.tokenicer", "optimum")


def quiet_libraries() -> None:
    """bitsandbytes, torchao and transformers log hundreds of lines per model; keep errors only.

    torch resets its loggers on import, so torch is imported before the levels are set.
    """
    import os

    filter_library_noise()
    import torch  # noqa: F401

    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")

    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers, on GPTQ loads
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
