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
    assert stats.binomial_upper(22, 26, 0.5) == pytest.approx(17902 / 2 ** 26)  # 22 lost / 4 gained
    assert 2 * stats.binomial_upper(22, 26, 0.5) == pytest.approx(0.000533, rel=1e-3)  # two-sided, as usually quoted
    res = stats.paired_binary([1] * 22 + [0] * 4 + [1] * 74, [0] * 22 + [1] * 4 + [1] * 74)
    assert res.drop == pytest.approx(0.18) and res.detail == {"lost": 22, "gained": 4}
    assert res.p_value < 0.001 and res.ci95[0] > 0 and res.test.startswith("McNemar")
    even = stats.paired_binary([1, 0] * 10, [0, 1] * 10)
    assert even.drop == 0 and even.p_value > 0.5
    same = stats.paired_binary([1, 0] * 50, [1, 0] * 50)
    assert stats.detectable(same, 0.05, binary=True) == pytest.approx(5 / 100)  # 0.5**5 < 0.05: five lost at least


def test_a_drop_within_the_margin_is_the_null_and_one_beyond_it_is_not():
    # 18 of 100 documents lost, none gained: a drop of 0.18. Against "drop <= 0.15" that is 3 documents beyond
    # the tolerance (not significant); against "drop <= 0.05" it is 13 beyond (significant).
    base, cand = [1] * 100, [0] * 18 + [1] * 82
    assert stats.paired_binary(base, cand, margin=0.15).p_value > 0.05
    assert stats.paired_binary(base, cand, margin=0.05).p_value < 0.01
    assert stats.paired_binary(base, cand, margin=0.18).p_value > 0.4  # at the margin: p near one half
    assert stats.paired_binary(base, cand, margin=0.3).p_value > 0.99  # well within it


def test_shifted_p_is_the_share_of_replicates_beyond_the_estimate_recentred():
    reps = [0.0, 0.1, 0.2, 0.3, 0.4]  # estimate 0.2: recentred, replicates at -0.2 .. 0.2
    assert stats.shifted_p(reps, 0.2, 0.0) == pytest.approx((1 + 1) / 6)  # only 0.4 - 0.2 >= 0.2
    assert stats.shifted_p(reps, 0.2, 0.1) == pytest.approx((2 + 1) / 6)  # 0.3 and 0.4 lie >= 0.1 above 0.2
    assert stats.shifted_p(reps, 0.2, 0.2) == pytest.approx((3 + 1) / 6)


def test_a_candidate_at_the_margin_fails_at_most_alpha_of_the_time():
    import numpy as np

    rng = np.random.default_rng(1)
    fails = sum(stats.paired_mean(np.zeros(80), -(0.1 + rng.standard_normal(80)), margin=0.1, seed=i).p_value < 0.05
                for i in range(300))  # true degradation exactly the margin
    assert fails / 300 <= 0.05 + 2 * (0.05 * 0.95 / 300) ** 0.5  # within two standard errors of alpha
    beyond = sum(stats.paired_mean(np.zeros(80), -(0.6 + rng.standard_normal(80)), margin=0.1, seed=i).p_value < 0.05
                 for i in range(100))
    assert beyond >= 80  # 0.5 beyond the margin at se 0.11: power about 0.99


def test_holm_adjusts_step_down():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5]) == [0.5] and stats.holm([]) == []


def test_perplexity_test_sees_a_small_consistent_shift():
    base = [-100.0 - i for i in range(30)]
    cand = [b - 0.5 for b in base]  # every document a little worse
    res = stats.paired_perplexity(base, cand, [50] * 30)
    assert res.drop > 0 and res.p_value < 0.01
    assert res.baseline == pytest.approx(math.exp(sum(-b for b in base) / 1500))
    assert stats.paired_perplexity(base, cand, [50] * 30, margin=2 * res.drop).p_value > 0.5


def test_gold_logprob_is_normalised_by_each_choice_length_and_the_sum_form_is_named_so():
    assert stats.gold_logprob([-10.0, -20.0], 0, [10, 20]) == pytest.approx(math.log(0.5))  # both -1 nat/char
    assert stats.gold_logprob([-10.0, -20.0, -1.0], 1, [10, 20, 1]) == pytest.approx(math.log(1 / 3))  # chance
    assert stats.gold_logprob_sum([-10.0, -20.0], 1) == pytest.approx(-10 - math.log1p(math.exp(-10)))


