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

import re
from dataclasses import dataclass
from pathlib import Path

from quantlab.device import as_device
from quantlab.errors import RecipeError
from quantlab.conv1d import CONV1D_PACKED, conv1d_note, count_conv1d
from quantlab.layouts.gptq import GptqPackedLayout
from quantlab.methods.base import Method, check_group_size
from quantlab.methods.calibration import calibration_inputs, calibration_windows
from quantlab.methods.gptqmodel_runner import import_gptqmodel, run_gptqmodel

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


class GptqMethod(Method):
    name = "gptq"
    config_cls = GptqConfig
    short_pattern = re.compile(r"gptq-w(\d+)(?:-g(\d+))?(-asym)?(-act)?")
    example_names = ("gptq-w4-g64", "gptq-w4-g32", "gptq-w8")

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

    def quantize_peak(self, config, sizes, device):
        """GPTQModel with its disk offload (``run_gptqmodel``) keeps the model a meta shell and reads each part from
        the safetensors when its turn comes, through a memory map and into a copy (both resident while it is read),
        parking each finished part on disk. Its phases never overlap:

        - capture: the input embedding read, and the calibration inputs of the first layer;
        - layers: one fp layer read; the calibration inputs and outputs of every window; one Hessian (in x in, fp32)
          per linear of the layer; and the solve of its largest-input linear: its Hessian's Cholesky factor and
          inverse, the weight, its quantized copy and the error, in fp32;
        - save (GPTQModel 7.6 ``models/writer.py``): the embedding and head read back from the checkpoint (the
          head through a memory map and into a copy), one of them copied again as it is written
          (``tensor.numpy().tobytes()``); the packed layers go from their offload files to the shard in 32 MiB
          blocks, never whole.

        What GPTQModel still holds from quantizing when the save begins is not planned: with two decoder layers of
        Qwen2.5-Coder-1.5B's shape it held 0.43 GB then, and the save added 2.73 GB to it against 2.83 GB planned
        (``reports/bench/gptq-save.txt``). Without a budget glibc also keeps freed blocks in its heap unless told
        to return them, which budgeted steps do (``quantlab.measure.memory.return_freed_memory``).
        """
        shapes = sizes["shapes"]
        elem = as_device(device).default_dtype_bytes
        # one per linear of a layer (and one for all experts alike): the name without its indices, where GPT-2's
        # attn.c_proj and mlp.c_proj stay two
        per_layer = {re.sub(r"\.\d+(?=\.)", "", lin.name): (lin.out_features, lin.in_features)
                     for lin in shapes.linears}
        out, widest = max(per_layer.values(), key=lambda s: s[1], default=(0, 0))
        windows = config.samples * config.tokens * shapes.hidden * 4
        embed = shapes.unquantized["embeddings"] * elem
        tables = (embed, shapes.unquantized["lm_head"] * elem)  # the head is 0 when tied to the embedding
        return {"capture: the embedding, mapped and copied": 2 * embed, "capture: first layer's inputs": windows,
                "layers: one fp layer, mapped and copied": 2 * sizes["layer"],
                "layers: calibration inputs and outputs": 2 * windows,
                "layers: hessians": sum(k * k * 4 for _, k in per_layer.values()),
                "layers: largest solve": 2 * widest * widest * 4 + 3 * out * widest * 4,
                "save: the embedding and head, read back": sum(tables),
                "save: one of them copied as it is written": max(tables),
                "save: the packed layers, copied in blocks": 32 * 2**20}

    def layout(self, config):
        return GptqPackedLayout(config.bits, config.group_size)

    def cache_inputs(self, config, source_dir, *, data_dir=None, trust_remote_code=False):
        return calibration_inputs(config, source_dir, data_dir, trust_remote_code)

    def quantize(self, config, source_dir: Path, out_dir: Path, device: str, *, data_dir=None,
                 trust_remote_code=False) -> dict:
        windows, info = calibration_windows(config, Path(source_dir), device, data_dir, trust_remote_code)
        gptqmodel = import_gptqmodel()
        # act_group_aware (GPTQModel's group-aware reordering) needs groups and excludes desc_act.
        settings = dict(bits=config.bits, group_size=config.group_size, desc_act=config.desc_act,
                        sym=config.symmetric, damp_percent=config.damp_percent, mse=config.mse,
                        act_group_aware=config.group_size > 0 and not config.desc_act)
        run_gptqmodel(gptqmodel.QuantizeConfig, settings, source_dir, out_dir, device, windows, trust_remote_code)
        return {"library": "gptqmodel", "format": "gptq", "calibration": info,
                **conv1d_note(count_conv1d(source_dir, trust_remote_code), CONV1D_PACKED)}
