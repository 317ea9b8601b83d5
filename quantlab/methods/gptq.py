"""GPTQ through GPTQModel: calibrated, layer-by-layer post-training quantization in the GPTQ format.

GPTQModel (the maintained successor of auto-gptq, and transformers' own GPTQ backend) quantizes on
CPU and CUDA and saves a GPTQ directory that plain ``AutoModelForCausalLM.from_pretrained`` reloads
with gptqmodel and optimum installed. On CPU its int4 kernels run in fp32; its 8-bit CPU kernel runs
only in bf16 at about one token per second, so 8-bit GPTQ on CPU is an accuracy-only recipe: quantlab
measures its memory and fidelity but not its latency there.

``mse`` (default 2.4 at 4 bits) turns on GPTQ's clipping search, the original GPTQ code's ``--mse`` option:
before each group is quantized its range is shrunk in 1 % steps down to 21 % and the scale that
minimises the 2.4-norm of the weight error is kept. Measured on SmolLM2 w4-g64 (reports/bench/gptq.txt)
GPTQ's KLD is 0.42x RTN's with it and 0.52x without, for ~25 % more quantization time; ``mse: 0``
turns it off. At 8 bits it defaults off: RTN's error is already small there (gptq-w8 KLD 0.0033 with
the search, 0.0031 without in an earlier run) and the search costs time. ``damp_percent`` defaults to 0.01 (the GPTQ paper's; GPTQModel's own is 0.05, which
measured 0.47x).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import RecipeError
from quantlab.fsutil import atomic_write_text
from quantlab.methods.base import Method, check_group_size, groups_of
from quantlab.methods.calibration import calibration_windows, resolve_calibration

_BITS = (8, 4)
_GROUPS = (-1, 32, 64, 128)


@dataclass(frozen=True)
class GptqConfig:
    bits: int = 4
    group_size: int = 64
    desc_act: bool = False
    symmetric: bool = True
    damp_percent: float = 0.01
    mse: float | None = None  # None: 2.4 at 4 bits, 0 (off) at 8 bits
    calibration: str = "c4_calibration"
    samples: int = 64
    tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.bits not in _BITS:
            raise RecipeError(f"gptq bits must be 8 or 4 (got {self.bits}) — use gptq-w4-g64 or gptq-w8")
        if self.group_size not in _GROUPS:
            raise RecipeError(f"gptq group_size must be one of {', '.join(map(str, _GROUPS))} (got {self.group_size})")
        if self.mse is None:
            object.__setattr__(self, "mse", 2.4 if self.bits == 4 else 0.0)
        if self.mse != 0 and not 1 <= self.mse <= 4:
            raise RecipeError(f"gptq mse must be 0 (no clipping search) or a norm in [1, 4], e.g. 2.4 (got {self.mse})")
        if not 0 < self.damp_percent < 1:
            raise RecipeError(f"gptq damp_percent must be in (0, 1) (got {self.damp_percent})")
        if self.samples < 1 or self.tokens < 8:
            raise RecipeError("gptq calibration needs samples ≥ 1 and tokens ≥ 8 — e.g. samples: 64, tokens: 256")


GPTQ_LAYOUT = ("GPTQ packed: 32/bits values per int32 + fp16 scale and packed zero per group + int32 g_idx per "
               "input feature")


def gptq_linear_bytes(bits: int, group_size: int, out_features: int, in_features: int) -> dict:
    """The GPTQ checkpoint layout as GPTQModel's torch kernels hold it: qweight packs 32/bits values per
    int32, fp16 scales and int32-packed zeros per group, an int32 group index per input feature, and two
    (1, 32/bits) int32 shift tables. CUDA kernels (Marlin, ExLlama) may repack; predicted as loaded."""
    groups = groups_of(group_size, in_features)
    per_int32 = 32 // bits
    data = in_features * out_features * bits // 8
    scales = groups * out_features * 2 + groups * out_features * bits // 8 + in_features * 4 + 2 * per_int32 * 4
    return {"data": data, "scales": scales}


class GptqMethod(Method):
    name = "gptq"
    config_cls = GptqConfig
    short_pattern = re.compile(r"gptq-w(\d+)(?:-g(\d+))?(-asym)?(-act)?")
    example_names = ("gptq-w4-g64", "gptq-w4-g32", "gptq-w8")
    libraries = ("gptqmodel", "optimum")

    def config_from_match(self, match):
        group = int(match.group(2)) if match.group(2) else -1
        return GptqConfig(bits=int(match.group(1)), group_size=group, symmetric=not match.group(3),
                          desc_act=bool(match.group(4)))

    def short_name(self, config):
        group = f"-g{config.group_size}" if config.group_size != -1 else ""
        return (f"gptq-w{config.bits}{group}" + ("" if config.symmetric else "-asym")
                + ("-act" if config.desc_act else ""))

    def check_model(self, config, linear_shapes):
        check_group_size(config.group_size, linear_shapes)

    def layout_note(self, config):
        return GPTQ_LAYOUT

    def bias_dtype_bytes(self, config, device):
        return 2  # GPTQ checkpoints keep biases in fp16

    def linear_bytes(self, config, out_features, in_features, device):
        return gptq_linear_bytes(config.bits, config.group_size, out_features, in_features)

    def cache_inputs(self, config, source_dir, *, data_dir=None, trust_remote_code=False):
        return {"calibration_sha256": resolve_calibration(config, Path(source_dir), data_dir, trust_remote_code).sha256}

    def measures_latency(self, config, device: str) -> str | None:
        if device == "cpu" and config.bits == 8:
            return "GPTQModel's 8-bit CPU kernel runs only in bf16 at ~1 token/s: accuracy-only on CPU"
        return None

    def quantize(self, config, source_dir: Path, out_dir: Path, device: str, *, data_dir=None,
                 trust_remote_code=False) -> dict:
        windows, info = calibration_windows(config, Path(source_dir), device, data_dir, trust_remote_code)
        gptqmodel = import_gptqmodel()
        # act_group_aware (GPTQModel's group-aware reordering) needs groups and excludes desc_act.
        settings = dict(bits=config.bits, group_size=config.group_size, desc_act=config.desc_act,
                        sym=config.symmetric, damp_percent=config.damp_percent, mse=config.mse,
                        act_group_aware=config.group_size > 0 and not config.desc_act)
        calib = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
        run_gptqmodel(gptqmodel.QuantizeConfig, settings, source_dir, out_dir, device, calib, trust_remote_code)
        return {"library": "gptqmodel", "format": "gptq", "calibration": info}


def import_gptqmodel():
    """Import GPTQModel with its CPU worker pool sized for this machine and its logging quietened."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a ten-line banner on import
        import gptqmodel
    _quiet_gptqmodel()
    return gptqmodel


