"""Where computation runs: the device a step uses and the torch threads it may take."""

from __future__ import annotations

import contextlib
import re

from quantlab.errors import UsageError


def resolve_device(device: str | None) -> str:
    """``auto`` (or None): ``cuda`` when torch sees a GPU, else ``cpu``; ``cpu``, ``cuda`` or ``cuda:N`` as given."""
    if device not in (None, "auto"):
        if not (isinstance(device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", device)):
            raise UsageError(f"Unknown device {device!r} — use cpu, cuda, cuda:N or auto")
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count set for a block run in this process, then restored."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
