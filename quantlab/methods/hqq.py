"""HQQ (half-quadratic quantization) through hqq 0.2.8's own API: calibration-free, asymmetric, grouped.

Each linear's scale and zero start from the group's min/max and the zero is refined by hqq's proximal solver, which
minimises an lp-norm (p = 0.7) of the weight error: no data, no Hessian. transformers 5.23's ``HqqConfig`` route is
broken (quantizing on load raises NotImplementedError) and transformers reloads an HQQ checkpoint silently wrong
(random weights where the codes are), so quantlab drives hqq directly (``AutoHQQHFModel.quantize_model``), saves
with ``save_pretrained`` and reloads through hqq (``quantlab.layouts.hqq``).

``iters`` caps the proximal solver's iterations (hqq's default 20; it stops early once the error rises). 5 is the
default here: on SmolLM2 w4-g64 it gave the fidelity of 20 (KLD 0.2347 against 0.2373, inside each other's 95 %
interval) for about half the quantize CPU time (7.7 and 10.2 s against 17.1, back to back), and a low cost is what
this method is for (docs/recipes.md, "HQQ").
"""

from __future__ import annotations

import contextlib
import re
from functools import partial
from dataclasses import dataclass
from pathlib import Path

from quantlab.device import as_device
from quantlab.errors import RecipeError
from quantlab.layouts.hqq import HqqLayout
from quantlab.layerwise.quantize import save_companions, write_layer_by_layer
from quantlab.methods.base import Method, check_group_size, layer_by_layer_write_peak
from quantlab.models.load import load_causal_lm, save_with_tokenizer

_BITS = (8, 4)
_GROUPS = (32, 64, 128)
#: hqq's proximal solver settings but the iteration cap (hqq.core.optimize.optimize_weights_proximal_legacy)
_PROXIMAL = {"lp_norm": 0.7, "beta": 1e1, "kappa": 1.01}
#: groups (rows of the solver's (groups, group size) view) solved at a time: 1024 x 64 fp32 values, 256 KiB, below
#: the 1 MiB above which a budgeted step has glibc map and unmap every allocation (``return_freed_memory``)
SOLVER_BLOCK_GROUPS = 1024


@dataclass(frozen=True)
class HqqConfig:
    bits: int = 4
    group_size: int = 64
    iters: int = 5

    def __post_init__(self):
        if self.bits not in _BITS:
            raise RecipeError(f"hqq bits must be 8 or 4 (got {self.bits}) — use hqq-w4-g64 or hqq-w8-g64")
        if self.group_size not in _GROUPS:
            raise RecipeError(f"hqq group_size must be one of {', '.join(map(str, _GROUPS))} (got {self.group_size})")
        if not 1 <= self.iters <= 100:
            raise RecipeError(f"hqq iters must be in [1, 100] (got {self.iters}) — hqq's own default is 20")


