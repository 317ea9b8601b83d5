import pytest
import torch

from quantlab.measure import latency as lat


def test_both_cache_paths_decode_what_generate_decodes(tiny_model):
    ids = lat._prompt(tiny_model, 2, 16)
    with torch.inference_mode():
        expected = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                       do_sample=False)[:, -1:]
        for path in lat.DECODE_PATHS:
            assert torch.equal(lat._decode(tiny_model, ids, 5, path, None), expected), path


def test_repetitions_decode_from_copies_of_one_prefilled_cache(tiny_model):
    """Each timed repetition starts from a copy of the prefilled cache and decodes the same tokens."""
    import copy

    ids = lat._prompt(tiny_model, 2, 16)
    with torch.inference_mode():
        for path in lat.DECODE_PATHS:
            fresh = lat._decode(tiny_model, ids, 5, path, None)
            cache, first = lat._prefill(tiny_model, ids, 5, path)
            for _ in range(3):
                again = lat._decode_from(tiny_model, copy.deepcopy(cache), first, ids.shape[1], 5, None)
                assert torch.equal(again, fresh), path


def test_measure_latency_keeps_raw_samples(tiny_model):
    settings = lat.LatencySettings(prompt_tokens=16, decode_tokens=3, batch_sizes=(1, 2), repetitions=3)
    result = lat.measure_latency(tiny_model, settings, "cpu")
    assert result["decode_path"]["chosen"] in lat.DECODE_PATHS
    assert len(result["prefill_ms_samples"]) == 3 and result["prefill_ms"]["median"] > 0
    for b in ("1", "2"):
        assert len(result["decode_tok_s_samples"][b]) == 3
        assert result["decode_tok_s"][b]["median"] > 0 and result["decode_tok_s"][b]["n"] == 3


def test_a_model_that_decodes_on_neither_cache_path_is_one_error(tiny_dir):
    """Both trials fail (the prompt draws token ids past the embedding table): an error naming both failures,
    not min() of nothing."""
    from transformers import AutoModelForCausalLM

    from quantlab.errors import MeasurementError

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    model.config.vocab_size = 10**6
    settings = lat.LatencySettings(prompt_tokens=8, decode_tokens=2, batch_sizes=(1,), repetitions=1)
    with pytest.raises(MeasurementError, match=r"Decode failed on both KV-cache paths \(dynamic cache failed: "
                                               r"IndexError: .*; static cache failed: IndexError: .*\), so its "
                                               r"latency cannot be measured on cpu — fix"):
        lat.measure_latency(model, settings, "cpu")


def test_median_iqr():
    assert lat.median_iqr([1, 2, 3, 4, 5]) == {"median": 3.0, "iqr": 2.0, "n": 5}


def test_roofline_fraction():
    r = lat.roofline("NVIDIA H200", bytes_per_step=16e9, steps_per_s=150)
    assert r["gpu_key"] == "H200" and r["percent_of_roofline"] == pytest.approx(100 * 16e9 * 150 / 4.8e12)
    assert lat.roofline("Some Unknown GPU", 1, 1) is None


@pytest.mark.parametrize("key", list(lat.HBM_BANDWIDTH))
def test_each_known_gpu_matches_its_own_entry(key):
    """Every name in the table finds itself, not an entry that is a substring of it (L4 in L40S) or one it is a
    substring of."""
    assert lat.roofline(f"NVIDIA {key}", 1, 1)["gpu_key"] == key


@pytest.mark.parametrize("name, key", [
    ("NVIDIA L40", "L40"), ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"), ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB"), ("NVIDIA A100-SXM4-40GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"), ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("Tesla T4", "T4"),
    ("Tesla V100-SXM2-16GB", "V100"), ("NVIDIA GeForce RTX 4080", None), ("NVIDIA T400", None),
])
def test_device_names_match_whole_words(name, key):
    assert (lat.roofline(name, 1, 1) or {}).get("gpu_key") == key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compare_on_tiny_model(tiny_dir, tiny_text, tmp_path):
    """CUDA path: bnb quantizes on the GPU, timings use CUDA events, peak is max reserved."""
    import json

    from click.testing import CliRunner

    from quantlab.cli import cli

    res = CliRunner().invoke(cli, ["quantize-and-compare", "--model", str(tiny_dir), "--recipes", "bnb-nf4",
                                   "--text", str(tiny_text), "--out", str(tmp_path / "o"), "--device", "cuda",
                                   "--chunk-tokens", "32", "--chunks", "4", "--json"], obj={})
    assert res.exit_code == 0, res.output
    run = json.loads(res.stdout)["runs"][1]
    assert run["latency"]["detail"]["timer"] == "cuda events"
    assert run["memory"]["peak_reserved_bytes"] > 0
