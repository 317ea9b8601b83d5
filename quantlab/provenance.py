"""Where a number came from: library versions, device, threads, seeds, git sha."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import platform
import subprocess
from pathlib import Path

from quantlab import __version__
from quantlab.device import as_device
from quantlab.errors import MissingExtraError

LIBRARIES = ("torch", "transformers", "accelerate", "bitsandbytes", "torchao", "gptqmodel", "optimum", "lm_eval",
             "gguf", "safetensors", "hqq", "llama_cpp", "compressed_tensors")
_DIST_NAMES = {"lm_eval": "lm-eval", "llama_cpp": "llama-cpp-python", "compressed_tensors": "compressed-tensors"}
_INSTALL = {
    "bitsandbytes": "pip install -e '.[bnb]'",
    "torchao": "pip install -e '.[rtn]'",
    "gguf": "pip install -e '.[gguf]'",
    # gptqmodel builds against the installed torch: without --no-build-isolation pip would fetch another torch
    "gptqmodel": "pip install --no-build-isolation -c scripts/constraints.txt gptqmodel optimum",
    "optimum": "pip install -c scripts/constraints.txt optimum",
    "lm_eval": "pip install -c scripts/constraints.txt -e '.[eval]'",
    "llama_cpp": "bash scripts/setup.sh (it builds llama-cpp-python 0.3.36 from source for this CPU)",
}


def library_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(_DIST_NAMES.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        return None


def require_library(name: str, method: str) -> None:
    if importlib.util.find_spec(name) is None:
        raise MissingExtraError(
            f"Method '{method}' needs {name}, which is not installed — {_INSTALL.get(name, 'bash scripts/setup.sh')}"
        )


def versions() -> dict:
    out = {"python": platform.python_version(), "quantlab": __version__}
    out.update({name: library_version(name) for name in LIBRARIES})
    return out


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict:
    """Describe the device a measurement ran on. Imports torch."""
    import os

    import torch

    info = {"device": device, "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    info.update(as_device(device).describe())  # the GPU, on CUDA
    return info


def provenance(device: str, seeds: dict | None = None, data: dict | None = None) -> dict:
    return {
        "versions": versions(),
        "device": device_info(device),
        "seeds": seeds or {},
        "data_sha256": data or {},
        "git_sha": git_sha(),
        "host": platform.node(),
    }


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
