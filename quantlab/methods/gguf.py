"""GGUF k-quants and legacy quants, built by llama.cpp's own quantizer and run in llama.cpp.

The route, chosen by measurement (reports/bench/gguf-route.txt): llama.cpp's ``llama_model_quantize`` (through
llama-cpp-python) from an unquantized F32 GGUF. GPTQModel's GGUFConfig writes no .gguf (a safetensors directory of
ggml blocks that only GPTQModel loads), maps q4_k_m/q4_k_s/q4_k all to Q4_K for every linear (llama.cpp's Q4_K_M is a
mix: Q6_K for half of attn_v and ffn_down), zero-pads rows that are not a multiple of 256 (ggml cannot hold them;
llama.cpp falls back per tensor to Q5_0/Q5_1/Q8_0 instead), leaves the embedding in fp and takes no importance
matrix. So the artifact here is the file llama.cpp, Ollama and LM Studio run.

The F32 GGUF is written once per source from the source GGUF's tensors dequantized, with its metadata
(``quantlab.gguf_file.write_unquantized``); ``gguf-f32`` is that file itself: the engine's own fp floor against fp in
torch. The ``-imatrix`` suffix passes an importance matrix: for every linear, the mean over the calibration text's
tokens of each input column's squared activation (what llama-imatrix computes), here from the fp model in torch on
the same calibration options as GPTQ (``calibration``, ``samples``, ``tokens``, ``seed``).

A GGUF recipe needs a model loaded from a GGUF (a named model, the embedded default, or a .gguf path): its tokenizer
and metadata are llama.cpp's. A model directory is refused before work.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import quantlab.plan.terms as terms
from quantlab.engines.llamacpp import require_llama_cpp
from quantlab.errors import RecipeError
from quantlab.fsutil import cached_entry
from quantlab.gguf_file import BLOCK_BYTES, gguf_reader, write_unquantized
from quantlab.home import quantlab_home
from quantlab.layerwise.model import LayerwiseModel
from quantlab.layouts.gguf import FILE, GgufLayout
from quantlab.layouts.gguf_types import ARCHS, FTYPES, gguf_name, tensor_bytes
from quantlab.methods.base import Method
from quantlab.methods.calibration import calibration_inputs, calibration_windows
from quantlab.models.convert import SOURCE_INFO
from quantlab.models.load import load_causal_lm, load_tokenizer
from quantlab.provenance import library_version

BITS = {"f32": 32, "f16": 16, "q4_0": 4, "q4_k_s": 4, "q4_k_m": 4, "q5_k_s": 5, "q5_k_m": 5, "q6_k": 6, "q8_0": 8}
#: windows per forward when the imatrix is captured layer by layer (each forward reads every layer once)
IMATRIX_BATCH = 8
#: gguf-py's parse of a GGUF's metadata, per vocabulary entry (tokens, scores, types and merges as numpy parts):
#: write_unquantized's peak RSS above its imports, less three row blocks, was 0.15 GB for SmolLM2 (49,152 entries)
#: and 0.52 GB for Qwen2.5-Coder-1.5B (151,936): 3.5 KB per entry
METADATA_BYTES_PER_TOKEN = 3500
#: what llama_model_quantize holds beside the tensor it works on (its libraries' pages, loader, output buffers and
#: thread pool): its peak RSS above the imports, less the largest tensor's F32 pages and its quantized copy, was
#: 0.21 GB on SmolLM2 q8_0 and 0.23 GB on Qwen2.5-Coder-1.5B q4_k_m (one thread)
LLAMA_QUANTIZE_BYTES = 240 * 10**6
FTYPE_IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17,
             "q6_k": 18}  # llama.h's LLAMA_FTYPE_*


@dataclass(frozen=True)
class GgufConfig:
    qtype: str = "q4_k_m"
    imatrix: bool = False
    calibration: str = "c4_calibration"
    samples: int = 64
    tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.qtype not in FTYPES:
            raise RecipeError(f"gguf qtype '{self.qtype}' is not supported — use one of {', '.join(FTYPES)}")
        if self.imatrix and BITS[self.qtype] >= 16:
            raise RecipeError(f"an importance matrix applies to quantized types, not {self.qtype} — drop -imatrix")
        if self.samples < 1 or self.tokens < 8:
            raise RecipeError("gguf imatrix calibration needs samples ≥ 1 and tokens ≥ 8 — e.g. samples: 64, tokens: 256")

    @property
    def bits(self) -> int:
        return BITS[self.qtype]


class GgufMethod(Method):
    name = "gguf"
    config_cls = GgufConfig
    short_pattern = re.compile(r"gguf-(" + "|".join(FTYPES) + r")(-imatrix)?")
    example_names = ("gguf-q4_k_m", "gguf-q4_k_m-imatrix", "gguf-q8_0", "gguf-f32")
    libraries = ("llama_cpp", "gguf")

    def config_from_match(self, match):
        return GgufConfig(qtype=match.group(1), imatrix=bool(match.group(2)))

    def short_name(self, config):
        return f"gguf-{config.qtype}" + ("-imatrix" if config.imatrix else "")

    def explain_short_name(self, text):
        return f"GGUF types are {', '.join(FTYPES)}, with -imatrix for an importance matrix — e.g. gguf-q4_k_m"

    def check_source(self, config, source_dir: str) -> None:
        """A model loaded from a GGUF, of an architecture whose tensor types the planner predicts (``ARCHS``)."""
        origin = origin_gguf(Path(source_dir))
        arch = gguf_reader(origin).fields["general.architecture"].contents()
        if arch not in ARCHS:
            raise RecipeError(f"GGUF recipes support the {', '.join(ARCHS)} architectures, and {origin.name} is {arch} "
                              "— pick a recipe of another method for this model")

    def cache_inputs(self, config, source_dir, *, data_dir=None, trust_remote_code=False):
        inputs = {"gguf_sha256": _source_info(Path(source_dir))["gguf_sha256"], "files": f"{FILE} and the tokenizer"}
        if config.imatrix:
            inputs.update(calibration_inputs(config, source_dir, data_dir, trust_remote_code))
        return inputs

    def quantize(self, config, source_dir: Path, out_dir: Path, device: str, *, data_dir=None,
                 trust_remote_code=False, layer_by_layer: bool = False) -> dict:
        return write_gguf(config, source_dir, out_dir, device, config.qtype, data_dir=data_dir,
                          trust_remote_code=trust_remote_code, layer_by_layer=layer_by_layer)

    def quantize_layer_by_layer(self, config, source_dir: Path, out_dir: Path, device: str, *, data_dir=None,
                                trust_remote_code=False) -> dict:
        """``quantize`` with the importance matrix captured from the fp model run one decoder layer at a time
        (``quantlab.layerwise.model``); the convert and llama.cpp's quantize hold little memory either way."""
        return self.quantize(config, source_dir, out_dir, device, data_dir=data_dir,
                             trust_remote_code=trust_remote_code, layer_by_layer=True)

    def quantize_peak(self, config, sizes, device):
        """The largest of three phases, each a few tensors whatever the model's size (Qwen2.5-Coder-1.5B: 0.62 GB
        measured for the convert, 1.36 GB for llama.cpp's q4_k_m quantize, against 7.1 GB of F32 weights):

        - convert (once per source): F32 row blocks in flight, and the source's metadata as gguf-py parses it;
        - quantize: llama.cpp maps the F32 file and unmaps each tensor once quantized, so the largest tensor's
          pages, its quantized copy and llama.cpp's own memory (``LLAMA_QUANTIZE_BYTES``);
        - capture (``-imatrix``): the fp32 model loaded whole and one window's forward."""
        return gguf_quantize_peak(self.layout(config), sizes["shapes"], config.imatrix, config.tokens)

    def layer_by_layer_peak(self, config, sizes, device):
        """As ``quantize_peak``, with the imatrix captured layer by layer: one fp32 layer, the activations of
        ``IMATRIX_BATCH`` windows and the hidden states in and out of a layer."""
        if not config.imatrix:
            return None
        return gguf_layer_by_layer_peak(self.layout(config), sizes["shapes"], config.samples, config.tokens)

    def layout(self, config):
        return GgufLayout(config.qtype, config.imatrix)


