"""Keep library chatter out of the user's terminal: errors still show, per-layer notices do not."""

from __future__ import annotations

import logging
import warnings

_LOGGERS = ("bitsandbytes", "torchao", "transformers", "accelerate", "torch.utils._pytree", "torch._dynamo",
            "tokenicer", "tokenicer.tokenicer", "optimum")


def quiet_libraries() -> None:
    """bitsandbytes, torchao and transformers log hundreds of lines per model; keep errors only.

    torch resets its loggers on import, so torch is imported before the levels are set.
    """
    import os

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