def run_gptqmodel(config_cls, settings: dict, source_dir: Path, out_dir: Path, device: str,
                  calib: list[dict] | None, trust_remote_code: bool = False) -> None:
    """Quantize ``source_dir`` with ``config_cls(**settings)`` and save the GPTQ directory to ``out_dir``.

    GPTQModel's offload mode keeps memory near one model's size: it reads source weights layer by layer
    from the checkpoint and parks finished layers on disk (reports/bench/gptq.txt gives the peak). Its
    scratch files and logs go to a temp dir that is removed, and the
    path it records in the saved config is dropped. ``calib`` is None for weight-only configs (RTN).
    """
    import torch
    from gptqmodel import GPTQModel

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    with tempfile.TemporaryDirectory(prefix="quantlab-gptq-") as scratch:
        offload = str(Path(scratch) / "offload")
        qconfig = config_cls(**settings, offload_to_disk=True, offload_to_disk_path=offload)
        model = GPTQModel.load(str(source_dir), qconfig, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        # GPTQModel writes per-layer logs into ./logs of the working directory: keep them out of the user's.
        with contextlib.chdir(scratch):
            if calib is None:
                model.quantize(None)
            else:
                model.quantize(calib, batch_size=8 if device == "cpu" else 16, calibration_sort=None)
            model.save(str(out_dir))
        del model
    (Path(out_dir) / "quant_log.csv").unlink(missing_ok=True)
    for name in ("config.json", "quantize_config.json"):
        _drop_path(Path(out_dir) / name, offload)


def _drop_path(path: Path, prefix: str) -> None:
    """Rewrite a saved JSON file with every string under ``prefix`` (a deleted scratch dir) set to null."""
    import json

    if not path.exists():
        return

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return None if isinstance(value, str) and value.startswith(prefix) else value

    data = json.loads(path.read_text())
    cleaned = clean(data)
    if cleaned != data:
        atomic_write_text(path, json.dumps(cleaned, indent=2, sort_keys=True) + "\n")


def _quiet_gptqmodel() -> None:
    import logging

    try:
        from logbar import LogBar

        LogBar.shared().setLevel(logging.WARNING)
    except ImportError:
        pass