class HqqMethod(Method):
    name = "hqq"
    config_cls = HqqConfig
    short_pattern = re.compile(r"hqq-w(\d+)-g(\d+)")
    example_names = ("hqq-w4-g64", "hqq-w4-g32", "hqq-w4-g128", "hqq-w8-g64")
    libraries = ("hqq",)

    def config_from_match(self, match):
        return HqqConfig(bits=int(match.group(1)), group_size=int(match.group(2)))

    def short_name(self, config):
        return f"hqq-w{config.bits}-g{config.group_size}"

    def explain_short_name(self, text):
        if re.fullmatch(r"hqq-w\d+", text):
            return "hqq quantizes in groups — name one: hqq-w4-g64 (or g32, g128)"
        return None

    def check_model(self, config, linear_shapes):
        check_group_size(config.group_size, linear_shapes)
        # hqq's 4-bit packing pairs the first half of a layer's groups with the second half
        odd = sorted(name for name, (out, k) in linear_shapes.items()
                     if config.bits == 4 and out * k // config.group_size % 2)
        if odd:
            raise RecipeError(f"hqq 4-bit packs groups in pairs, and {', '.join(odd)} has an odd number of groups of "
                              f"{config.group_size} — use another group size")

    def preload(self, config):
        """``import hqq`` imports nothing: import the modules ``quantize`` uses (torch._dynamo and torchao come with
        them, about 2 s), so the cost baseline includes them as it does every other method's library."""
        super().preload(config)
        import hqq.models.hf.base  # noqa: F401

    def quantize(self, config, source_dir: Path, out_dir: Path, device: str, *, data_dir=None,
                 trust_remote_code=False) -> dict:
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        dtype = self.layout(config).load_kwargs(device)["dtype"]
        model = load_causal_lm(source_dir, device=device, trust_remote_code=trust_remote_code, dtype=dtype)
        settings = BaseQuantizeConfig(nbits=config.bits, group_size=config.group_size, axis=1)
        with proximal_iterations(config.iters):
            AutoHQQHFModel.quantize_model(model, quant_config=settings, compute_dtype=dtype,
                                          device=str(as_device(device)))
        save_with_tokenizer(model, source_dir, out_dir, trust_remote_code)
        return {"library": "hqq", "format": "hqq safetensors (save_pretrained of HQQLinear state)",
                "proximal_iters": config.iters}

    def quantize_peak(self, config, sizes, device):
        """The fp model loaded whole, and the quantized model as its linears are replaced one at a time (each fp
        weight is dropped once its HQQLinear exists, but the checkpoint's mapped pages stay resident); the proximal
        solver holds about six fp32 copies of the linear it works on (the weight, its codes, the estimate, the error
        and temporaries of the shrinkage). SmolLM2 w4-g64, 739 MB planned: 684 MB peak above the libraries with freed
        memory returned as a budgeted step does (``return_freed_memory``); without, glibc keeps the solver's freed
        blocks and the quantize step held 0.76-1.55 GB in six runs."""
        largest = max((lin.out_features * lin.in_features for lin in sizes["shapes"].linears), default=0)
        return {"fp model": sizes["fp_weights"], "quantized model": sizes["quantized_weights"],
                "solver: six fp32 copies of the largest linear": 6 * largest * 4}

    def quantize_layer_by_layer(self, config, source_dir: Path, out_dir: Path, device: str, *, data_dir=None,
                                trust_remote_code=False) -> dict:
        """``quantize`` one decoder layer at a time (``quantlab.layerwise.quantize.write_layer_by_layer``): each
        linear of a layer becomes the ``HQQLinear`` ``quantize_model`` makes of it, and the layer's state is
        written as ``save_pretrained`` writes it; the tensors outside the layers are cast to the compute dtype, as
        hqq casts them. The same tensors as the whole-model route (tests/test_hqq.py)."""
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        dtype = self.layout(config).load_kwargs(device)["dtype"]
        settings = BaseQuantizeConfig(nbits=config.bits, group_size=config.group_size, axis=1)
        target = str(as_device(device))

        def quantize_layer(layer):
            import torch

            for name, module in list(layer.named_modules()):
                if isinstance(module, torch.nn.Linear):
                    quantized = HQQLinear(module, settings, compute_dtype=dtype, device=target)
                    quantized.device = target
                    layer.set_submodule(name, quantized)

        with proximal_iterations(config.iters):
            model_config = write_layer_by_layer(source_dir, out_dir, quantize_layer, dtype=dtype,
                                                trust_remote_code=trust_remote_code)
        model_config.dtype = dtype
        save_companions(source_dir, out_dir, model_config, trust_remote_code)
        return {"library": "hqq", "format": "hqq safetensors (save_pretrained of HQQLinear state)",
                "proximal_iters": config.iters, "written": "layer by layer from the safetensors, one shard per layer"}

    def layer_by_layer_peak(self, config, sizes, device):
        """One fp layer at the compute dtype, its quantized copy, and the solver's six fp32 copies of the largest
        linear; the tensors outside the layers are copied in blocks beforehand."""
        largest = max((lin.out_features * lin.in_features for lin in sizes["shapes"].linears), default=0)
        return layer_by_layer_write_peak(self.layout(config), sizes, device,
                                         {"layers: solver, six fp32 copies of the largest linear": 6 * largest * 4})

    def layout(self, config):
        return HqqLayout(config.bits, config.group_size)


@contextlib.contextmanager
def proximal_iterations(iters: int):
    """Cap hqq's proximal solver at ``iters`` iterations while the block runs, solving in blocks of groups
    (``solve_in_blocks``). hqq exposes no such setting per call: ``Quantizer.optimize_weights`` is a class attribute,
    looked up at each call, and is restored afterwards."""
    from hqq.core.quantize import Quantizer

    default = Quantizer.optimize_weights
    Quantizer.optimize_weights = partial(solve_in_blocks, opt_params={**_PROXIMAL, "iters": iters})
    try:
        yield
    finally:
        Quantizer.optimize_weights = default


def solve_in_blocks(tensor, scale, zero, min_max, axis=0, device=None, opt_params=None, verbose=False):
    """hqq's proximal solver (``optimize_weights_proximal_legacy``) over ``SOLVER_BLOCK_GROUPS`` groups at a time.

    Each group's scale and zero are solved from that group's weights alone (every operation of the solver is per
    element or per group), so blocks give the whole tensor's result while each block's temporaries stay in the CPU's
    cache: on a 8960 x 1536 linear at one thread 0.52 s against 2.44 s whole (0.80 s under a budget's allocator
    setting, where blocks of 1 MiB took 1.93 s: each temporary mapped and unmapped). The one thing a block does on its own is
    hqq's early stop (an iteration that raises the mean error ends the solve): a block stops on its own error where
    the whole tensor stops on the mean over all groups. With 5 iterations on SmolLM2 and Qwen2.5-Coder-1.5B every
    iteration lowered it, and the artifacts are the whole-tensor solve's, byte for byte
    (tests/test_hqq.py checks the solver; reports/bench/hqq-cost.txt times it)."""
    import torch
    from hqq.core.optimize import optimize_weights_proximal_legacy

    solve = partial(optimize_weights_proximal_legacy, axis=axis, device=device, opt_params=opt_params, verbose=verbose)
    if axis != 1 or tensor.shape[0] <= SOLVER_BLOCK_GROUPS:
        return solve(tensor, scale, zero, min_max)
    parts = [solve(tensor[i:i + SOLVER_BLOCK_GROUPS], scale[i:i + SOLVER_BLOCK_GROUPS], zero[i:i + SOLVER_BLOCK_GROUPS],
                   min_max) for i in range(0, tensor.shape[0], SOLVER_BLOCK_GROUPS)]
    return tuple(torch.cat(column) for column in zip(*parts))
