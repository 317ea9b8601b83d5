"""``fit-<budget>``: a GPTQ checkpoint with one format per unit, the allocation of least predicted KLD that fits;
``fit-<budget>-gguf``: the same in GGUF formats, a llama.cpp file with one ggml type per unit
(``quantlab.methods.fit_gguf``, whose docstring says how it is written).

The recipe names a budget: weights bytes (``fit-180MiB``) or a GPU plan (``fit-gpu32GB-c8192-b1``: weights + KV
cache + activations + runtime as ``quantlab plan`` counts them, so the weights get what is left). Before it is
built the recipe is resolved (``quantlab.steps.fit``): each format's uniform GPTQ artifact is built (or reused),
the sensitivity pass measures every unit in every format, and the allocation is solved exactly; the resolved
config carries the allocation, so the artifact is cached by it. ``quantize`` then runs one GPTQ calibration with
GPTQModel's ``dynamic`` per-module overrides: each module's bits and group size, or the module left unquantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from quantlab.device import CPU, as_device
from quantlab.engines.llamacpp import KV_TYPES
from quantlab.errors import RecipeError
from quantlab.fit.units import (DEFAULT_FORMATS, GGUF_DEFAULT_FORMATS, GRANULARITIES, HEAD, family, fixed_bytes,
                                model_units, parse_format, parse_formats, split_fused, unit_bytes)
from quantlab.layouts.gguf import GgufMixedLayout
from quantlab.layouts.gptq_mixed import FP, GptqMixedLayout, fused_name
from quantlab.methods.base import Method, check_group_size
from quantlab.methods.calibration import calibration_inputs, calibration_windows
from quantlab.methods.gptq import GptqConfig, GptqMethod
from quantlab.methods.fit_gguf import (gguf_fit_layer_by_layer_peak, gguf_fit_layout, gguf_fit_peak,
                                       quantize_gguf_fit, uniform_allocation)
from quantlab.methods.gguf import GgufMethod
from quantlab.methods.gptqmodel_runner import import_gptqmodel, run_gptqmodel
from quantlab.models.load import load_config
from quantlab.plan.shapes import model_shapes
from quantlab.plan.sizes import parse_size
from quantlab.plan.terms import weight_terms

_SIZE = r"([0-9]*\.?[0-9]+(?:[KMGT]i?B|B))"
GPTQ_BLOCK = 128  # the columns GPTQModel 7.6 solves at a time (``GPTQ.quantize(blocksize=128)``)
KV_FORMATS = ("f16", "q8_0", "q4_0")  # the cache types a GGUF fit's GPU plan chooses among, unless it names others
DTYPES = {"float16": "fp16", "bfloat16": "bf16"}  # what GPTQModel's torch kernel runs in; a name's suffix for each


@dataclass(frozen=True)
class FitConfig:
    weights_budget: int | None = None  # bytes of weights as loaded, or None with gpu_mem
    gpu_mem: int | None = None  # bytes of GPU memory for weights + KV cache + activations + runtime
    context: int = 4096
    batch: int = 1
    formats: tuple[str, ...] = DEFAULT_FORMATS
    units: str = "linear"  # one format per linear: measured better than per block (reports/bench/fit-linear.txt)
    sensitivity_chunks: int = 8  # windows of 256 tokens of the calibration text the sensitivity pass measures
    calibration: str = "c4_calibration"
    samples: int = 64
    tokens: int = 256
    seed: int = 0
    dtype: str = "float16"  # the fit is held in: fp16 as vLLM runs GPTQ; bfloat16 for a model that overflows fp16
    allocation: tuple[tuple[str, str], ...] = ()  # (unit, format) in model order, once resolved
    imatrix: bool = False  # GGUF formats: every file quantized with the calibration text's importance matrix
    kv_formats: tuple[str, ...] = ()  # GGUF with gpu_mem: the cache types keys and values may take (f16 if none)
    kv_windows: int = 2  # GGUF with gpu_mem: windows of ``context`` tokens the cache types' KLD is measured on
    kv_cache: tuple[str, ...] = ()  # (type_k, type_v) once resolved (GGUF with gpu_mem)

    def __post_init__(self):
        for name in ("weights_budget", "gpu_mem"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, parse_size(value))
        formats = self.formats.split(",") if isinstance(self.formats, str) else self.formats
        object.__setattr__(self, "formats", tuple(str(f).strip() for f in formats))
        object.__setattr__(self, "allocation", tuple(tuple(pair) for pair in self.allocation))
        kv = self.kv_formats.split(",") if isinstance(self.kv_formats, str) else self.kv_formats
        object.__setattr__(self, "kv_formats", tuple(str(f).strip() for f in kv if str(f).strip()))
        if not self.kv_formats and self.gpu_mem is not None and self.family == "gguf":
            object.__setattr__(self, "kv_formats", KV_FORMATS)  # a GGUF GPU plan chooses its cache by default
        object.__setattr__(self, "kv_cache", tuple(self.kv_cache))
        if (self.weights_budget is None) == (self.gpu_mem is None):
            raise RecipeError("A fit names one budget: weights_budget (e.g. 180MiB) or gpu_mem (e.g. 32GB)")
        if (self.weights_budget or self.gpu_mem) <= 0 or self.context < 1 or self.batch < 1:
            raise RecipeError("A fit's budget, context and batch must be positive — e.g. fit-180MiB")
        if self.units not in GRANULARITIES:
            raise RecipeError(f"fit units must be one of {', '.join(GRANULARITIES)} (got {self.units!r})")
        if self.dtype not in DTYPES:
            raise RecipeError(f"fit dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.sensitivity_chunks < 1:
            raise RecipeError("fit sensitivity_chunks must be ≥ 1 — e.g. 8")
        parse_formats(self.formats)
        GptqConfig(calibration=self.calibration, samples=self.samples, tokens=self.tokens, seed=self.seed)
        self._check_family()

    def _check_family(self) -> None:
        if self.family == "gguf":
            if self.dtype != "float16":
                raise RecipeError("A GGUF fit runs in llama.cpp, which holds its own types — drop dtype / -bf16")
            if self.gpu_mem is None and self.kv_formats:
                raise RecipeError("KV cache formats are chosen within a GPU plan — give gpu_mem (fit-gpu...-gguf) "
                                  "or drop kv_formats")
            unknown = [name for name in self.kv_formats if name not in KV_TYPES]
            if unknown:
                raise RecipeError(f"Unknown KV cache type {unknown[0]!r} — use one of {', '.join(KV_TYPES)} "
                                  "(llama.cpp's -ctk/-ctv)")
            if self.kv_windows < 1:
                raise RecipeError("fit kv_windows must be ≥ 1 — e.g. 2")
        elif self.imatrix or self.kv_formats:
            raise RecipeError("An importance matrix and KV cache formats are for GGUF formats (gguf-q4_k, ...) — "
                              "drop them or use those formats")

    @property
    def family(self) -> str:
        """``gguf`` for GGUF formats (a llama.cpp file), else ``gptq``."""
        return family(parse_formats(self.formats))

    @property
    def bits(self) -> int:
        """The fewest bits any unit has: of the allocation once resolved, else of the formats."""
        chosen = {f for _, f in self.allocation} or set(self.formats)
        return min((parse_format(f).bits or 16) for f in chosen)

    def uniform(self, fmt: str) -> GptqConfig | None:
        """The uniform GPTQ recipe of one format, with this fit's calibration (None for fp)."""
        f = parse_format(fmt)
        if f.bits is None:
            return None
        return GptqConfig(bits=f.bits, group_size=f.group_size, calibration=self.calibration, samples=self.samples,
                          tokens=self.tokens, seed=self.seed)

    def module_formats(self, shapes) -> dict[str, str]:
        """Each quantizable linear's format under the allocation."""
        chosen = dict(self.allocation)
        return {name: chosen[u.name] for u in model_units(shapes, self.units) for name, _, _ in u.modules}