@pytest.mark.parametrize("text, match", [
    ("metrics:\n  - metric: arc_easy/acc\n    max_dorp: 0.1\n", "unknown key\\(s\\) max_dorp"),
    ("metrics:\n  - metric: arc_easy\n", "not <task>/<metric>"),
    ("metrics:\n  - metric: fidelity/kdl\n", "unknown fidelity metric 'kdl'"),
    ("alpha: 2\nmetrics:\n  - metric: arc_easy/acc\n", "alpha must be in"),
    ("metrics: []\n", "non-empty 'metrics:'"),
    ("metrics:\n  - metric: arc_easy/acc\n    alpha: 0.01\n", "alpha is the policy's, family-wise"),
    ("inconclusive: maybe\nmetrics:\n  - metric: arc_easy/acc\n", "inconclusive must be 'pass' or 'fail'"),
    ("metrics: !!python/object/apply:os.system ['true']\n", "line 1: could not determine a constructor for the tag"),
    ("metrics: [\n", "line 2: invalid YAML"),
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
    from quantlab.models.load import load_causal_lm, load_tokenizer

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
    metrics = verdict["comparisons"][0]["metrics"]
    assert [m["metric"] for m in metrics] == ["arc_challenge/acc", "arc_challenge/acc_norm", "arc_challenge/gold_logprob"]
    # identical sides: McNemar needs k lost documents with 0.5**k below Holm's first level, 0.05 / 3 metrics
    assert metrics[0]["detectable"] == pytest.approx(math.ceil(math.log2(3 / 0.05)) / ITEMS)
    assert all(m["p_value"] == 1.0 and m["p_adjusted"] == 1.0 for m in metrics)
    assert (tmp_path / "s.md").read_text().startswith("## quantlab gate: PASS")


def test_damaged_quantization_fails_with_the_reason(evaluated, tmp_path):
    # the damaged weights are saved as a model of their own (another fingerprint), so comparing is on purpose
    res = _gate("--baseline", evaluated["fp"], "--candidate", evaluated["damaged"], "--json-out", tmp_path / "v.json",
                "--allow-other-model")
    assert res.exit_code == 3, res.output
    metrics = {m["metric"]: m for m in json.loads((tmp_path / "v.json").read_text())["comparisons"][0]["metrics"]}
    acc = metrics["arc_challenge/acc"]
    assert acc["verdict"] == "regression" and acc["p_adjusted"] < 0.05 and acc["detail"]["lost"] > acc["detail"]["gained"]
    assert acc["p_adjusted"] == pytest.approx(min(1.0, acc["p_value"] * 2), rel=1e-9) or acc["p_adjusted"] >= acc["p_value"]
    assert "beyond drop ≤ 0" in acc["reason"] and "REGRESSION" in res.output


def test_policy_thresholds_tolerate_a_drop_within_them(evaluated, tmp_path):
    policy = tmp_path / "loose.yaml"
    policy.write_text("alpha: 0.05\nmetrics:\n  - metric: arc_challenge/acc\n    max_drop: 0.95\n")
    assert _gate("--baseline", evaluated["fp"], "--candidate", evaluated["damaged"], "--policy", policy,
                 "--allow-other-model").exit_code == 0


def test_too_few_documents_for_the_tolerance_is_inconclusive_and_the_policy_decides(evaluated, tmp_path):
    # The fp run answers every document right. Baseline: it with documents 3-5 made wrong; candidate: it with
    # documents 0-2 made wrong. Three lost, three gained: no net drop, a spread 60 documents cannot resolve.
    def edited(wrong):
        data = json.loads(evaluated["fp"].read_text())
        for i, row in enumerate(data["runs"][0]["accuracy"]["samples"]["arc_challenge"]):
            assert row["acc"] == 1.0
            row["acc"] = 0.0 if i in wrong else 1.0
        return json.dumps(data)

    (tmp_path / "base.json").write_text(edited({3, 4, 5}))
    (tmp_path / "cand.json").write_text(edited({0, 1, 2}))
    policy = tmp_path / "tight.yaml"
    policy.write_text("metrics:\n  - metric: arc_challenge/acc\n    max_drop: 0.01\n")
    res = _gate("--baseline", tmp_path / "base.json", "--candidate", tmp_path / "cand.json", "--policy", policy,
                "--json-out", tmp_path / "v.json")
    assert res.exit_code == 0 and "INCONCLUSIVE" in res.output, res.output
    (metric,) = json.loads((tmp_path / "v.json").read_text())["comparisons"][0]["metrics"]
    assert metric["verdict"] == "inconclusive" and metric["drop"] == 0 and metric["detail"] == {"lost": 3, "gained": 3}
    assert metric["detectable"] == pytest.approx(0.01 + (stats.z(0.05) + stats.Z_POWER) * (6 / 60) ** 0.5 / 60 ** 0.5)
    policy.write_text("inconclusive: fail\nmetrics:\n  - metric: arc_challenge/acc\n    max_drop: 0.01\n")
    assert _gate("--baseline", tmp_path / "base.json", "--candidate", tmp_path / "cand.json", "--policy", policy).exit_code == 3
    # a rerun that agrees on every document is exact there: it passes, however few the documents
    assert _gate("--baseline", evaluated["fp"], "--candidate", evaluated["rerun"], "--policy", policy).exit_code == 0


def test_missing_task_fails_closed(evaluated, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("metrics:\n  - metric: hellaswag/acc\n")
    res = _gate("--baseline", evaluated["fp"], "--candidate", evaluated["rerun"], "--policy", policy)
    assert res.exit_code == 1 and "no per-sample scores for task 'hellaswag'" in res.output


def test_an_unknown_metric_is_named_with_the_tasks_metrics(evaluated, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("metrics:\n  - metric: arc_challenge/acc\n  - metric: arc_challenge/accc\n")
    res = _gate("--baseline", evaluated["fp"], "--candidate", evaluated["rerun"], "--policy", policy)
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert res.output == (f"Error: Gate policy {policy}: unknown metric 'arc_challenge/accc' — Did you mean "
                          "'arc_challenge/acc'? arc_challenge's metrics: acc, acc_norm, gold_logprob, gold_logprob_sum, flips\n")


def test_bad_reference_is_exit_1_one_line(tmp_path):
    res = _gate("--baseline", tmp_path / "nope.json", "--candidate", tmp_path / "nope.json")
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "does not exist" in res.output


def test_a_default_gate_with_nothing_to_test_fails_closed(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"runs": [{"recipe": "fp", "fidelity": {"kld_mean": 0.0}}]}))
    res = _gate("--baseline", results, "--candidate", results)
    assert res.exit_code == 1 and "no suite accuracy" in res.output


def test_binomial_upper_tail_is_exact():
    assert stats.binomial_upper(3, 10, 0.5) == pytest.approx(1 - (1 + 10 + 45) / 1024)
    assert stats.binomial_upper(2, 5, 0.1) == pytest.approx(1 - 0.9 ** 5 - 5 * 0.1 * 0.9 ** 4)
    assert stats.binomial_upper(0, 5, 0.0) == 1.0 and stats.binomial_upper(1, 5, 0.0) == 0.0
    assert stats.binomial_upper(400, 2000, 0.1) < 1e-30  # log space: no underflow to nonsense, no overflow


def test_flips_count_changed_documents_with_wilson_intervals():
    from quantlab.evaluate.flips import flips, wilson

    base = [{"doc_id": i, "acc": float(i < 6)} for i in range(10)]  # right on 0-5
    cand = [{"doc_id": i, "acc": float(2 <= i < 8)} for i in range(10)]  # right on 2-7: 0, 1 lost; 6, 7 gained
    out = flips(base, cand, "acc")
    assert out["counts"] == {"right_to_wrong": 2, "wrong_to_right": 2, "flips": 4}
    assert (out["right_to_wrong"], out["flips"], out["documents"]) == (0.2, 0.4, 10)
    z = 1.959963984540054
    assert wilson(0, 10)[1] == pytest.approx(z * z / (10 + z * z))  # Wilson's upper bound at 0 successes
    lo, hi = out["ci95"]["flips"]
    assert lo < 0.4 < hi and wilson(4, 10) == out["ci95"]["flips"]
    # equal accuracy (0.6 both), yet 40 % of the answers changed: what flips show and accuracy hides
    test = stats.paired_flips([r["acc"] for r in base], [r["acc"] for r in cand], margin=0.1)
    assert test.drop == 0.4 and test.p_value == pytest.approx(stats.binomial_upper(4, 10, 0.1))


def test_gate_on_flips_tolerates_its_share(evaluated, tmp_path):
    data = json.loads(evaluated["fp"].read_text())
    for row in data["runs"][0]["accuracy"]["samples"]["arc_challenge"][:10]:  # 10 of 60 documents change
        row["acc_norm"] = 1.0 - row["acc_norm"]
    (tmp_path / "cand.json").write_text(json.dumps(data))
    policy = tmp_path / "flips.yaml"
    for max_drop, code in ((0.5, 0), (0.05, 3)):
        policy.write_text(f"metrics:\n  - metric: arc_challenge/flips\n    max_drop: {max_drop}\n")
        res = _gate("--baseline", evaluated["fp"], "--candidate", tmp_path / "cand.json", "--policy", policy,
                    "--json-out", tmp_path / "v.json")
        assert res.exit_code == code, res.output
        (m,) = json.loads((tmp_path / "v.json").read_text())["comparisons"][0]["metrics"]
        assert m["detail"]["metric"] == "acc_norm" and m["drop"] == pytest.approx(10 / ITEMS)
        assert m["p_value"] == pytest.approx(stats.binomial_upper(10, ITEMS, max_drop))
    policy.write_text("metrics:\n  - metric: arc_challenge/flips\n")  # no tolerance: a rerun has no flips, passes
    assert _gate("--baseline", evaluated["fp"], "--candidate", evaluated["rerun"], "--policy", policy).exit_code == 0
