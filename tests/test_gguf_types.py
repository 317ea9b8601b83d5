"""The GGUF tensor types quantlab predicts against the files llama.cpp itself writes: llama-cpp-python's
llama_model_quantize on small llama- and qwen2-shaped F32 GGUFs written here (and, marked slow, on SmolLM2), every
file type in FTYPES, every tensor's type and bytes compared with what gguf.GGUFReader reads back.

llama-cpp-python is an optional extra: without it the comparisons skip, and the pure checks still run."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest

from quantlab.errors import RecipeError
from quantlab.layouts.gguf_types import FTYPES, gguf_name, tensor_bytes, tensor_types

SMOLLM2_F32 = Path(os.environ.get("QUANTLAB_SMOLLM2_GGUF", "/work/scratch/llama/gguf/smollm2-f32.gguf"))
#: quantlab's file type -> the name of llama.cpp's LLAMA_FTYPE_* constant, and of the files pyquant.py wrote
LLAMA_FTYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q4_0": "MOSTLY_Q4_0", "q4_k_s": "MOSTLY_Q4_K_S",
                "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_s": "MOSTLY_Q5_K_S", "q5_k_m": "MOSTLY_Q5_K_M",
                "q6_k": "MOSTLY_Q6_K", "q8_0": "MOSTLY_Q8_0"}

#: (arch, n_layer, hidden, ffn, n_head, n_head_kv, tied): 3, 8, 9 and 16 layers give different use_more_bits sets;
#: ffn 640 (a multiple of 32, not 256) sends ffn_down to the 32-value fallbacks, 720 (not of 32) to F16; hidden 320
#: makes every K-quant fall back and an untied output take Q8_0.
CASES = {
    "llama-8-untied": ("llama", 8, 256, 512, 4, 2, False),
    "llama-9-tied": ("llama", 9, 256, 640, 4, 1, True),
    "llama-16-h320": ("llama", 16, 320, 512, 5, 1, False),
    "qwen2-9-untied": ("qwen2", 9, 256, 768, 4, 1, False),
    "qwen2-8-tied": ("qwen2", 8, 256, 720, 4, 2, True),
    "qwen2-3-h512": ("qwen2", 3, 512, 512, 8, 2, False),
}


def model_shapes(arch, n_layer, hidden, ffn, n_head, n_head_kv, tied, vocab=288, rows=None) -> dict:
    """GGUF names and shapes (ne0 first) as convert_hf_to_gguf writes them; ``rows`` narrows every matrix to that
    many rows (quantize reads names and shapes only, it never builds the model)."""
    kv = hidden // n_head * n_head_kv
    shapes = {"token_embd.weight": (hidden, rows or vocab), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (hidden, rows or vocab)
    for i in range(n_layer):
        blk = f"blk.{i}."
        shapes.update({blk + "attn_norm.weight": (hidden,), blk + "ffn_norm.weight": (hidden,)})
        shapes.update({blk + stem: (hidden, rows or hidden) for stem in ("attn_q.weight", "attn_output.weight")})
        shapes.update({blk + stem: (hidden, rows or kv) for stem in ("attn_k.weight", "attn_v.weight")})
        shapes.update({blk + "ffn_gate.weight": (hidden, rows or ffn), blk + "ffn_up.weight": (hidden, rows or ffn),
                       blk + "ffn_down.weight": (ffn, rows or hidden)})
        if arch == "qwen2":  # qwen2 has q/k/v biases: 1-D, kept F32
            shapes.update({blk + "attn_q.bias": (hidden,), blk + "attn_k.bias": (kv,), blk + "attn_v.bias": (kv,)})
    return shapes


def write_gguf(path: Path, arch, n_layer, hidden, ffn, n_head, n_head_kv, shapes) -> Path:
    """An F32 GGUF with random weights and the keys llama_model_quantize reads (it loads hparams, not the vocab)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(n_layer)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape[::-1], dtype=np.float32))  # numpy's shape is ne reversed
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize(src: Path, dst: Path, ftype: str, imatrix: bool = False) -> Path:
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_" + LLAMA_FTYPES[ftype])
    params.nthread = 1
    if imatrix:
        # An empty list (only the terminating entry) is enough for llama.cpp to count as "has an imatrix".
        entries = (llama_cpp.llama_model_imatrix_data * 1)()
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def assert_predicted(path: Path, ftype, arch, n_layer, n_head, n_head_kv, shapes, imatrix=False) -> dict:
    """Every tensor's type and bytes, and their sum, as llama.cpp wrote them to ``path``; returns the types."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    written = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in reader.tensors}
    predicted = tensor_types(ftype, shapes, arch, n_layer, n_head, n_head_kv, imatrix=imatrix)
    ours = {name: (kind, tensor_bytes(kind, shapes[name])) for name, kind in predicted.items()}
    wrong = {name: (ours.get(name), written.get(name)) for name in written.keys() | ours.keys()
             if ours.get(name) != written.get(name)}
    assert not wrong, f"{ftype}: (predicted, written) {sorted(wrong.items())[:8]}"
    assert sum(b for _, b in ours.values()) == sum(b for _, b in written.values())
    return predicted


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("gguf-src")
    out = {}
    for key, (arch, n_layer, hidden, ffn, n_head, n_head_kv, tied) in CASES.items():
        shapes = model_shapes(arch, n_layer, hidden, ffn, n_head, n_head_kv, tied)
        out[key] = (write_gguf(folder / f"{key}.gguf", arch, n_layer, hidden, ffn, n_head, n_head_kv, shapes), shapes)
    return out


@pytest.mark.parametrize("ftype", FTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_synthetic_types_match_llama_cpp(case, ftype, sources, tmp_path):
    pytest.importorskip("llama_cpp")
    arch, n_layer, _, _, n_head, n_head_kv, _ = CASES[case]
    src, shapes = sources[case]
    types = assert_predicted(quantize(src, tmp_path / "out.gguf", ftype), ftype, arch, n_layer, n_head, n_head_kv,
                             shapes)
    assert all(types[name] == "F32" for name, shape in shapes.items() if len(shape) == 1)


def test_use_more_bits_layers_follow_the_layer_count(sources, tmp_path):
    """Q4_K_M's Q6_K layers of attn_v and ffn_down: with 8 layers 0, 3, 6, 7; with 9 also layer 8."""
    pytest.importorskip("llama_cpp")
    for case, layers in (("llama-8-untied", [0, 3, 6, 7]), ("qwen2-9-untied", [0, 3, 6, 7, 8])):
        arch, n_layer, _, _, n_head, n_head_kv, _ = CASES[case]
        src, shapes = sources[case]
        types = assert_predicted(quantize(src, tmp_path / f"{case}.gguf", "q4_k_m"), "q4_k_m", arch, n_layer,
                                 n_head, n_head_kv, shapes)
        for stem in ("attn_v", "ffn_down"):
            assert [i for i in range(n_layer) if types[f"blk.{i}.{stem}.weight"] == "Q6_K"] == layers