class FitMethod(Method):
    name = "fit"
    config_cls = FitConfig
    short_pattern = re.compile(rf"fit-(gpu)?{_SIZE}(?:-c(\d+))?(?:-b(\d+))?(?:-(bf16))?(-gguf(-imatrix)?)?")
    example_names = ("fit-180MiB", "fit-gpu32GB-c8192-b1", "fit-180MiB-bf16", "fit-100MiB-gguf",
                     "fit-100MiB-gguf-imatrix")
    resolved_first = True

    def config_from_match(self, match):
        size = parse_size(match.group(2))
        dtype = "bfloat16" if match.group(5) else "float16"
        gguf = {"formats": GGUF_DEFAULT_FORMATS, "imatrix": bool(match.group(7))} if match.group(6) else {}
        if not match.group(1):
            if match.group(3) or match.group(4):
                return None
            return FitConfig(weights_budget=size, dtype=dtype, **gguf)
        return FitConfig(gpu_mem=size, context=int(match.group(3) or 4096), batch=int(match.group(4) or 1),
                         dtype=dtype, **gguf)

    def short_name(self, config):
        held = "" if config.dtype == "float16" else f"-{DTYPES[config.dtype]}"
        if config.family == "gguf":
            held = "-gguf" + ("-imatrix" if config.imatrix else "")
        if config.weights_budget is not None:
            return f"fit-{_size_text(config.weights_budget)}{held}"
        return f"fit-gpu{_size_text(config.gpu_mem)}-c{config.context}-b{config.batch}{held}"

    def explain_short_name(self, text):
        return ("write fit-<weights bytes> (fit-180MiB, fit-1.5GB) or fit-gpu<GPU memory>-c<context>-b<batch>, "
                "-bf16 at the end to hold it in bf16 (fit-180MiB-bf16), -gguf for GGUF formats in llama.cpp "
                "(fit-100MiB-gguf, fit-100MiB-gguf-imatrix)")

    def libraries_for(self, config):
        """GPTQ's (its uniform artifacts are built and read through transformers) and the mixed layout's; a GGUF
        fit's: llama.cpp's and gguf-py's."""
        if config is not None and config.family == "gguf":
            return GgufMethod().libraries_for(None)
        return tuple(dict.fromkeys(GptqMethod().libraries_for(None) + GptqMixedLayout(()).libraries))

    def check_model(self, config, linear_shapes):
        for fmt in parse_formats(config.formats):
            if fmt.bits is not None and not fmt.ggml_type:
                check_group_size(fmt.group_size, linear_shapes)

    def check_source(self, config, source_dir):
        """A GGUF fit, as every GGUF recipe, needs a model loaded from a GGUF of an architecture the planner ports."""
        if config.family == "gguf":
            GgufMethod().check_source(None, source_dir)

    def cache_inputs(self, config, source_dir, *, data_dir=None, trust_remote_code=False):
        if config.family == "gguf":  # the source GGUF's sha256, and the calibration text's with an imatrix
            return GgufMethod().cache_inputs(config, source_dir, data_dir=data_dir, trust_remote_code=trust_remote_code)
        return calibration_inputs(config, source_dir, data_dir, trust_remote_code)

    def quantize_peak(self, config, sizes, device):
        """The GPTQ calibration's (``GptqMethod.quantize_peak``; the sensitivity pass is a step of its own), and, once
        the allocation is solved, what it adds: GPTQModel parks a module on disk only once it has quantized it, so
        every linear left fp stays in memory once read (all of them by the save), and a quantized head is solved
        in a phase of its own: the head read through a memory map and into a copy, the calibration inputs, and the
        larger of GPTQModel 7.6's two steps on the head (``quantization/gptq.py`` ``quantize``, in fp32): the
        clipping search a format with ``mse`` runs over the whole weight before the solve (the weight's copy and
        four of its size: each grid point's quantized copy, built while the last one is held, and its two
        intermediates, ``quantizer.py`` ``quantize``), and the solve (the copy, the quantized copy and the losses,
        and the first block's error carried to the columns after it, ``Err1.matmul(Hinv[i1:i2, i2:])``)."""
        if config.family == "gguf":
            return gguf_fit_peak(config, sizes["shapes"])
        gptq = GptqMethod().quantize_peak(config.uniform(_smallest(config)), sizes, device)
        if not config.allocation:
            return gptq
        shapes = sizes["shapes"]
        elem = as_device(device).default_dtype_bytes
        per_module = config.module_formats(shapes)
        kept = sum(lin.weights for lin in shapes.linears if per_module.get(lin.name) == FP) * elem
        extra = {"fp linears, kept once read": kept}
        if per_module.get(HEAD, FP) != FP and shapes.head is not None:
            head = shapes.head.weights
            solve = 3 * head + shapes.head.out_features * max(shapes.head.in_features - GPTQ_BLOCK, 0)
            search = 5 * head if _settings(parse_format(per_module[HEAD]))["mse"] else 0
            extra |= {"head: the head, mapped and copied": 2 * head * elem,
                      "head: its clipping search or solve, the larger (fp32)": max(solve, search) * 4,
                      "head: calibration inputs": config.samples * config.tokens * shapes.hidden * 4}
        return {**gptq, **extra}

    def layer_by_layer_peak(self, config, sizes, device):
        """A GGUF fit with an importance matrix captures it layer by layer (``GgufMethod``); a GPTQ fit has no such
        way."""
        return gguf_fit_layer_by_layer_peak(config, sizes["shapes"]) if config.family == "gguf" else None

    def quantize_layer_by_layer(self, config, source_dir, out_dir, device, *, data_dir=None, trust_remote_code=False):
        if config.family != "gguf":
            raise NotImplementedError("a GPTQ fit has no layer-by-layer quantize")
        return quantize_gguf_fit(config, source_dir, out_dir, device, data_dir=data_dir,
                                 trust_remote_code=trust_remote_code, layer_by_layer=True)

    def layout(self, config):
        if config.family == "gguf":
            return gguf_fit_layout(config)
        return GptqMixedLayout(tuple(config.allocation), config.units, tuple(config.formats), config.dtype)

    def quantize(self, config, source_dir, out_dir, device, *, data_dir=None, trust_remote_code=False):
        if config.family == "gguf":
            return quantize_gguf_fit(config, source_dir, out_dir, device, data_dir=data_dir,
                                     trust_remote_code=trust_remote_code)
        if not config.allocation:
            raise RecipeError("A fit recipe is built once its allocation is solved — run it through quantlab fit, "
                              "quantize-and-compare or a sweep, which resolve it")
        shapes = model_shapes(load_config(source_dir, trust_remote_code), trust_remote_code)
        per_module = config.module_formats(shapes)
        base, dynamic = gptq_dynamic(per_module)
        windows, info = calibration_windows(config, Path(source_dir), device, data_dir, trust_remote_code)
        gptqmodel = import_gptqmodel()
        run_gptqmodel(gptqmodel.QuantizeConfig, {**_settings(base), **head_settings(per_module, dynamic)}, source_dir,
                      out_dir, device, windows, trust_remote_code)
        return {"library": "gptqmodel", "format": "gptq", "calibration": info, "loader": loader(config.dtype),
                "vllm": vllm_note(per_module), "unit_formats": dict(config.allocation), "module_formats": per_module}


