"""The gate: paired tests on per-sample scores, policies as data, exit codes 0 pass / 3 regression / 1 error."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from suite_data import write_arc

from quantlab.cli import cli
from quantlab.errors import UsageError
from quantlab.gate import stats
from quantlab.gate.policy import load_policy

ITEMS = 60


def test_mcnemar_is_exact():
    assert stats.binomial_tail(22, 26) == pytest.approx(17902 / 2 ** 26)  # 22 lost / 4 gained
    assert 2 * stats.binomial_tail(22, 26) == pytest.approx(0.000533, rel=1e-3)  # two-sided, as usually quoted
    res = stats.paired_binary([1] * 22 + [0] * 4 + [1] * 74, [0] * 22 + [1] * 4 + [1] * 74, alpha=0.05)
    assert res.drop == pytest.approx(0.18) and res.detail == {"lost": 22, "gained": 4}
    assert res.p_value < 0.001 and res.ci95[0] > 0
    even = stats.paired_binary([1, 0] * 10, [0, 1] * 10, alpha=0.05)
    assert even.drop == 0 and even.p_value > 0.5
    same = stats.paired_binary([1, 0] * 50, [1, 0] * 50, alpha=0.05)
    assert same.detectable == pytest.approx(5 / 100)  # 0.5**5 < 0.05: five lost documents at the least


def test_perplexity_test_sees_a_small_consistent_shift():
    base = [-100.0 - i for i in range(30)]
    cand = [b - 0.5 for b in base]  # every document a little worse
    res = stats.paired_perplexity(base, cand, [50] * 30, alpha=0.05)
    assert res.drop > 0 and res.p_value < 0.01
    assert res.baseline == pytest.approx(math.exp(sum(-b for b in base) / 1500))


def test_gold_logprob_is_a_log_softmax_over_choices():
    assert stats.gold_logprob([-1.0, -1.0], 0) == pytest.approx(math.log(0.5))


@pytest.mark.parametrize("text, match", [
    ("metrics:\n  - metric: arc_easy/acc\n    max_dorp: 0.1\n", "unknown key\\(s\\) max_dorp"),
    ("metrics:\n  - metric: arc_easy\n", "not <task>/<metric>"),
    ("metrics:\n  - metric: fidelity/kdl\n", "unknown fidelity metric 'kdl'"),
    ("alpha: 2\nmetrics:\n  - metric: arc_easy/acc\n", "alpha must be in"),
    ("metrics: []\n", "non-empty 'metrics:'"),
])
def test_bad_policies_are_one_line_errors(tmp_path, text, match):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=match):
        load_policy(path)


@pytest.fixture(scope="module")
def evaluated(tiny_dir, tmp_path_factory):
    """A task the fp model answers perfectly (each gold = its own preferred choice), the fp model evaluated
    twice and a deliberately damaged quantization of it (1-bit sign x row-mean weights) once."""
    root = tmp_path_factory.mktemp("gate")
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: the autouse per-test home is not set up yet
        mp.setenv("QUANTLAB_HOME", str(root / "home"))
        return _evaluate(tiny_dir, root)


def _evaluate(tiny_dir, root):
    import torch

    from quantlab.evaluate.harness import HarnessSettings, prepare_tasks, run_tasks
    from quantlab.models import load_causal_lm, load_tokenizer

    data = root / "data"
    arc = data / "arc_challenge" / "ARC-Challenge-Test.jsonl"
    write_arc(arc, ITEMS)
    settings = HarnessSettings(tasks=("arc_challenge",), data_dir=str(data))
    rows = run_tasks(load_causal_lm(tiny_dir), load_tokenizer(tiny_dir), settings,
                     prepare_tasks(settings))["tasks"]["arc_challenge"]["samples"]
    write_arc(arc, ITEMS, answers=["ABCD"[max(range(4), key=r["ll"].__getitem__)] for r in rows])

    damaged = root / "damaged"
    model = load_causal_lm(tiny_dir)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings():
                w = module.weight
                w.copy_(w.sign() * w.abs().mean(dim=1, keepdim=True))
    model.save_pretrained(damaged)
    load_tokenizer(tiny_dir).save_pretrained(damaged)

    out = {}
    for name, model_dir in (("fp", tiny_dir), ("rerun", tiny_dir), ("damaged", damaged)):
        out[name] = root / f"{name}.json"
        res = CliRunner().invoke(cli, ["eval", str(model_dir), "--tasks", "arc_challenge", "--data-dir", str(data),
                                       "--output", str(out[name])])
        assert res.exit_code == 0, res.output
    return out


def _gate(*args):
    return CliRunner().invoke(cli, ["gate", *map(str, args)])


def test_rerun_of_the_same_model_passes(evaluated, tmp_path):
    fp = json.loads(evaluated["fp"].read_text())["runs"][0]["accuracy"]["tasks"]["arc_challenge"]
    assert fp["metrics"]["acc"] == 1.0
    res = _gate("--baseline", evaluated["fp"], "--candidate", evaluated["rerun"], "--summary", tmp_path / "s.md",
                "--json-out", tmp_path / "v.json")
    assert res.exit_code == 0, res.output
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert verdict["verdict"] == "pass" and all(m["drop"] == 0 for m in verdict["comparisons"][0]["metrics"])
    assert {m["metric"]: m["detectable"] for m in verdict["comparisons"][0]["metrics"]}["arc_challenge/acc"] == \
        pytest.approx(5 / ITEMS)
    assert (tmp_path / "s.md").read_text().startswith("## quantlab gate: PASS")


def test_damaged_quantization_fails_with_the_reason(evaluated, tmp_path):
    res = _gate("--baseline", evaluated["fp"], "--candidate", evaluated["damaged"], "--json-out", tmp_path / "v.json")
    assert res.exit_code == 3, res.output
    metrics = {m["metric"]: m for m in json.loads((tmp_path / "v.json").read_text())["comparisons"][0]["metrics"]}
    acc = metrics["arc_challenge/acc"]
    assert acc["verdict"] == "regression" and acc["p_value"] < 0.05 and acc["detail"]["lost"] > acc["detail"]["gained"]
    assert "degraded by" in acc["reason"] and "REGRESSION" in res.output


def test_policy_thresholds_tolerate_a_drop_within_them(evaluated, tmp_path):
    policy = tmp_path / "loose.yaml"
    policy.write_text("alpha: 0.05\nmetrics:\n  - metric: arc_challenge/acc\n    max_drop: 0.95\n")
    assert _gate("--baseline", evaluated["fp"], "--candidate", evaluated["damaged"], "--policy", policy).exit_code == 0


def test_missing_task_fails_closed(evaluated, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("metrics:\n  - metric: hellaswag/acc\n")
    res = _gate("--baseline", evaluated["fp"], "--candidate", evaluated["rerun"], "--policy", policy)
    assert res.exit_code == 1 and "no per-sample scores for task 'hellaswag'" in res.output


def test_bad_reference_is_exit_1_one_line(tmp_path):
    res = _gate("--baseline", tmp_path / "nope.json", "--candidate", tmp_path / "nope.json")
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "does not exist" in res.output


def test_a_default_gate_with_nothing_to_test_fails_closed(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"runs": [{"recipe": "fp", "fidelity": {"kld_mean": 0.0}}]}))
    res = _gate("--baseline", results, "--candidate", results)
    assert res.exit_code == 1 and "no suite accuracy" in res.output