def write_gguf(config, source_dir: Path, out_dir: Path, device: str, qtype: str, *, overrides=None, data_dir=None,
               trust_remote_code=False, layer_by_layer: bool = False) -> dict:
    """``out_dir/model.gguf``, llama.cpp's quantize of the source's F32 GGUF at ``qtype`` (``f32``: that file itself)
    with ``config``'s importance matrix if it asks for one and ``overrides`` (``quantize_gguf``), beside the source's
    tokenizer (the one inside the GGUF, as transformers reads it: what lm-eval tokenizes with, as for every other
    artifact). Returns the manifest's notes."""
    f32 = unquantized_gguf(Path(source_dir))
    target = Path(out_dir) / FILE
    notes = {"library": "llama.cpp", "engine": "llama.cpp", "unquantized_gguf": str(f32)}
    load_tokenizer(source_dir, trust_remote_code).save_pretrained(str(out_dir))
    if qtype == "f32":
        _link_or_copy(f32, target)
        return notes
    imatrix = None
    if config.imatrix:
        imatrix, more = calibration_importance_matrix(config, source_dir, device, data_dir, trust_remote_code,
                                                      layer_by_layer)
        notes.update(more)
    quantize_gguf(f32, target, qtype, imatrix, overrides=overrides)
    return notes