def loader(dtype: str) -> str:
    """How a fit artifact loads (its manifest's ``loader``), held in ``dtype``."""
    return (f"from gptqmodel import BACKEND, GPTQModel; GPTQModel.load(path, backend=BACKEND.TORCH, "
            f"dtype=torch.{dtype}).model — not transformers' from_pretrained, whose GPTQ integration (optimum) "
            "builds every module at the checkpoint's base bits and group size, ignoring the per-module dynamic overrides")


def vllm_note(formats: dict[str, str]) -> str:
    """Whether vLLM can build the checkpoint (its manifest's ``vllm``), from the format of each module or unit: vLLM
    reads the same ``dynamic`` rules but builds each fused projection (q, k, v; gate, up) in one format."""
    split = split_fused(formats)
    if not split:
        return ("vLLM's GPTQ path reads the same dynamic rules, each naming its fused projection (not run here: "
                "no GPU)")
    return (f"not loadable by vLLM: {len(split)} fused projection(s) split across formats ({', '.join(split[:2])}"
            f"{', ...' if len(split) > 2 else ''}), which vLLM builds in one format each — fit with --units fused "
            "or block for a vLLM checkpoint")


def _settings(fmt) -> dict:
    """GPTQModel settings of a format as the uniform gptq recipe runs it (quantlab.methods.gptq)."""
    gptq = GptqConfig(bits=fmt.bits, group_size=fmt.group_size)
    return dict(bits=gptq.bits, group_size=gptq.group_size, desc_act=False, sym=True, damp_percent=gptq.damp_percent,
                mse=gptq.mse, act_group_aware=gptq.group_size > 0)


