"""--trust-remote-code end to end: a tiny model whose config names its own code (``auto_map``) in its directory
quantizes, evaluates and is measured with the flag, and its code never runs without it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tiny import with_own_code

from quantlab.cli import cli

FAST = ["--chunk-tokens", "32", "--chunks", "4", "--repetitions", "1", "--decode-tokens", "2", "--batch-sizes", "1"]

CONFIGURATION = '''
import os

from transformers import LlamaConfig

with open(os.environ["QUANTLAB_TEST_REMOTE_MARKER"], "a") as fh:  # proof that this code ran, and where
    fh.write(f"configuration {os.getpid()}\\n")


class RemoteLlamaConfig(LlamaConfig):
    model_type = "quantlab-remote-llama"
'''

MODELING = '''
from transformers import LlamaForCausalLM

from .configuration_remote import RemoteLlamaConfig


class RemoteLlamaForCausalLM(LlamaForCausalLM):
    config_class = RemoteLlamaConfig
'''


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory, tiny_dir):
    """The tiny Llama's weights and tokenizer under a config whose model type only its own code knows."""
    return with_own_code(tiny_dir, tmp_path_factory.mktemp("remote") / "model", "quantlab-remote-llama", CONFIGURATION,
                         MODELING, "RemoteLlamaConfig", "RemoteLlamaForCausalLM")


def _compare(model, text, out, db, *flags):
    return CliRunner().invoke(cli, ["quantize-and-compare", "--model", str(model), "--recipes", "rtn-w4-g32",
                                    "--text", str(text), "--out", str(out), "--store", str(db), "--json", *FAST,
                                    *flags], obj={})


def test_remote_code_runs_only_with_the_flag(remote_dir, tiny_text, tmp_path, monkeypatch):
    marker = tmp_path / "ran.txt"
    monkeypatch.setenv("QUANTLAB_TEST_REMOTE_MARKER", str(marker))
    refused = _compare(remote_dir, tiny_text, tmp_path / "refused", tmp_path / "r.db")
    assert refused.exit_code == 1, refused.output
    line = refused.stderr.strip().splitlines()
    assert len(line) == 1 and "--trust-remote-code" in line[0] and "auto_map" in line[0], refused.stderr
    assert not marker.exists() and not (tmp_path / "refused").exists()

    res = _compare(remote_dir, tiny_text, tmp_path / "out", tmp_path / "s.db", "--trust-remote-code")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [r["recipe"] for r in data["runs"]] == ["fp", "rtn-w4-g32"]
    assert data["runs"][1]["fidelity"]["kld_mean"] > 0 and data["runs"][1]["memory"]["weights_bytes"] > 0
    assert data["model"]["trust_remote_code"] is True
    pids = {line.split()[1] for line in marker.read_text().splitlines()}
    assert len(pids) >= 3  # the planner here, and the quantize, fidelity and bench steps in their own processes
    artifact = data["runs"][1]["artifact"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"][1]["artifact"] == artifact

    marker.unlink()
    plain = CliRunner().invoke(cli, ["bench", artifact], obj={})  # the artifact needs the flag as its source did
    assert plain.exit_code == 1 and "--trust-remote-code" in plain.stderr and not marker.exists(), plain.output
