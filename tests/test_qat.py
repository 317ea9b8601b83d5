"""QAT on a tiny model: distillation lowers the held-out KLD, convert keeps the fake-quant numerics,
and the saved artifact reloads in a fresh process with the same logits."""

import json
import subprocess
import sys

import pytest
import torch

from quantlab.errors import DataError, RecipeError
from quantlab.methods import get_method
from quantlab.recipe import parse_recipe, recipe_from_mapping

IDS = list(range(3, 40))

RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    logits = m(torch.tensor([json.loads(sys.argv[2])])).logits
print(json.dumps({"logits": logits[0].tolist(), "quantlab_imported": any(k.startswith("quantlab") for k in sys.modules)}))
"""


@pytest.fixture(scope="module")
def peaked_dir(tmp_path_factory):
    """A tiny Llama with larger init, so int4 visibly hurts and training has something to recover."""
    from tiny import build_llama_dir

    return build_llama_dir(tmp_path_factory.mktemp("peaked"), init_std=0.2)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    from tiny import write_text

    return write_text(tmp_path_factory.mktemp("train") / "train.txt", words=8000, seed=3)


def _recipe(train_file, **kw):
    params = {"method": "qat", "scheme": "w4", "group_size": 32, "steps": 30, "lr": 1e-3, "seq_len": 32,
              "heldout_windows": 4, "curve_points": 3, "train_text": str(train_file), **kw}
    return recipe_from_mapping(params, "qat-test")


@pytest.fixture(scope="module")
def trained(peaked_dir, train_file, tmp_path_factory):
    torch.set_num_threads(1)
    recipe = _recipe(train_file)
    out = tmp_path_factory.mktemp("qat-out")
    notes = get_method("qat").quantize(recipe.config, peaked_dir, out, "cpu")
    return out, notes


def test_distillation_lowers_the_heldout_kld(trained):
    _, notes = trained
    curve = notes["heldout_curve"]
    assert [p["step"] for p in curve] == [0, 10, 20, 30]
    assert curve[0]["kld"] > 0.05  # int4 hurts this model: there is something to recover
    assert curve[-1]["kld"] < 0.9 * curve[0]["kld"]
    assert curve[-1]["recovered_kld"] > 0.1
    assert notes["training"]["tokens_seen"] == 30 * 4 * 32
    assert len(notes["loss_curve"]) == 30 and all(torch.isfinite(torch.tensor(p["loss"])) for p in notes["loss_curve"])


def test_step_zero_is_the_ptq_twin(peaked_dir, train_file, tmp_path):
    """Before any training the fake-quant student is exactly the torchao PTQ recipe of the same scheme."""
    from quantlab.layouts.loading import load_recipe_model
    from quantlab.methods.qat import prepare
    from quantlab.models.load import load_causal_lm

    recipe = parse_recipe("torchao-w4-g32")
    get_method("torchao").quantize(recipe.config, peaked_dir, tmp_path, "cpu")
    ptq = load_recipe_model(str(tmp_path), recipe, "cpu")
    fake = prepare(load_causal_lm(peaked_dir), _recipe(train_file).config)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        torch.testing.assert_close(fake(ids).logits, ptq(ids).logits, atol=1e-4, rtol=1e-4)


def test_convert_and_reload_keep_the_fake_quant_numerics(peaked_dir, train_file, tmp_path):
    """Trained weights (here: perturbed) give the same logits fake-quantized in memory, converted and
    saved, and reloaded in a fresh process with plain transformers."""
    from quantlab.methods.qat import convert, prepare
    from quantlab.methods.torchao_ptq import save_quantized
    from quantlab.models.load import load_causal_lm

    config = _recipe(train_file).config
    model = prepare(load_causal_lm(peaked_dir), config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        ids = torch.tensor([IDS])
        fake_logits = model(ids).logits[0]
    convert(model).save_pretrained(tmp_path / "fp")
    save_quantized(tmp_path / "fp", peaked_dir, tmp_path / "q", config.scheme, config.group_size)
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "q"), json.dumps(IDS)],
                          capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fresh["quantlab_imported"] is False
    torch.testing.assert_close(torch.tensor(fresh["logits"]), fake_logits, atol=1e-4, rtol=1e-4)


def test_trained_artifact_reloads_with_the_training_result(trained):
    out, notes = trained
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out), json.dumps(IDS)], capture_output=True,
                          text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.isfinite(torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1])["logits"])).all()
    assert notes["train_text"]["train_windows"] > 0 and len(notes["train_text"]["sha256"]) == 64


@pytest.mark.parametrize("params, match", [
    ({"steps": 0}, "steps must be ≥ 1"),
    ({"scheme": "w3"}, "scheme 'w3' is not supported"),
    ({"lr": 0}, "lr must be in"),
])
def test_bad_settings_are_recipe_errors(train_file, params, match):
    with pytest.raises(RecipeError, match=match):
        _recipe(train_file, **params)


def test_training_text_too_short_for_one_batch(peaked_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the of and to in is " * 20)
    recipe = _recipe(short)
    with pytest.raises(DataError, match="fewer than one batch"):
        get_method("qat").quantize(recipe.config, peaked_dir, tmp_path / "out", "cpu")
    assert not (tmp_path / "out").exists()


def test_short_names_round_trip():
    for name in ("qat-w4-g32", "qat-a8w4-g64", "torchao-w4-g32", "torchao-a8w4-g32"):
        assert parse_recipe(name).name == name
    with pytest.raises(RecipeError):
        parse_recipe("qat-w3-g32")


def test_recovered_fraction_and_its_interval(tmp_path):
    """(PTQ - QAT) / (PTQ - fp) on hand-made per-token files: PTQ KLD 0.4, QAT 0.1 -> 75 % recovered."""
    import numpy as np

    from quantlab.evaluate.recovery import recovery

    rng = np.random.default_rng(0)
    nll_fp = rng.uniform(2.0, 4.0, size=(8, 16))
    files = {}
    for name, kl, extra in (("ptq", 0.4, 0.5), ("qat", 0.1, 0.25)):
        files[name] = tmp_path / f"{name}.npz"
        np.savez(files[name], kl=np.full((8, 16), kl), agree=np.ones((8, 16)), nll=nll_fp + extra,
                 nll_baseline=nll_fp)
    rec = recovery(files["qat"], files["ptq"], "torchao-w4-g32")
    assert rec["kld"] == pytest.approx(0.75)
    ppl = [float(np.exp(nll_fp.mean() + e)) for e in (0.5, 0.25, 0.0)]
    assert rec["ppl"] == pytest.approx((ppl[0] - ppl[1]) / (ppl[0] - ppl[2]))
    assert rec["ci95"]["kld"][0] == pytest.approx(0.75) == rec["ci95"]["kld"][1]  # constant KL: no spread
    assert rec["ci95"]["ppl"][0] < rec["ppl"] < rec["ci95"]["ppl"][1]


def test_recovered_fraction_of_task_accuracy():
    """fp right on 40 of 40 documents, PTQ on 20, QAT on 35 -> (35 - 20) / (40 - 20) = 75 % recovered."""
    from quantlab.evaluate.recovery import accuracy_recovery

    rows = lambda right: [{"doc_id": i, "acc": float(i < right)} for i in range(40)]  # noqa: E731
    rec = accuracy_recovery(rows(40), rows(20), rows(35), "acc", "torchao-w4-g32")
    assert rec["recovered"] == pytest.approx(0.75) and rec["documents"] == 40
    assert rec["ci95"][0] < 0.75 < rec["ci95"][1]
    assert accuracy_recovery(rows(40), rows(40), rows(35), "acc", "t")["recovered"] is None  # nothing lost


def test_a_trained_recipe_brings_its_ptq_twin():
    from quantlab.recipe import parse_recipe_list
    from quantlab.sweep.plan import with_baseline_and_twins

    names = [r.name for r in with_baseline_and_twins(parse_recipe_list("fp,qat-w4-g32,qat-a8w4-g32,torchao-a8w4-g32"))]
    assert names == ["fp", "torchao-w4-g32", "qat-w4-g32", "qat-a8w4-g32", "torchao-a8w4-g32"]  # listed: kept


def test_compare_adds_the_twin_and_the_recovered_fractions(peaked_dir, train_file, tmp_path, monkeypatch):
    """quantize-and-compare with a trained recipe: its PTQ twin joins, and the recovered fraction over it is in
    results.json and in the stored rows."""
    from click.testing import CliRunner
    from tiny import write_text

    from quantlab import store
    from quantlab.cli import cli

    exp = tmp_path / "exp.yaml"
    exp.write_text(f"recipes:\n  - {{method: qat, scheme: w4, group_size: 32, steps: 10, lr: 0.001, seq_len: 32, "
                   f"heldout_windows: 4, curve_points: 3, train_text: '{train_file}'}}\n")
    text = write_text(tmp_path / "eval.txt", words=3000, seed=11)
    res = CliRunner().invoke(cli, ["quantize-and-compare", "--model", str(peaked_dir), "--experiment", str(exp),
                                   "--text", str(text), "--out", str(tmp_path / "o"), "--store", str(tmp_path / "s.db"),
                                   "--chunk-tokens", "32", "--chunks", "8", "--repetitions", "1",
                                   "--decode-tokens", "2", "--batch-sizes", "1", "--json"], obj={})
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [r["recipe"] for r in data["runs"]] == ["fp", "torchao-w4-g32", "qat-w4-g32"]
    rec = data["runs"][2]["fidelity"]["recovery"]
    assert rec["twin"] == "torchao-w4-g32" and rec["kld"] is not None and rec["ci95"]["kld"]
    stored = {r["recipe"]: r for r in store.list_runs(tmp_path / "s.db", data["run_set"])}
    assert stored["qat-w4-g32"]["fidelity"]["recovery"] == rec
    assert all(stored[r["recipe"]]["fidelity"]["guard"] == r["guard"] for r in data["runs"])
