"""The real embedded model through bnb and RTN: fidelity must order sensibly."""

import json

import pytest
from click.testing import CliRunner

from quantlab.cli import cli


@pytest.mark.slow
def test_smollm2_int8_is_closer_than_4bit(tmp_path):
    res = CliRunner().invoke(cli, [
        "quantize-and-compare", "--recipes", "bnb-int8,bnb-nf4,rtn-w4-g64", "--out", str(tmp_path / "out"),
        "--chunks", "4", "--chunk-tokens", "128", "--repetitions", "1", "--decode-tokens", "2",
        "--batch-sizes", "1", "--json"], obj={})
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert "dequantized" in data["model"]["note"] and "Q4_1" in data["model"]["note"]
    kld = {r["recipe"]: r["fidelity"]["kld_mean"] for r in data["runs"]}
    assert kld["fp"] == pytest.approx(0.0, abs=1e-9)
    assert 0 < kld["bnb-int8"] < kld["bnb-nf4"]
    assert kld["bnb-int8"] < kld["rtn-w4-g64"]
    ppl = {r["recipe"]: r["fidelity"]["ppl"] for r in data["runs"]}
    assert 5 < ppl["fp"] < 100  # SmolLM2 on wikitext: a language model, not noise
    assert all(r["guard"]["ok"] for r in data["runs"]), [r["guard"] for r in data["runs"]]
    weights = {r["recipe"]: r["memory"]["weights_bytes"] for r in data["runs"]}
    assert weights["bnb-nf4"] < weights["bnb-int8"] < weights["fp"]
    # The report beside it: the planner predicts every recipe's measured weight bytes within 1 %.
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Baseline:" in page and "Q4_1" in page
    from quantlab.plan import PlanSettings, plan_model
    from quantlab.recipe import parse_recipe_list

    plan = plan_model("smollm2-135m", PlanSettings(device="cpu", recipes=tuple(parse_recipe_list(",".join(weights)))))
    for row in plan["recipes"]:
        assert abs(row["weights_bytes"] - weights[row["recipe"]]) <= 0.01 * weights[row["recipe"]], row["recipe"]
