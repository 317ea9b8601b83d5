"""A fit in GGUF formats (``fit-<budget>-gguf``): one ggml type per unit, written by llama.cpp's own quantize.

The file is what ``llama-quantize --tensor-type-file tensor-types.txt`` writes from the F32 GGUF: the same function,
``llama_model_quantize``, with the same override array (one anchored pattern per quantizable tensor, the file type's
mixture rules off), called through llama-cpp-python; the list is kept beside the file in the tool's form, so a
llama.cpp user can write the same mix again. Each tensor then takes its type, or llama.cpp's fallback where the
type's block does not divide its rows (a 576-wide row holds no Q4_K block: Q5_0), and the planner prices the same
fallback. After the write, every tensor's type in the file is checked against the allocation's.

A format's sensitivity is read from its uniform file (``uniform_gguf``: every quantizable tensor at that type, as
``llama-quantize --pure`` writes it), dequantized. With ``imatrix``, every file (uniform ones and the fit) is
quantized with the importance matrix of the fit's calibration text, as ``gguf-q4_k_m-imatrix`` is.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from quantlab.errors import RecipeError
from quantlab.gguf_file import gguf_reader
from quantlab.layouts.gguf import FILE, TENSOR_TYPE_FILE, GgufMixedLayout
from quantlab.layouts.gguf_types import EMBEDDING
from quantlab.methods.gguf import gguf_layer_by_layer_peak, gguf_quantize_peak, tensor_pattern, write_gguf
from quantlab.models.load import load_config
from quantlab.plan.shapes import model_shapes

#: the file type a mix is written under, by its most common type (llama.cpp applies overrides under a quantized
#: file type only; the header's ``general.file_type`` says it): Q8_0 when no listed type has a file type of its own
GGUF_LOADER = ("llama_cpp.Llama(path + '/model.gguf') in a fresh process, or any llama.cpp build (llama-cli, "
               "llama-server): the file names each tensor's type")
FILE_TYPE_OF = {"Q4_0": "q4_0", "Q4_K": "q4_k_m", "Q5_K": "q5_k_m", "Q6_K": "q6_k", "Q8_0": "q8_0"}


def gguf_fit_layout(config) -> GgufMixedLayout:
    type_k, type_v = config.kv_cache or ("f16", "f16")
    return GgufMixedLayout(imatrix=config.imatrix, type_k=type_k, type_v=type_v, allocation=tuple(config.allocation),
                           formats=tuple(config.formats))


def tensor_type_list(requested: dict[str, str]) -> str:
    """llama-quantize's ``--tensor-type-file`` text: ``pattern=type`` tokens, one per line, lower case (the tool
    lower-cases each pattern and matches type names case-insensitively)."""
    return "".join(f"{tensor_pattern(name)}={kind.lower()}\n" for name, kind in requested.items())


def quantize_gguf_fit(config, source_dir: Path, out_dir: Path, device: str, *, data_dir=None,
                      trust_remote_code=False, layer_by_layer: bool = False) -> dict:
    """Write the fit's GGUF (module docstring) and check each tensor's type against the allocation's."""
    if not config.allocation:
        raise RecipeError("A fit recipe is built once its allocation is solved — run it through quantlab fit, "
                          "quantize-and-compare or a sweep, which resolve it")
    source_dir = Path(source_dir)
    shapes = model_shapes(load_config(source_dir, trust_remote_code), trust_remote_code)
    layout = gguf_fit_layout(config)
    requested = layout.requested(shapes)
    counts = Counter(requested.values())
    file_type = next((FILE_TYPE_OF[k] for k, _ in counts.most_common() if k in FILE_TYPE_OF), "q8_0")
    (Path(out_dir) / TENSOR_TYPE_FILE).write_text(tensor_type_list(requested))
    notes = write_gguf(config, source_dir, out_dir, device, file_type, overrides=requested, data_dir=data_dir,
                       trust_remote_code=trust_remote_code, layer_by_layer=layer_by_layer)
    notes["route"] = ("llama_model_quantize with one tensor-type override per tensor (llama-quantize "
                      f"--tensor-type-file {TENSOR_TYPE_FILE})")
    written = {t.name: t.tensor_type.name for t in gguf_reader(Path(out_dir) / FILE).tensors}
    planned = layout.types(shapes)
    wrong = [f"{n}: {written.get(n)} (planned {planned[n]})" for n in planned if written.get(n) != planned[n]]
    if wrong:
        raise RecipeError(f"llama.cpp wrote {len(wrong)} tensor(s) at types other than the allocation's "
                          f"({', '.join(wrong[:3])}) — report this with the fit's tensor-types.txt")
    run_with = {}
    if config.kv_cache:  # a GPU plan's cache: how llama.cpp runs the file as planned
        type_k, type_v = config.kv_cache
        run_with["kv_cache"] = {"type_k": type_k, "type_v": type_v, "context": config.context, "batch": config.batch,
                                "llama_cpp": f"-c {config.context * config.batch} -np {config.batch} -ctk {type_k} "
                                             f"-ctv {type_v} -fa on"}
    return {**notes, "file_type": file_type, "unit_formats": dict(config.allocation), "tensor_types": planned,
            "loader": GGUF_LOADER, **run_with}


def gguf_fit_peak(config, shapes) -> dict:
    return gguf_quantize_peak(gguf_fit_layout(config), shapes, config.imatrix, config.tokens)


def gguf_fit_layer_by_layer_peak(config, shapes) -> dict | None:
    if not config.imatrix:
        return None
    return gguf_layer_by_layer_peak(gguf_fit_layout(config), shapes, config.samples, config.tokens)


def uniform_allocation(shapes, fmt: str) -> tuple[tuple[str, str], ...]:
    """Every quantizable tensor in ``fmt``: the embedding, each linear and an untied head, a unit each."""
    units = [EMBEDDING, *(lin.name for lin in shapes.linears)] + (["lm_head"] if shapes.head is not None else [])
    return tuple((u, fmt) for u in units)
