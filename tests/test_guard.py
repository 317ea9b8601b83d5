import json
import shutil

import pytest
from click.testing import CliRunner

from quantlab.cli import cli
from quantlab.evaluate import guard


def test_repetition_counts_the_longest_run():
    assert guard.repetition([1, 2, 2, 2, 3]) == {"longest_run": 3, "distinct_fraction": 0.6}


def test_a_collapse_the_baseline_does_not_make_is_flagged():
    varied = list(range(32))
    assert guard.generation_reasons([7] * 32, varied) == [
        "greedy output repeats one token 32 times in a row (fp baseline at most 1)"]
    assert guard.generation_reasons(varied, varied) == []
    assert guard.generation_reasons([7] * 32, [5] * 32) == []  # the fp model repeats too: not the method's fault


def _run(recipe, method, bits, kld, top1=0.9):
    return {"recipe": recipe, "method": method, "bits": bits, "fidelity": {"kld_mean": kld, "top1_agreement": top1}}


def test_kld_far_above_rtn_is_flagged():
    runs = [_run("rtn-w4-g64", "rtn", 4, 0.4), _run("gptq-w4-g64", "gptq", 4, 1.5), _run("bnb-nf4", "bnb", 4, 0.3)]
    assert "above 3.0× round-to-nearest's 0.4000" in guard.fidelity_reasons(runs[1], runs)[0]
    assert guard.fidelity_reasons(runs[2], runs) == []
    assert guard.fidelity_reasons(runs[0], runs) == []
    eight = [_run("rtn-w8", "rtn", 8, 0.0038), _run("bnb-int8", "bnb", 8, 0.0214)]  # SmolLM2, measured
    assert guard.fidelity_reasons(eight[1], eight) == []  # 5.6x RTN but far from garbage
    assert "below 0.25" in guard.fidelity_reasons(_run("x", "bnb", 4, 0.1, top1=0.1), [])[0]


@pytest.fixture()
def broken_dir(tiny_dir, tmp_path):
    """The tiny model with its final norm zeroed: every logit is 0, so greedy decoding repeats token 0."""
    import torch
    from safetensors.torch import load_file, save_file

    target = tmp_path / "broken"
    shutil.copytree(tiny_dir, target)
    weights = load_file(str(target / "model.safetensors"))
    weights["model.norm.weight"] = torch.zeros_like(weights["model.norm.weight"])
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_eval_flags_a_collapsed_model(broken_dir, tiny_dir, tiny_text):
    res = CliRunner().invoke(cli, ["eval", str(broken_dir), "--baseline", str(tiny_dir), "--text", str(tiny_text)],
                             obj={})
    assert res.exit_code == 0, res.output
    fid = json.loads(res.stdout)["fidelity"]
    assert fid["generation"]["longest_run"] == guard.NEW_TOKENS
    assert fid["guard"]["ok"] is False and fid["guard"]["reasons"]
    healthy = CliRunner().invoke(cli, ["eval", str(tiny_dir), "--baseline", str(tiny_dir), "--text", str(tiny_text)],
                                 obj={})
    assert json.loads(healthy.stdout)["fidelity"]["guard"] == {"ok": True, "reasons": []}
