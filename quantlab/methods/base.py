"""The one small interface every quantization method implements."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from quantlab.errors import RecipeError
from quantlab.provenance import require_library


class Method:
    """A quantization method.

    ``quantize`` writes a directory that ``AutoModelForCausalLM.from_pretrained`` reloads with the
    method's library installed and no quantlab import. ``fp`` is the exception: its artifact is the
    source directory itself.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    short_pattern: ClassVar[re.Pattern]
    example_names: ClassVar[tuple[str, ...]]
    libraries: ClassVar[tuple[str, ...]] = ()
    writes_artifact: ClassVar[bool] = True

    def parse_short_name(self, text: str) -> Any | None:
        """Return a config for a short name this method owns, else None."""
        match = self.short_pattern.fullmatch(text)
        return self.config_from_match(match) if match else None

    def config_from_match(self, match: re.Match) -> Any:
        raise NotImplementedError

    def short_name(self, config: Any) -> str:
        raise NotImplementedError

    def explain_short_name(self, text: str) -> str | None:
        """Say why a name that starts with this method's prefix is invalid, when we can tell."""
        return None

    def check_model(self, config: Any, linear_shapes: dict[str, tuple[int, int]]) -> None:
        """Reject a recipe that cannot apply to this model's linear layers, before any work starts."""

    def libraries_for(self, config: Any | None) -> tuple[str, ...]:
        """The libraries this config needs (a method may store some configs through another library)."""
        return self.libraries

    def require(self, config: Any | None = None) -> None:
        """Raise MissingExtraError when a library the method (or this config of it) needs is not importable."""
        for lib in self.libraries_for(config):
            require_library(lib, self.name)

    def preload(self, config: Any | None) -> None:
        """Import the libraries ``quantize`` uses, so a cost baseline taken afterwards includes them."""
        import contextlib
        import importlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # some libraries print banners on import
            for lib in self.libraries_for(config):
                importlib.import_module(lib)

    def quantize(self, config: Any, source_dir: Path, out_dir: Path, device: str, *, data_dir: str | None = None,
                 trust_remote_code: bool = False) -> dict:
        """Write the quantized model to ``out_dir`` (a fresh temp dir). Returns method-specific notes.

        ``data_dir`` is where data-dir datasets (calibration, training text) are read from; ``trust_remote_code``
        is the user's permission for the model's own code, passed to every load."""
        raise NotImplementedError

    def ptq_twin(self, config: Any) -> str | None:
        """Short name of the post-training recipe of the identical format, for a trained method."""
        return None

    def cache_inputs(self, config: Any, source_dir: Path, *, data_dir: str | None = None,
                     trust_remote_code: bool = False) -> dict:
        """Inputs beyond the recipe that change the artifact (e.g. calibration text sha256)."""
        return {}

    def measures_latency(self, config: Any, device: str) -> str | None:
        """None when latency can be measured here; otherwise the reason it is not."""
        return None

    def linear_bytes(self, config: Any, out_features: int, in_features: int, device: str) -> dict[str, int]:
        """Predicted bytes one quantized ``nn.Linear`` weight (out, in) holds once loaded on ``device``.

        Split into ``data`` (the integers or floats of the weight) and ``scales`` (per-group scales, zero
        points, absmax and codebooks, group indices): the overhead memory calculators forget. Bias excluded.
        """
        raise NotImplementedError

    def layout_note(self, config: Any) -> str:
        """One line naming the storage layout ``linear_bytes`` counts, for the planner's arithmetic."""
        return ""

    def unquantized_dtype_bytes(self, config: Any, device: str) -> int:
        """Bytes per element of the parts a method leaves alone (embeddings, norms, biases, lm_head)."""
        return 4 if device == "cpu" else 2

    def bias_dtype_bytes(self, config: Any, device: str) -> int:
        """Bytes per element of a quantized layer's bias (most methods keep it at the unquantized dtype)."""
        return self.unquantized_dtype_bytes(config, device)

    def load_kwargs(self, config: Any, device: str) -> dict:
        """Extra ``from_pretrained`` kwargs for loading this method's artifact."""
        import torch

        return {"dtype": torch.float32 if device == "cpu" else "auto"}


def check_group_size(group_size: int, linear_shapes: dict[str, tuple[int, int]]) -> None:
    """Every quantized layer's in-features must be a multiple of the group size (-1: per channel)."""
    if group_size == -1:
        return
    bad = sorted({k for _, k in linear_shapes.values() if k % group_size})
    if bad:
        ok = [g for g in (32, 64, 128) if all(k % g == 0 for _, k in linear_shapes.values())]
        raise RecipeError(
            f"group size {group_size} does not divide in-features {bad} of this model — "
            f"use a group size that divides every layer ({', '.join(map(str, ok)) or 'per-channel -1'})"
        )


def groups_of(group_size: int, in_features: int) -> int:
    """Quantization groups along the input dimension (-1: one group per output channel)."""
    return 1 if group_size == -1 else -(-in_features // group_size)


INTX_LAYOUT = "torchao intx: one int8 per value (int4 too) + a scale (unquantized dtype) and an int8 zero per group"


def intx_linear_bytes(bits: int, group_size: int, out_features: int, in_features: int, scale_bytes: int) -> dict:
    """torchao's IntxUnpackedToInt8Tensor: one int8 per value (int4 too), a scale and an int8 zero per group."""
    groups = groups_of(group_size, in_features)
    return {"data": out_features * in_features, "scales": out_features * groups * (scale_bytes + 1)}
