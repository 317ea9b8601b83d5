"""Reading an HF model directory: its config, model and tokenizer, with quantlab's errors; saving beside a tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from quantlab.device import CPU, as_device
from quantlab.errors import ModelLoadError
from quantlab.models.fingerprint import WEIGHT_SUFFIXES


def check_model_dir(path: Path, trust_remote_code: bool = False):
    """A directory must hold a causal-LM config.json and readable safetensors weights."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json — pass a Hugging Face model directory")
    config = load_config(path, trust_remote_code)
    weights = [p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if not weights:
        raise ModelLoadError(f"{path} has no weight files (*.safetensors) — save the model with save_pretrained")
    for p in weights:
        if p.suffix == ".safetensors":
            _check_safetensors(p)
    return config


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            fh.keys()
    except Exception as exc:
        raise ModelLoadError(
            f"Corrupt safetensors file {path} ({first_line(exc)}) — re-download or re-save the model"
        ) from None


def load_config(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        if not trust_remote_code and _names_own_code(Path(path)):
            raise ModelLoadError(f"{path} needs its own model code (auto_map in config.json), which quantlab does not "
                                 "run unless asked — pass --trust-remote-code if you trust that code") from None
        raise ModelLoadError(f"Unreadable config.json in {path}: {first_line(exc)} — fix or re-save it") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ModelLoadError(
            f"{path} is a '{config.model_type}' model, not a causal language model — "
            "quantlab works on models AutoModelForCausalLM loads"
        )
    return config


def _names_own_code(path: Path) -> bool:
    try:
        return "auto_map" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_causal_lm(path: str | Path, device: str | None = CPU, trust_remote_code: bool = False, model_class=None,
                   **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` (or ``model_class.from_pretrained``) with quantlab's defaults (fp32
    on CPU) and clear errors."""
    from transformers import AutoModelForCausalLM

    where = as_device(device or CPU)  # None: no device named, loaded as on CPU
    kwargs.setdefault("dtype", where.checkpoint_dtype)
    if where.device_map and "device_map" not in kwargs:
        kwargs["device_map"] = where.device_map
    try:
        model = (model_class or AutoModelForCausalLM).from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                                                      **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"Could not load {path}: {first_line(exc)} — check the directory and installed libraries") from None
    return model.eval()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"No usable tokenizer in {path}: {first_line(exc)} — save one beside the model") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def save_with_tokenizer(model, source_dir: str | Path, out_dir: str | Path, trust_remote_code: bool = False) -> None:
    """Save a model plus the source's tokenizer, so the artifact loads on its own."""
    model.save_pretrained(str(out_dir))
    try:
        load_tokenizer(source_dir, trust_remote_code).save_pretrained(str(out_dir))
    except ModelLoadError:
        pass  # a model without a tokenizer stays usable for its weights; evaluation will say so


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception (at most 300 characters), for a one-line quantlab error."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
