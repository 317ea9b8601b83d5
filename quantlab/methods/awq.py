"""AWQ through GPTQModel: activation-aware weight quantization, saved in AutoAWQ's GEMM format that vLLM reads.

AWQ scales each linear's input channels by a power of their mean activation magnitude (grid-searched per group of
modules sharing an input on the calibration text) before round-to-nearest int4 with a zero point per group, and folds
the inverse scale into the preceding norm or linear; it then searches a clipping range per group. GPTQModel 7.6's
``AWQConfig`` runs it on CPU and writes ``quantization_config`` = {"quant_method": "awq", "version": "gemm",
"bits": 4, "group_size": g, "zero_point": true, ...}: the keys vLLM's ``AWQConfig.from_config`` reads (``bits`` or
``w_bit``, ``group_size`` or ``q_group_size``, ``zero_point``). The calibration text options are GPTQ's.

On CPU the source must load in fp16 or bf16 (its AWQ_TORCH packer refuses fp32) and the quantize must name
``BACKEND.AWQ_TORCH`` (its default picks the CUDA GEMM kernel). fp16 is used: the checkpoint's scales and
unquantized tensors are then fp16, AutoAWQ's and vLLM's form. It is slow on CPU: on SmolLM2 at the default 64 windows of
256 tokens, 1198 CPU-seconds (2046 s wall on the busy 2-core machine, one thread) against GPTQ's 254 s wall; 94 % of it
is the per-group scale grid (each group's modules run 20 times over every calibration row) and clip search, and this
CPU has no fast fp16 matmul.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

from quantlab.device import as_device
from quantlab.errors import RecipeError
from quantlab.layouts.awq import AwqGemmLayout
from quantlab.methods.base import Method, check_group_size
from quantlab.methods.calibration import calibration_inputs, calibration_windows
from quantlab.methods.gptqmodel_runner import import_gptqmodel, run_gptqmodel

_GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class AwqConfig:
    bits: int = 4
    group_size: int = 64
    calibration: str = "c4_calibration"
    samples: int = 64
    tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.bits != 4:
            raise RecipeError(f"awq bits must be 4, the AWQ GEMM format's (got {self.bits}) — use awq-w4-g64")
        if self.group_size not in _GROUPS:
            raise RecipeError(f"awq group_size must be one of {', '.join(map(str, _GROUPS))} (got {self.group_size})"
                              " — e.g. awq-w4-g64")
        if self.samples < 1 or self.tokens < 8:
            raise RecipeError("awq calibration needs samples ≥ 1 and tokens ≥ 8 — e.g. samples: 64, tokens: 256")


class AwqMethod(Method):
    name = "awq"
    config_cls = AwqConfig
    short_pattern = re.compile(r"awq-w(\d+)-g(\d+)")
    example_names = ("awq-w4-g64", "awq-w4-g128")

    def config_from_match(self, match):
        return AwqConfig(bits=int(match.group(1)), group_size=int(match.group(2)))

    def short_name(self, config):
        return f"awq-w{config.bits}-g{config.group_size}"

    def check_model(self, config, linear_shapes):
        check_group_size(config.group_size, linear_shapes)
        odd = sorted({n for n, _ in linear_shapes.values() if n % 8})
        if odd:
            raise RecipeError(f"AWQ packs eight output features per int32, and out-features {odd} of this model are "
                              "not multiples of 8 — use gptq or rtn for this model")

    def quantize_peak(self, config, sizes, device):
        """GPTQModel's disk offload as for GPTQ (``GptqMethod.quantize_peak``), the model in fp16:

        - capture: the input embedding read from the (fp32) source through a memory map into an fp16 copy, and the
          first layer's calibration inputs;
        - layers: one fp layer read; the calibration inputs and outputs of every window; for the largest group of
          modules sharing an input (the MLP's gate and up) the scale search's scaled copy of their weights and its
          output on every calibration row; the down projection's cached inputs and the clip search's working set;
        - save: the embedding and the head written one after the other, the larger of them at its peak: read back
          from the (fp32) source through a memory map into a copy, converted to fp16 and copied again as its bytes
          are written (``tensor.numpy().tobytes()``); the packed layers streamed in 32 MiB blocks.

        The save is the peak, as measured within a budget: SmolLM2 (tied, 16 x 256 windows) held 0.366 GB against
        0.374 GB planned, Qwen2.5-Coder-1.5B (untied, 32 x 256 windows, within 3.5 GB) 2.70 GB against 2.83 GB
        (reports/formats/qwen2.5-coder-1.5b/plan-vs-measured.txt). The layer phase is planned from GPTQModel's
        code and not measured apart."""
        shapes = sizes["shapes"]
        elem = as_device(device).default_dtype_bytes
        per_layer = {re.sub(r"\.\d+(?=\.)", "", lin.name): (lin.out_features, lin.in_features)
                     for lin in shapes.linears}
        rows = config.samples * config.tokens
        windows = rows * shapes.hidden * 2
        tables = (shapes.unquantized["embeddings"], shapes.unquantized["lm_head"])  # elements; the head 0 when tied
        widest_out = max((o for o, _ in per_layer.values()), default=0)
        return {"capture: the embedding, mapped and copied": tables[0] * (elem + 2),
                "capture: first layer's inputs": windows,
                "layers: one fp layer, mapped and copied": sizes["layer"],
                "layers: calibration inputs and outputs": 2 * windows,
                "layers: scale search outputs, two linears": 2 * rows * widest_out * 2,
                "layers: the down projection's inputs (fp16)": rows * shapes.intermediate * 2,
                "layers: the clip search (fp32, the largest linear's)": clip_search_bytes(per_layer, rows,
                                                                                          config.group_size),
                "save: the larger of embedding and head, mapped and read back": 2 * max(tables) * elem,
                "save: it in fp16, copied as it is written": 2 * max(tables) * 2,
                "save: the packed layers, copied in blocks": 32 * 2**20}

    def layout(self, config):
        return AwqGemmLayout(config.bits, config.group_size)

    def cache_inputs(self, config, source_dir, *, data_dir=None, trust_remote_code=False):
        return calibration_inputs(config, source_dir, data_dir, trust_remote_code)

    def quantize(self, config, source_dir: Path, out_dir: Path, device: str, *, data_dir=None,
                 trust_remote_code=False) -> dict:
        import torch

        windows, info = calibration_windows(config, Path(source_dir), device, data_dir, trust_remote_code)
        gptqmodel = import_gptqmodel()
        from gptqmodel.quantization.config import AWQConfig
        from gptqmodel.utils.backend import BACKEND

        # sym=False: a zero point per group ("zero_point": true), AutoAWQ's default and what vLLM's AWQ kernels run.
        settings = dict(bits=config.bits, group_size=config.group_size, sym=False)
        with _clip_search_any_width():
            run_gptqmodel(AWQConfig, settings, source_dir, out_dir, device, windows, trust_remote_code,
                          dtype=torch.float16, backend=BACKEND.AWQ_TORCH if as_device(device).is_cpu else None)
        return {"library": "gptqmodel", "library_version": gptqmodel.__version__, "format": "awq-gemm",
                "calibration": info}


#: output channels the clip search takes at a time (GPTQModel's batch where it divides them)
CLIP_CHANNELS = 256
CLIP_TOKENS = 512  # the tokens it samples (GPTQModel's n_sample_token)


def clip_search_bytes(linears: dict, rows: int, group_size: int) -> int:
    """``clip_search``'s working set for the largest of ``linears`` (name -> (out, in)) it runs on (GPTQModel skips
    q and k): the sampled tokens, one channel batch's weight and its clamped and quantized copies, and its reference
    outputs, a candidate's outputs and their squared error (groups x tokens x channels), fp32."""
    tokens = len(range(0, rows, max(1, rows // CLIP_TOKENS)))
    sizes = [tokens * k + 3 * min(o, CLIP_CHANNELS) * k + 3 * (k // group_size) * tokens * min(o, CLIP_CHANNELS)
             for name, (o, k) in linears.items() if not any(part in name for part in ("q_proj", "k_proj"))]
    return 4 * max(sizes, default=0)


@contextlib.contextmanager
def _clip_search_any_width():
    """GPTQModel 7.6's AWQ clip search, with each candidate's outputs as one batched matrix product per group in
    fp32 (``clip_search``), for a linear of any width. Restored on exit.

    GPTQModel's ``_compute_best_clip`` forms every output as an elementwise product broadcast to (channels, tokens,
    in-features) and summed, in the model's fp16: for Qwen2.5-Coder-1.5B's down_proj that is a 2.3 GB temporary for
    each of 10 clip ratios and 6 channel batches, where this CPU has no fast fp16 arithmetic (its quantize held 3.8 GB
    in a 3.5 GB budget and took about 10 minutes a layer); and it asserts that 256 or 64 divides the output channels."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    original = AWQProcessor._compute_best_clip
    AWQProcessor._compute_best_clip = clip_search
    try:
        yield
    finally:
        AWQProcessor._compute_best_clip = original


def clip_search(self, w, input_feat, n_grid: int = 20, max_shrink: float = 0.5, n_sample_token: int = 512):
    """GPTQModel's ``AWQProcessor._compute_best_clip`` (awq_processor.py), the same search: the same sampled tokens,
    clip ratios 1, 0.95, ... 0.55 of each group's largest |w|, each candidate pseudo-quantized by the processor's
    own ``_pseudo_quantize_tensor_into``, and per group the ratio whose outputs on the sampled tokens are nearest
    the unclipped weight's (mean squared error; the first of equal ones). Only the arithmetic differs: the weight
    and tokens in fp32 (GPTQModel's in the model's dtype), each group's outputs as a matrix product
    (groups, tokens, group size) @ (groups, group size, channels), channels ``CLIP_CHANNELS`` at a time. Returns
    the best clip per (channel, group), (out, groups, 1), in the weight's dtype."""
    import torch

    group_size = self.qcfg.group_size if self.qcfg.group_size > 0 else w.shape[1]
    out_features, groups = w.shape[0], w.shape[1] // group_size
    x = input_feat.reshape(-1, input_feat.shape[-1])
    x = x[::max(1, x.shape[0] // n_sample_token)].float()  # GPTQModel's step over the tokens
    x = x.reshape(-1, groups, group_size).transpose(0, 1)  # (groups, tokens, group size)
    best_all = []
    with torch.inference_mode():
        for start in range(0, out_features, CLIP_CHANNELS):
            weight = w[start:start + CLIP_CHANNELS].float().reshape(-1, groups, group_size)
            original = weight.abs().amax(dim=-1, keepdim=True)  # (channels, groups, 1)
            reference = torch.bmm(x, weight.permute(1, 2, 0))  # (groups, tokens, channels)
            best, least = original.clone(), torch.full_like(original, float("inf"))
            clamped, quantized = torch.empty_like(weight), torch.empty_like(weight)
            for step in range(int(max_shrink * n_grid)):
                bound = original * (1 - step / n_grid)
                torch.clamp(weight, -bound, bound, out=clamped)
                self._pseudo_quantize_tensor_into(clamped, quantized)
                err = (torch.bmm(x, quantized.permute(1, 2, 0)) - reference).pow_(2).mean(dim=1)  # (groups, ch)
                err = err.t().unsqueeze(-1)
                better = err < least
                least[better] = err[better]
                best[better] = bound[better]
            best_all.append(best)
    return torch.cat(best_all).to(w.dtype)