def test_imatrix_moves_q4_0_first_ffn_down_to_q4_1(sources, tmp_path):
    pytest.importorskip("llama_cpp")
    arch, n_layer, _, _, n_head, n_head_kv, _ = CASES["llama-16-h320"]
    src, shapes = sources["llama-16-h320"]
    types = assert_predicted(quantize(src, tmp_path / "out.gguf", "q4_0", imatrix=True), "q4_0", arch, n_layer,
                             n_head, n_head_kv, shapes, imatrix=True)
    assert [i for i in range(n_layer) if types[f"blk.{i}.ffn_down.weight"] == "Q4_1"] == [0, 1]


@pytest.mark.parametrize("arch, n_head, n_head_kv, bumped", [("llama", 8, 2, True), ("llama", 8, 8, False),
                                                            ("qwen2", 8, 8, True)])
@pytest.mark.parametrize("ftype", ["q4_k_s", "q4_k_m"])
def test_70b_attn_v_rule(arch, n_head, n_head_kv, bumped, ftype, tmp_path):
    """80 layers make llama.cpp's 70B (a llama only with GQA), whose attn_v never stays below Q5_K."""
    pytest.importorskip("llama_cpp")
    shapes = model_shapes(arch, 80, 256, 256, n_head, n_head_kv, tied=True, rows=2)
    src = write_gguf(tmp_path / "src.gguf", arch, 80, 256, 256, n_head, n_head_kv, shapes)
    types = assert_predicted(quantize(src, tmp_path / "out.gguf", ftype), ftype, arch, 80, n_head, n_head_kv, shapes)
    attn_v = {types[f"blk.{i}.attn_v.weight"] for i in range(80)}
    assert ("Q4_K" not in attn_v) == bumped


