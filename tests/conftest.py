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
