"""An outside package adds a method the way the built-ins are added: a throwaway distribution on a temp path
declares it in the ``quantlab.methods`` entry-point group, and quantlab lists it, parses its recipes, plans its
bytes and quantizes with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PLUGIN = '''
"""A method outside quantlab: every weight stored as float16."""
import re
from dataclasses import dataclass

from quantlab.layouts.fp import FpLayout
from quantlab.methods.base import Method
from quantlab.models.load import load_causal_lm, save_with_tokenizer


@dataclass(frozen=True)
class HalfConfig:
    @property
    def bits(self):
        return 16


class HalfMethod(Method):
    name = "half"
    config_cls = HalfConfig
    short_pattern = re.compile(r"half")
    example_names = ("half",)

    def config_from_match(self, match):
        return HalfConfig()

    def short_name(self, config):
        return "half"

    def layout(self, config):
        return FpLayout("float16")  # a built-in layout: its bytes, load kwargs and latency support

    def quantize(self, config, source_dir, out_dir, device, *, data_dir=None, trust_remote_code=False):
        import torch

        model = load_causal_lm(source_dir, device="cpu", dtype=torch.float16, trust_remote_code=trust_remote_code)
        save_with_tokenizer(model, source_dir, out_dir, trust_remote_code)
        return {"library": "transformers", "dtype": "float16"}
'''


def _install(root):
    """A distribution as pip would leave it: the module and a dist-info with its entry points."""
    root.mkdir(parents=True)
    (root / "quantlab_half.py").write_text(PLUGIN)
    info = root / "quantlab_half-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: quantlab-half\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[quantlab.methods]\nhalf = quantlab_half:HalfMethod\n")
    return root


def _quantlab(args, env):
    return subprocess.run([sys.executable, "-m", "quantlab.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_an_installed_plugin_method_joins_like_a_builtin(tmp_path, tiny_dir, quantlab_home):
    plugin = _install(tmp_path / "site")
    env = {**os.environ, "QUANTLAB_HOME": str(quantlab_home)}
    without = _quantlab(["methods", "--json"], env)
    assert without.returncode == 0 and "half" not in [r["method"] for r in json.loads(without.stdout)]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugin), env.get("PYTHONPATH")]))
    listed = _quantlab(["methods", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    rows = {r["method"]: r for r in json.loads(listed.stdout)}
    assert rows["half"]["target"] == "quantlab_half:HalfMethod" and rows["half"]["examples"] == ["half"]
    assert list(rows)[:6] == ["fp", "bnb", "rtn", "gptq", "torchao", "qat"]

    plan = _quantlab(["plan", str(tiny_dir), "--recipes", "fp,half", "--device", "cpu", "--json"], env)
    assert plan.returncode == 0, plan.stderr
    by = {r["recipe"]: r["weights_bytes"] for r in json.loads(plan.stdout)["recipes"]}
    assert by["fp"] * 0.49 < by["half"] < by["fp"] * 0.51  # parameters at 2 bytes instead of 4
    made = _quantlab(["quantize", "half", "--model", str(tiny_dir)], env)
    assert made.returncode == 0, made.stderr
    bench = _quantlab(["bench", made.stdout.strip().splitlines()[-1]], env)
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["memory"]["weights_bytes"] == by["half"]


def test_a_plugin_may_not_take_a_builtin_name(tmp_path):
    plugin = _install(tmp_path / "site")
    (plugin / "quantlab_half-0.1.dist-info" / "entry_points.txt").write_text(
        "[quantlab.methods]\nrtn = quantlab_half:HalfMethod\n")
    env = {**os.environ, "PYTHONPATH": str(plugin)}
    res = _quantlab(["methods"], env)
    assert res.returncode == 2 and "registers a method 'rtn', which is quantlab's own" in res.stderr, res.stderr
