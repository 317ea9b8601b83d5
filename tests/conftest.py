"""Tiny models built in code; QUANTLAB_HOME points at a temp dir so no test touches the user's cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_llama_dir, write_text  # noqa: E402


@pytest.fixture(autouse=True)
def quantlab_home(tmp_path, monkeypatch):
    home = tmp_path / "quantlab-home"
    monkeypatch.setenv("QUANTLAB_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_llama_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("text") / "ref.txt")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="session")
def gptq_calib(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt", words=8000, seed=7)


@pytest.fixture(scope="session")
def gptq_artifacts(tiny_dir, gptq_calib, tmp_path_factory) -> dict:
    """GPTQ of the tiny model at 4 bits (groups of 32) and 8 (per channel), 16 calibration windows of 64 tokens:
    bits -> (artifact dir, the method's notes, recipe). Quantized once per session (GPTQModel takes a while)."""
    from quantlab.methods import get_method
    from quantlab.recipe import recipe_from_mapping

    out = {}
    for bits, group in ((4, 32), (8, -1)):
        recipe = recipe_from_mapping({"method": "gptq", "bits": bits, "group_size": group,
                                      "calibration": str(gptq_calib), "samples": 16, "tokens": 64}, "test")
        target = tmp_path_factory.mktemp(recipe.name)
        out[bits] = (target, get_method("gptq").quantize(recipe.config, tiny_dir, target, "cpu"), recipe)
    return out