def gguf_quantize_peak(layout, shapes, imatrix: bool, tokens: int) -> dict:
    """``GgufMethod.quantize_peak`` of a GGUF layout (a file type's, or a fit's mix)."""
    peak = _convert_and_quantize(layout, shapes)
    if imatrix:
        peak["capture: fp32 model (imatrix)"] = shapes.params * 4
        peak["capture: one window's activations"] = terms.activation_bytes(shapes, tokens, 1, 4)
    return peak


def gguf_layer_by_layer_peak(layout, shapes, samples: int, tokens: int) -> dict:
    """``GgufMethod.layer_by_layer_peak`` of a GGUF layout whose importance matrix is captured layer by layer."""
    batch = min(IMATRIX_BATCH, samples)
    peak = _convert_and_quantize(layout, shapes)
    peak["capture: one fp32 layer"] = (shapes.params - shapes.unquantized["embeddings"]
                                       - shapes.unquantized["lm_head"]) * 4 // max(shapes.layers, 1)
    peak["capture: a batch's activations"] = (terms.activation_bytes(shapes, tokens, batch, 4)
                                              - batch * shapes.vocab * 4)
    peak["capture: hidden states in and out"] = 2 * batch * tokens * shapes.hidden * 4
    return peak


def _source_info(source_dir: Path) -> dict:
    path = source_dir / SOURCE_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def origin_gguf(source_dir: Path) -> Path:
    """The GGUF a model directory was converted from; a model that came from none is refused."""
    origin = _source_info(source_dir).get("gguf")
    if not origin or not Path(origin).is_file():
        raise RecipeError(f"GGUF recipes need a model loaded from a .gguf file (its tokenizer and metadata are "
                          f"llama.cpp's), and {source_dir} is not — pass a .gguf path or a named model "
                          "(quantlab models list)")
    return Path(origin)


def unquantized_gguf(source_dir: Path) -> Path:
    """The F32 GGUF of the source GGUF (cached under QUANTLAB_HOME/gguf/, by the source file's sha256)."""
    origin = origin_gguf(source_dir)
    entry = quantlab_home() / "gguf" / f"{_source_info(source_dir)['gguf_sha256'][:16]}-f32.gguf"
    cached_entry(entry, lambda tmp: write_unquantized(origin, tmp), file=True)
    return entry


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where both sit on one filesystem (the F32 file is never changed in place), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def calibration_importance_matrix(config, source_dir: Path, device: str, data_dir, trust_remote_code: bool,
                                  layer_by_layer: bool) -> tuple[dict, dict]:
    """(``importance_matrix`` of ``config``'s calibration windows, notes for the manifest), cached under
    QUANTLAB_HOME/imatrix by the source GGUF, the windows' token ids, how the model ran and the library versions:
    every GGUF recipe and fit file of one source and calibration reads the same matrix, captured once."""
    import hashlib

    import numpy as np

    windows, info = calibration_windows(config, Path(source_dir), device, data_dir, trust_remote_code)
    mode = "layer by layer" if layer_by_layer else "loaded whole"
    key = hashlib.sha256(json.dumps({
        "gguf": _source_info(Path(source_dir))["gguf_sha256"], "windows": windows, "mode": mode,
        "device": device.split(":")[0], "libs": {n: library_version(n) for n in ("torch", "transformers")}},
        sort_keys=True).encode()).hexdigest()[:24]
    entry = quantlab_home() / "imatrix" / f"{key}.npz"

    def build(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **importance_matrix(source_dir, windows, device, trust_remote_code, layer_by_layer))

    cached = cached_entry(entry, build, file=True)
    with np.load(entry) as data:
        imatrix = {name: data[name] for name in data.files}
    return imatrix, {"calibration": info, "imatrix_entries": len(imatrix), "imatrix_model": mode,
                     "imatrix_cache": {"path": str(entry), "reused": cached}}


