"""Where a model's config comes from: a local dir, a GGUF, the embedded default, quantlab's table of
well-known models, or the hub when online. No weights are read."""

from __future__ import annotations

import difflib
import os
from functools import lru_cache
from pathlib import Path

from quantlab.catalog import named_entry
from quantlab.errors import ModelLoadError
from quantlab.fsutil import load_yaml
from quantlab.gguf_file import gguf_reader
from quantlab.models.load import load_config
from quantlab.models.named import fetched_path, named_gguf

TABLE = Path(__file__).with_name("known_models.yaml")


@lru_cache(maxsize=1)
def known_models() -> dict[str, dict]:
    return load_yaml(TABLE, "known-model table", "reinstall quantlab")


def _lookup(ref: str) -> tuple[str, dict] | None:
    key = ref.strip().lower()
    for name, entry in known_models().items():
        for alias in [name, *entry.get("aliases", [])]:
            if key in (alias.lower(), alias.split("/")[-1].lower()):
                return name, entry["config"]
    return None


def resolve_config(ref: str, trust_remote_code: bool = False):
    """Return (transformers config, where it came from)."""
    from transformers import AutoConfig

    path = Path(ref).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return load_config(path, trust_remote_code), f"local config {path / 'config.json'}"
    named = named_entry(ref) is not None and ("embedded" in named_entry(ref) or fetched_path(ref).is_file())
    if named or (path.suffix == ".gguf" and path.is_file()):
        gguf = named_gguf(ref) if named else path
        try:
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name), f"GGUF metadata of {gguf.name}"
        except Exception as exc:  # transformers raises struct.error, ValueError ... on a damaged GGUF
            gguf_reader(gguf)  # a truncated or corrupt file is named so
            raise ModelLoadError(f"Cannot read the config of GGUF {gguf}: {str(exc).strip()[:200]} — check it is "
                                 "a llama.cpp GGUF of a causal LM transformers supports") from None
    hit = _lookup(ref)
    if hit:
        name, fields = hit
        fields = dict(fields)
        return AutoConfig.for_model(fields.pop("model_type"), **fields), f"quantlab's table of published configs ({name})"
    if path.exists():
        raise ModelLoadError(f"{ref} has no config.json — give a model directory, a .gguf file or a hub id")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelLoadError(_unknown(ref, "the hub is offline (HF_HUB_OFFLINE=1)"))
    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code), f"hub config of {ref}"
    except Exception:
        raise ModelLoadError(_unknown(ref, "the hub did not answer")) from None


def _unknown(ref: str, why: str) -> str:
    names = list(known_models())
    close = difflib.get_close_matches(ref, names + [n.split("/")[-1] for n in names], n=1, cutoff=0.5)
    guess = f" Did you mean '{close[0]}'?" if close else ""
    return (f"No config for '{ref}': not a local directory or .gguf, not in quantlab's table, and {why}.{guess} "
            f"Give a directory with config.json, or one of: {', '.join(n.split('/')[-1] for n in names)}")
