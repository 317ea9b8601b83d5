import shutil

import pytest

from quantlab.errors import ModelLoadError
from quantlab.models.fingerprint import fingerprint_dir
from quantlab.models.load import load_config
from quantlab.models.shapes import linear_shapes
from quantlab.models.source import _looks_like_path, resolve_model


def test_fingerprint_follows_the_weights(tiny_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    assert fingerprint_dir(copy) == fingerprint_dir(tiny_dir)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one weight byte
    weights.write_bytes(bytes(data))
    assert fingerprint_dir(copy) != fingerprint_dir(tiny_dir)


def test_local_dir_resolves_with_fingerprint(tiny_dir):
    src = resolve_model(str(tiny_dir))
    assert src.kind == "dir" and len(src.fingerprint) == 64 and src.trust_remote_code is False


@pytest.mark.parametrize("ref,is_path", [("gpt2", False), ("org/name", False), ("./m", True), ("/a/b", True),
                                         ("a/b/c", True), ("x.gguf", True), ("~/m", True)])
def test_hub_ids_and_paths_are_told_apart(ref, is_path):
    assert _looks_like_path(ref) is is_path


def test_linear_shapes_skip_the_output_embedding(tiny_dir):
    shapes = linear_shapes(load_config(tiny_dir))
    assert "lm_head" not in shapes
    assert shapes["model.layers.0.mlp.down_proj"] == (64, 128)
    assert len(shapes) == 2 * 7


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file, not a model directory"):
        resolve_model(str(f))


def _write_gguf(path, file_type=None):
    """A GGUF header like a Q4_K_M file's: many small F32 norms beside Q4_K, Q6_K, Q5_0 and Q8_0 weights
    (zero bytes: only the header is read). Parameters: Q4_K 2048, Q6_K 512, F32 5 x 16, Q5_0 64, Q8_0 32."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    if file_type is not None:
        writer.add_file_type(file_type)
    for i in range(5):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(16, np.float32))
    for name, kind, rows, cols in (("blk.0.ffn_up.weight", "Q4_K", 4, 512), ("output.weight", "Q6_K", 2, 256),
                                   ("blk.0.attn_k.weight", "Q5_0", 1, 64), ("blk.0.attn_v.weight", "Q8_0", 1, 32)):
        qtype = gguf.GGMLQuantizationType[kind]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor(name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=qtype)
    return _finish(writer, path)


def _small_gguf(path):
    """A valid llama.cpp GGUF (three fp32 tensors, llama metadata), written with the gguf package."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 64), (writer.add_embedding_length, 32),
                       (writer.add_feed_forward_length, 64), (writer.add_head_count, 4)):
        add(value)
    rng = np.random.default_rng(0)
    for name, shape in (("token_embd.weight", (50, 32)), ("blk.0.attn_q.weight", (32, 32)), ("output_norm.weight", (32,))):
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    return _finish(writer, path)


def _finish(writer, path):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_note_names_the_file_type_and_the_parameter_mix(tmp_path):
    import gguf

    from quantlab.gguf_file import gguf_note, gguf_weights

    path = _write_gguf(tmp_path / "m.Q4_K_M.gguf", gguf.LlamaFileType.MOSTLY_Q4_K_M)
    file_type, mix = gguf_weights(path)
    assert file_type == "Q4_K_M"
    total = 2048 + 512 + 80 + 64 + 32
    assert mix == [(k, pytest.approx(100 * n / total)) for k, n in
                   (("Q4_K", 2048), ("Q6_K", 512), ("F32", 80), ("Q5_0", 64), ("Q8_0", 32))]
    note = gguf_note(path, file_type, mix)
    assert note.startswith("weights dequantized from GGUF Q4_K_M (m.Q4_K_M.gguf: Q4_K 75 %, Q6_K 19 %, F32 2.9 %, "
                           "Q5_0 2.3 %, Q8_0 1.2 % of parameters)")
    assert "the fp baseline is this GGUF dequantized, not the original bf16" in note and "dequantized F32" not in note
    bare = _write_gguf(tmp_path / "bare.gguf")
    assert gguf_weights(bare)[0] is None
    assert "from a GGUF that does not record its file type (general.file_type) (bare.gguf: Q4_K 75 %" in \
        gguf_note(bare, *gguf_weights(bare))


def test_a_conversion_noted_before_the_mix_gets_the_new_note(tmp_path, quantlab_home):
    """A cached conversion whose marker has the old note (the most frequent tensor type) is re-noted from the
    header, without converting again."""
    import json

    import gguf

    from quantlab.models.convert import convert_gguf
    from quantlab.models.fingerprint import cached_sha256

    path = _write_gguf(tmp_path / "m.gguf", gguf.LlamaFileType.MOSTLY_Q4_K_M)
    target = quantlab_home / "models" / f"m-{cached_sha256(path)[:12]}"
    target.mkdir(parents=True)
    old = {"gguf": str(path), "weight_type": "F32", "note": "weights dequantized from GGUF F32 (m.gguf); the fp "
                                                             "baseline is dequantized F32"}
    (target / "quantlab-source.json").write_text(json.dumps(old))
    folder, note = convert_gguf(path)
    assert folder == target and note.startswith("weights dequantized from GGUF Q4_K_M (m.gguf: Q4_K 75 %")
    marker = json.loads((target / "quantlab-source.json").read_text())
    assert marker["note"] == note and marker["file_type"] == "Q4_K_M" and marker["tensor_types"]["Q6_K"] > 18


@pytest.mark.parametrize("keep", [100, 2000, -64])  # cut in the header, in the tensor index, in the data
@pytest.mark.parametrize("command", [["plan"], ["quantize", "rtn-w8", "--model"]])
def test_a_truncated_gguf_is_one_line_naming_it(tmp_path, quantlab_home, keep, command):
    from click.testing import CliRunner

    from quantlab.cli import cli
    from quantlab.gguf_file import gguf_reader

    whole = _small_gguf(tmp_path / "whole.gguf").read_bytes()
    assert len(gguf_reader(tmp_path / "whole.gguf").tensors) == 3
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:keep])
    res = CliRunner().invoke(cli, [*command, str(cut)])
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert res.output.startswith(f"Error: GGUF file {cut} is truncated or corrupt ({len(whole[:keep])} bytes")
    assert res.output.rstrip().endswith("download it again")
    assert not [p for p in (quantlab_home / "models").glob("*") if not p.name.endswith(".lock")]  # nothing converted


def test_a_file_named_gguf_that_is_not_one_says_so(tmp_path):
    fake = tmp_path / "weights.gguf"
    fake.write_text("hello")
    with pytest.raises(ModelLoadError, match="is not a GGUF file \\(it does not start with 'GGUF'\\)"):
        resolve_model(str(fake))