def importance_matrix(source_dir: Path, windows: list[list[int]], device: str, trust_remote_code: bool,
                      layer_by_layer: bool = False) -> dict:
    """GGUF tensor name -> the mean over the windows' tokens of each input column's squared activation, for every
    linear (the output head too when it is not tied): llama-imatrix's statistic, from the fp model in torch, loaded
    whole (one window per forward) or run layer by layer (``IMATRIX_BATCH`` windows per forward). Only the decoder
    runs: the head's input is the decoder's output."""
    import torch

    if layer_by_layer:
        runner = LayerwiseModel(source_dir, device, trust_remote_code=trust_remote_code)
        model, tied, batch = runner.model, runner.head_tied, IMATRIX_BATCH
    else:
        model = load_causal_lm(source_dir, device=device, dtype=torch.float32, trust_remote_code=trust_remote_code)
        head = model.get_output_embeddings()
        tied, batch = head is not None and head.weight is model.get_input_embeddings().weight, 1
    sums, counts, hooks = {}, {}, []

    def add(name, x):
        x = x.detach().reshape(-1, x.shape[-1]).double()
        sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    for name, module in model.get_decoder().named_modules(prefix=_decoder_prefix(model)):
        gguf = gguf_name(name)
        if isinstance(module, torch.nn.Linear) and gguf:
            hooks.append(module.register_forward_pre_hook(lambda mod, args, gguf=gguf: add(gguf, args[0])))
    decoder = model.get_decoder()
    with torch.inference_mode():
        for start in range(0, len(windows), batch):
            hidden = decoder(torch.tensor(windows[start:start + batch], device=model.device),
                             use_cache=False).last_hidden_state
            if not tied:  # no output.weight in the GGUF when the head is the embedding
                add("output.weight", hidden)
            del hidden
    for h in hooks:
        h.remove()
    return {name: (sums[name] / counts[name]).float().cpu().numpy() for name in sums}


def _decoder_prefix(model) -> str:
    """The decoder's module name in ``model`` (``model`` for Llama and Qwen2), so linears keep their full names."""
    decoder = model.get_decoder()
    return next(name for name, module in model.named_modules() if module is decoder)


def _convert_and_quantize(layout, shapes) -> dict:
    """The convert's and llama.cpp quantize's peaks (``GgufMethod.quantize_peak``) as phases of the step."""
    tensors = layout.tensors(shapes)
    types = layout.types(shapes)
    largest = max(math.prod(shape) for shape in tensors.values())
    convert = {"convert: F32 row blocks in flight": 3 * BLOCK_BYTES,
               "convert: the source's metadata parsed": shapes.vocab * METADATA_BYTES_PER_TOKEN}
    if layout.qtype == "f32":  # the converted file itself, linked
        return convert
    return {**convert,
            "save: the largest tensor's F32 pages (llama.cpp quantize)": 4 * largest,
            "save: its quantized copy": max(tensor_bytes(types[n], tensors[n]) for n in tensors),
            "save: llama.cpp's own": LLAMA_QUANTIZE_BYTES}


def quantize_gguf(source: Path, target: Path, qtype: str, imatrix: dict | None = None,
                  overrides: dict[str, str] | None = None) -> None:
    """``llama_model_quantize`` from ``source`` into ``target`` at ``qtype``, with an importance matrix if given.
    ``overrides`` (GGUF tensor -> ggml type) is llama-quantize's ``--tensor-type`` list: one anchored pattern per
    tensor (``tt_overrides``, the array the tool builds from the list), the file type's mixture rules off
    (``pure``), so each listed tensor gets its type, then llama.cpp's fallback where its block does not divide the
    rows. llama.cpp applies overrides only under a quantized file type, which ``qtype`` must then be."""
    import ctypes

    import numpy as np
    import torch

    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPE_IDS[qtype]
    params.nthread = torch.get_num_threads()
    keep = []  # the arrays llama.cpp reads must outlive the call
    if overrides:
        keep.append(_tensor_overrides(llama_cpp, overrides, keep))
        params.tt_overrides = ctypes.cast(keep[-1], ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        params.pure = True
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            keep.append(np.ascontiguousarray(values, dtype=np.float32))
            entries[i].name = name.encode()
            entries[i].data = keep[-1].ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = keep[-1].size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RecipeError(f"llama.cpp could not quantize {source.name} to {qtype} — see its log above, or try "
                          "another GGUF type")


def tensor_pattern(name: str) -> str:
    """The pattern that names one GGUF tensor and no other (llama.cpp searches patterns unanchored, first match)."""
    return "^" + re.escape(name) + "$"


def _tensor_overrides(llama_cpp, overrides: dict[str, str], keep: list):
    """llama.cpp's ``llama_model_tensor_override`` array for ``overrides``, ended by a NULL pattern."""
    from gguf import GGMLQuantizationType

    entries = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (name, kind) in enumerate(overrides.items()):
        keep.append(tensor_pattern(name).encode())
        entries[i].pattern = keep[-1]
        entries[i].type = GGMLQuantizationType[kind].value
    entries[len(overrides)].pattern = None  # the end of the list
    return entries