def gptq_dynamic(per_module: dict[str, str]):
    """(base format, GPTQModel ``dynamic``): the most common quantized format is the base; every module in another
    gets a ``+:`` override of its settings, every unquantized one a ``-:`` rule. Each rule covers the linears of one
    fused projection when they share a format, and its pattern names the fused projection too
    (``^model\\.layers\\.3\\.self_attn\\.(?:q_proj|k_proj|v_proj|qkv_proj)$``): GPTQModel matches it to each linear,
    vLLM (``re.match`` on the name of the layer it builds) to the fused one. Patterns match the whole name."""
    counts: dict[str, int] = {}
    for f in per_module.values():
        if f != FP:
            counts[f] = counts.get(f, 0) + 1
    if not counts:
        raise RecipeError("This allocation leaves every module unquantized — it is the fp model; lower the budget")
    base = parse_format(max(counts, key=lambda f: (counts[f], f)))
    groups: dict[str, list[str]] = {}
    for name in per_module:
        if name != HEAD:  # GPTQModel's lm_head switch, not a dynamic rule, decides it (head_settings)
            groups.setdefault(fused_name(name), []).append(name)
    dynamic = {}
    for fused, names in groups.items():
        if len({per_module[n] for n in names}) == 1 and fused not in names:
            parent = fused.rpartition(".")[0]
            leaves = [n.rpartition(".")[2] for n in names] + [fused.rpartition(".")[2]]
            rules = [(f"^{re.escape(parent)}\\.(?:{'|'.join(leaves)})$", per_module[names[0]])]
        else:
            rules = [(f"^{re.escape(n)}$", per_module[n]) for n in names]
        for pattern, f in rules:
            if f == FP:
                dynamic[f"-:{pattern}"] = {}
            elif f != base.name:
                s = _settings(parse_format(f))
                dynamic[f"+:{pattern}"] = {k: s[k] for k in ("bits", "group_size", "mse", "act_group_aware")}
    return base, dynamic


