import shutil

import pytest

from quantlab.errors import ModelLoadError
from quantlab.models import _looks_like_path, fingerprint_dir, linear_shapes, load_config, resolve_model


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