@pytest.mark.slow
@pytest.mark.parametrize("ftype", FTYPES)
def test_smollm2_types_match_llama_cpp(ftype, tmp_path):
    """SmolLM2-135M (hidden 576, 30 layers, 9/3 heads, tied): the files beside the F32 one when pyquant.py wrote
    them, else quantized here."""
    pytest.importorskip("llama_cpp")
    import gguf

    if not SMOLLM2_F32.exists():
        pytest.skip(f"no SmolLM2 F32 GGUF at {SMOLLM2_F32} (set QUANTLAB_SMOLLM2_GGUF)")
    beside = SMOLLM2_F32.parent / f"py-{ftype.upper()}.gguf"
    path = beside if beside.exists() else quantize(SMOLLM2_F32, tmp_path / "out.gguf", ftype)
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in gguf.GGUFReader(str(SMOLLM2_F32)).tensors}
    types = assert_predicted(path, ftype, "llama", 30, 9, 3, shapes)
    assert "output.weight" not in types and types["token_embd.weight"] in ("Q8_0", "F16", "F32")


def test_hf_names_map_to_gguf_names():
    assert gguf_name("model.layers.3.self_attn.v_proj") == "blk.3.attn_v.weight"
    assert gguf_name("model.layers.12.mlp.down_proj.weight") == "blk.12.ffn_down.weight"
    assert gguf_name("model.layers.0.self_attn.q_proj.bias") == "blk.0.attn_q.bias"
    assert gguf_name("model.embed_tokens") == "token_embd.weight"
    assert gguf_name("lm_head") == "output.weight"
    assert gguf_name("model.layers.3.input_layernorm") is None
    assert gguf_name("model.layers.3.mlp.act_fn") is None


def test_tensor_bytes_is_block_arithmetic():
    assert tensor_bytes("Q4_K", (256, 3)) == 3 * 144
    assert tensor_bytes("Q8_0", (576, 49152)) == 30_081_024  # SmolLM2's tied embedding as llama.cpp wrote it
    assert tensor_bytes("F32", (576,)) == 2304
    with pytest.raises(RecipeError, match="multiple of 256"):
        tensor_bytes("Q6_K", (576, 2))
    with pytest.raises(RecipeError, match="Unknown ggml type"):
        tensor_bytes("Q9_K", (256,))


def test_refusals_are_one_line_recipe_errors():
    shapes = model_shapes("llama", 1, 256, 256, 4, 2, tied=True)
    with pytest.raises(RecipeError, match="Did you mean 'q4_k_m'"):
        tensor_types("q4_km", shapes, "llama", 1, 4, 2)
    with pytest.raises(RecipeError, match="not 'gemma'"):
        tensor_types("q4_k_m", shapes, "gemma", 1, 4, 2)
    with pytest.raises(RecipeError, match="mixture-of-experts"):
        tensor_types("q4_k_m", {**shapes, "blk.0.ffn_down_exps.weight": (256, 256, 8)}, "llama", 1, 4, 2)
