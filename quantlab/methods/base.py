"""The one small interface every quantization method implements."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from quantlab.errors import RecipeError
from quantlab.layerwise.quantize import BLOCK_BYTES as LAYERWISE_BLOCK_BYTES
from quantlab.provenance import require_library


class Method:
    """A quantization algorithm: naming, checks, quantize, its PTQ twin, and the layout it fills.

    ``quantize`` writes a directory that ``AutoModelForCausalLM.from_pretrained`` reloads with the
    method's library installed and no quantlab import. ``fp`` is the exception: its artifact is the
    source directory itself; and a model with GPT-2's Conv1D layers reloads through its layout's ``load``
    where the libraries fall short (torchao, GPTQ: ``quantlab.conv1d``), as its notes' ``conv1d`` say.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    short_pattern: ClassVar[re.Pattern]
    example_names: ClassVar[tuple[str, ...]]
    libraries: ClassVar[tuple[str, ...]] = ()
    writes_artifact: ClassVar[bool] = True
    #: whether a recipe is resolved from measurements before ``quantize`` (a fit: its allocation), so that
    #: ``quantize`` of the recipe as written refuses
    resolved_first: ClassVar[bool] = False

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

    def check_source(self, config: Any, source_dir: str) -> None:
        """Reject a recipe that cannot apply to this model's source (a GGUF recipe needs a model loaded from a
        GGUF), before any work starts."""

    def libraries_for(self, config: Any | None) -> tuple[str, ...]:
        """The libraries this config needs: the algorithm's own and its layout's."""
        layout = self.layout(config if config is not None else self.config_cls()).libraries
        return tuple(dict.fromkeys(self.libraries + layout))

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

    def quantize_peak(self, config: Any, sizes: dict, device: str) -> dict[str, int]:
        """Predicted bytes ``quantize`` holds at its peak, by component (``quantlab.plan.steps``).

        ``sizes``: ``fp_weights`` (the source loaded whole), ``quantized_weights`` (the artifact loaded),
        ``largest_tensor`` and ``layer`` (one decoder layer) at the unquantized dtype, and ``shapes``. The default
        is a method that loads the fp model whole and quantizes it in place into a copy: both held at once.
        """
        return {"fp model": sizes["fp_weights"], "quantized model": sizes["quantized_weights"]}

    def layer_by_layer_peak(self, config: Any, sizes: dict, device: str) -> dict[str, int] | None:
        """Predicted peak of ``quantize_layer_by_layer`` (same ``sizes``), or None when the method has no such way."""
        return None

    def quantize_layer_by_layer(self, config: Any, source_dir: Path, out_dir: Path, device: str, *,
                                data_dir: str | None = None, trust_remote_code: bool = False) -> dict:
        """``quantize`` reading the source one decoder layer at a time, for a model that does not fit the memory
        budget; the artifact must be the one ``quantize`` writes (sharded is fine)."""
        raise NotImplementedError

    def ptq_twin(self, config: Any) -> str | None:
        """Short name of the post-training recipe of the identical format, for a trained method."""
        return None

    def cache_inputs(self, config: Any, source_dir: Path, *, data_dir: str | None = None,
                     trust_remote_code: bool = False) -> dict:
        """Inputs beyond the recipe that change the artifact (e.g. calibration text sha256)."""
        return {}

    def layout(self, config: Any):
        """The storage layout (``quantlab.layouts``) this config's artifact is held in once loaded: its bytes,
        load kwargs, latency support and libraries are the layout's."""
        raise NotImplementedError


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


def layer_by_layer_write_peak(layout, sizes: dict, device: str, extra: dict | None = None) -> dict[str, int]:
    """The peak of ``quantlab.layerwise.quantize.write_layer_by_layer`` for a method that quantizes each linear on
    its own into ``layout``: the tensors outside the layers copied in two row blocks, then one fp layer beside its
    quantized copy (the layout's bytes of a layer's linears), plus the method's own ``extra`` terms for a layer."""
    shapes = sizes["shapes"]
    quantized = sum(sum(layout.linear_bytes(lin.out_features, lin.in_features, device).values()) * lin.count
                    for lin in shapes.linears)
    return {"layers: one fp layer": sizes["layer"], "layers: the layer quantized": quantized // max(shapes.layers, 1),
            **(extra or {}), "head: two copy blocks of an unquantized tensor": 2 * LAYERWISE_BLOCK_BYTES}
