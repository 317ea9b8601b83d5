import pytest


def _load(path, name):
    from quantlab.layouts.loading import load_recipe_model
    from quantlab.recipe import parse_recipe

    return load_recipe_model(str(path), parse_recipe(name), "cpu")


@pytest.mark.parametrize("name", ["bnb-int8", "bnb-nf4", "bnb-nf4-dq", "rtn-w4-g32"])
def test_weight_bytes_match_what_is_saved(name, tiny_dir, tmp_path):
    """Counted in-memory bytes equal the tensor bytes in the saved safetensors (within 1 %).

    bitsandbytes also saves each 4-bit layer's quant_state as a small JSON blob in a uint8 tensor;
    that is serialization metadata, not memory the loaded model holds, so it is left out."""
    from safetensors import safe_open

    from quantlab.measure.memory import weight_bytes
    from quantlab.methods import get_method
    from quantlab.recipe import parse_recipe

    recipe = parse_recipe(name)
    get_method(recipe.method).quantize(recipe.config, tiny_dir, tmp_path, "cpu")
    counted = weight_bytes(_load(tmp_path, name))["weights_bytes"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        saved = sum(fh.get_tensor(k).numel() * fh.get_tensor(k).element_size()
                    for k in fh.keys() if ".quant_state.bitsandbytes__" not in k)
    assert counted == pytest.approx(saved, rel=0.01)


def test_bnb_4bit_counts_quant_state_that_footprint_misses(tiny_dir, tmp_path):
    from quantlab.measure.memory import weight_bytes
    from quantlab.methods import get_method
    from quantlab.recipe import parse_recipe

    recipe = parse_recipe("bnb-nf4")
    get_method("bnb").quantize(recipe.config, tiny_dir, tmp_path, "cpu")
    model = _load(tmp_path, "bnb-nf4")
    counted = weight_bytes(model)
    assert counted["weights_bytes"] > model.get_memory_footprint()
    assert counted["quantized_bytes"] > 0


def test_rtn_w4_bytes_follow_the_layout(tiny_dir, tmp_path, tiny_model):
    """int4 stored one value per int8 byte + fp32 scale + int8 zero point per group of 32."""
    from quantlab.measure.memory import weight_bytes
    from quantlab.methods import get_method
    from quantlab.models.shapes import linear_shapes
    from quantlab.recipe import parse_recipe

    recipe = parse_recipe("rtn-w4-g32")
    get_method("rtn").quantize(recipe.config, tiny_dir, tmp_path, "cpu")
    shapes = linear_shapes(tiny_model.config)
    expected = sum(o * i + (o * i // 32) * (4 + 1) for o, i in shapes.values())
    assert weight_bytes(_load(tmp_path, "rtn-w4-g32"))["quantized_bytes"] == expected


def test_a_fresh_process_does_not_inherit_its_parents_peak():
    """ru_maxrss survives fork+exec; the worker must report its own peak, not the parent's."""
    import subprocess
    import sys

    from quantlab.measure.memory import peak_rss_bytes

    ballast = bytearray(600 * 1024 * 1024)  # the parent now peaks above 600 MiB
    ballast[::4096] = b"x" * len(ballast[::4096])
    out = subprocess.run([sys.executable, "-c",
                          "from quantlab.measure.memory import peak_rss_bytes; print(peak_rss_bytes())"],
                         capture_output=True, text=True, check=True).stdout
    assert peak_rss_bytes() > 600 * 1024 * 1024
    assert int(out) < 300 * 1024 * 1024
    del ballast