def head_settings(per_module: dict[str, str], dynamic: dict) -> dict:
    """``lm_head`` and ``dynamic`` for GPTQModel: a head allocated a GPTQ format is quantized (``lm_head=True``)
    with its own settings spelled out (else GPTQModel gives it 8 bits, groups of 32); a head left fp is simply not
    quantized, so no rule names it."""
    pattern = f"^{re.escape(HEAD)}$"
    fmt = per_module.get(HEAD, FP)
    if fmt == FP:
        return {"dynamic": dynamic, "lm_head": False}
    s = _settings(parse_format(fmt))
    return {"dynamic": {**dynamic, f"+:{pattern}": {k: s[k] for k in ("bits", "group_size", "mse", "act_group_aware",
                                                                      "sym", "desc_act")}}, "lm_head": True}


def head_only(config: FitConfig, fmt: str, shapes) -> FitConfig:
    """The fit with only the untied head in ``fmt``, every linear left fp: where the head's sensitivity in ``fmt`` is
    read from. GPTQModel calibrates the head on the fp model's final hidden states, so this is the head's GPTQ
    weights with only that unit quantized, at the cost of one fp calibration forward and one solve (a uniform gptq
    recipe leaves the head fp). Its budget is its own bytes, so every fit of that model and format shares it."""
    units = model_units(shapes, "linear")
    allocation = tuple((u.name, fmt if u.name == HEAD else FP) for u in units)
    size = fixed_bytes(units, shapes, CPU) + sum(unit_bytes(u, f, shapes, CPU) for u, (_, f) in
                                                   zip(units, allocation))
    return FitConfig(weights_budget=size, formats=(FP, fmt), units="linear", calibration=config.calibration,
                     samples=config.samples, tokens=config.tokens, seed=config.seed, allocation=allocation)


def uniform_gguf(config: FitConfig, fmt: str, shapes) -> FitConfig:
    """The GGUF fit with every quantizable tensor in ``fmt`` (``llama-quantize --pure``'s file): where a format's
    sensitivity is read from. Its budget is its own bytes and its units linears, so every GGUF fit of that model,
    format and importance matrix shares it."""
    allocation = uniform_allocation(shapes, fmt)
    size = sum(weight_terms(GgufMixedLayout(allocation=allocation), shapes, CPU).values())
    return FitConfig(weights_budget=size, formats=("gguf-f32", fmt), units="linear", calibration=config.calibration,
                     samples=config.samples, tokens=config.tokens, seed=config.seed, allocation=allocation,
                     imatrix=config.imatrix)


def _smallest(config) -> str:
    return min((f for f in config.formats if f != FP), key=lambda f: parse_format(f).bits)


def _size_text(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("GB", 10**9), ("MB", 10**6), ("KiB", 2**10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def fit_fields() -> set[str]:
    return {f.name for f in fields(FitConfig)}


def resolved(config: FitConfig, allocation: dict[str, str], kv_cache: tuple[str, str] | None = None) -> FitConfig:
    return replace(config, allocation=tuple(allocation.items()), kv_cache=tuple(kv_cache or ()))
