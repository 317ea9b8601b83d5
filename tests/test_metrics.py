"""The metric registry (quantlab.metrics): a metric declared once is computed by the fidelity step and shown by
the terminal table, the report, the gate and results.json's definitions, with nothing else edited; and what the
fidelity step computes is exactly what the registry declares."""

import json

import numpy as np
import pytest

from quantlab import metrics
from quantlab.errors import UsageError
from quantlab.evaluate.fidelity import FidelitySettings, summarize
from quantlab.gate import run_gate
from quantlab.gate.policy import load_policy
from quantlab.records import definitions
from quantlab.report import ReportSettings, render_report
from quantlab.table import render_table

METADATA = {"tokens", "chunks", "ci95", "ppl_kind", "kld_unit", "ci_method"}  # summarize's fields that are no metric's


@pytest.fixture()
def kld_p50_x2():
    """A throwaway metric, declared in this one place and gone after the test: twice the median per-token KLD
    (and per window), lower is better, in the terminal table and the report's distribution table."""
    metric = metrics.register_metric(metrics.Metric(
        "kld_p50_x2", "twice the median per-token KL(fp || quant), nats", "nats", higher_is_better=False,
        compute=lambda t: 2 * metrics.Quantile("kl", 50)(t),
        windows=metrics.Windows("kld_p50_x2_per_window", "twice each window's median per-token KL(fp || quant), nats",
                                lambda t: 2 * np.median(t.kl, axis=1), "KLD median x 2"),
        table=metrics.Column("KLD p50 x2", ".5f", place=7), distribution=metrics.Column("2 x KLD median", ".5f")))
    yield metric
    metrics.unregister_metric(metric.name)


def _per_token(seed: int, windows: int = 8, tokens: int = 31, kl_scale: float = 0.02) -> dict:
    """Per-token values as fidelity.compare returns them: (windows, tokens) arrays."""
    rng = np.random.default_rng(seed)
    nll_base = rng.gamma(2.0, 1.5, (windows, tokens))
    return {"kl": rng.gamma(0.5, kl_scale, (windows, tokens)), "agree": (rng.random((windows, tokens)) < 0.9) * 1.0,
            "nll": nll_base + rng.gamma(1.0, kl_scale, (windows, tokens)), "nll_baseline": nll_base}


def _run(recipe: str, method: str, params: dict, fidelity: dict) -> dict:
    return {"recipe": recipe, "method": method, "bits": 4, "params": params, "artifact": "x", "fidelity": fidelity,
            "guard": {"ok": True, "reasons": []},
            "memory": {"weights_bytes": 2**20, "disk_bytes": 2**20, "peak_bytes": 2**22},
            "latency": {"prefill_ms": 1.0, "decode_tok_s": {"1": 10.0, "8": 40.0}, "skipped": None},
            "cost": {"quantize_wall_s": 1.0},
            "provenance": {"text": {"name": "ref.txt", "sha256": "t" * 64},
                           "fidelity_settings": {"chunk_tokens": 32, "max_chunks": 8}}}


def _results() -> dict:
    """A quantize-and-compare results.json of fp and a damaged candidate, the fidelity computed by the fidelity
    step's own summary from per-token values."""
    settings = FidelitySettings(bootstrap=20)
    fp = _per_token(0, kl_scale=0.0)
    fp["nll"] = fp["nll_baseline"].copy()
    return {"model": {"ref": "tiny", "fingerprint": "f" * 64, "path": None, "note": "", "params": 10**6},
            "run_set": "r", "device": "cpu", "text": {"name": "ref.txt", "sha256": "t" * 64},
            "definitions": definitions(False),
            "runs": [_run("fp", "fp", {"dtype": "auto"}, summarize(fp, settings)),
                     _run("rtn-w4-g32", "rtn", {"bits": 4, "group_size": 32, "symmetric": True, "format": "torchao"},
                          summarize(_per_token(1), settings))]}


def test_the_fidelity_step_computes_what_the_registry_declares_and_nothing_else():
    s = summarize(_per_token(2), FidelitySettings(bootstrap=10))
    names = [m.name for m in metrics.metrics()]
    assert [k for k, v in s.items() if isinstance(v, float)] == names  # every value declared, every one computed
    assert set(s["ci95"]) == {m.name for m in metrics.metrics() if m.interval == metrics.BOOTSTRAP}
    windows = [m.windows.key for m in metrics.gated()]
    assert [k for k, v in s.items() if isinstance(v, list)] == windows == ["kld_per_window", "nll_per_window"]
    assert set(s) == set(names) | set(windows) | METADATA
    assert list(definitions(False))[:len(metrics.definitions())] == list(metrics.definitions())
    assert set(names) | set(windows) <= set(metrics.definitions())


def test_a_metric_declared_once_is_computed_with_its_interval_and_windows(kld_p50_x2):
    per_token = _per_token(3)
    s = summarize(per_token, FidelitySettings(bootstrap=30))
    assert s["kld_p50_x2"] == pytest.approx(2 * s["kld_median"]) and s["kld_p50_x2"] > 0
    lo, hi = s["ci95"]["kld_p50_x2"]
    assert lo <= s["kld_p50_x2"] <= hi
    assert s["kld_p50_x2_per_window"] == pytest.approx(list(2 * np.median(per_token["kl"], axis=1)))
    assert definitions(False)["kld_p50_x2"] == "twice the median per-token KL(fp || quant), nats"
    assert "kld_p50_x2_per_window" in definitions(True, True)


def test_a_metric_declared_once_is_in_the_table(kld_p50_x2):
    data = _results()
    header, rule, fp, cand = render_table(data).splitlines()[:4]
    assert "KLD p50 x2" in header and header.index("ppl (token)") < header.index("KLD p50 x2") < header.index("weights")
    assert f"{data['runs'][1]['fidelity']['kld_p50_x2']:.5f}" in cand and "0.00000" in fp


def test_a_metric_declared_once_is_in_the_report(kld_p50_x2):
    data = _results()
    page = render_report(data, ReportSettings())
    value = data["runs"][1]["fidelity"]["kld_p50_x2"]
    lo, hi = data["runs"][1]["fidelity"]["ci95"]["kld_p50_x2"]
    assert "<th>2 x KLD median</th>" in page
    assert f"<td>{value:.5f}<br><small>[{lo:.5f}, {hi:.5f}]</small></td>" in page
    assert "<dt>kld_p50_x2</dt><dd>twice the median per-token KL(fp || quant), nats</dd>" in page


def test_a_metric_declared_once_is_gated_in_its_direction(kld_p50_x2, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results()))
    policy = tmp_path / "p.yaml"
    policy.write_text("metrics:\n  - metric: fidelity/kld_p50_x2\n    max_drop: 0.001\n")
    assert not load_policy(policy).rules[0].higher_is_better  # the declaration's direction, not the default
    verdict = run_gate(f"{path}@fp", f"{path}@rtn-w4-g32", str(policy))
    result = verdict["comparisons"][0]["metrics"][0]
    assert result["metric"] == "fidelity/kld_p50_x2" and not result["higher_is_better"]
    assert result["n"] == 8 and result["candidate"] > result["baseline"] == 0  # its per-window values paired
    assert verdict["verdict"] == "regression"  # a rise is a loss: lower is better
    # the candidate gated against itself: nothing lost
    assert run_gate(f"{path}@rtn-w4-g32", f"{path}@rtn-w4-g32", str(policy))["verdict"] == "pass"


def test_the_gate_names_the_metrics_it_can_pair(kld_p50_x2, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("metrics:\n  - metric: fidelity/kld_p99\n")  # declared, but no per-window values to pair
    with pytest.raises(UsageError, match="unknown fidelity metric 'kld_p99' — use fidelity/kld_mean, fidelity/ppl "
                                         "or fidelity/kld_p50_x2"):
        load_policy(policy)


def test_without_the_throwaway_metric_nothing_shows_it():
    """The fixture unregistered it: the built-ins alone, as every other test sees them."""
    assert "kld_p50_x2" not in [m.name for m in metrics.metrics()]
    assert "KLD p50 x2" not in render_table(_results()) and "kld_p50_x2" not in definitions(True, True)


def test_a_taken_name_or_window_key_is_refused_and_an_unknown_name_gets_a_suggestion():
    kld = metrics.get_metric("kld_mean")
    with pytest.raises(UsageError, match="kld_mean, kld_per_window already taken"):
        metrics.register_metric(kld)
    with pytest.raises(UsageError, match="nll_mean: nll_per_window already taken"):
        metrics.register_metric(metrics.Metric("nll_mean", "d", "nats/token", False, lambda t: t.nll.mean(),
                                               windows=metrics.Windows("nll_per_window", "d", lambda t: t.nll, "NLL")))
    with pytest.raises(UsageError, match="tokens already taken"):
        metrics.register_metric(metrics.Metric("tokens", "d", "tokens", True, lambda t: t.kl.size))
    with pytest.raises(UsageError, match="Did you mean 'kld_mean'"):
        metrics.get_metric("kld_maen")
    with pytest.raises(UsageError, match="needs a direction"):
        metrics.Metric("dp_x", "d", "probability", None, lambda t: t.dp.mean(),
                       windows=metrics.Windows("dp_x_per_window", "d", lambda t: t.dp.mean(axis=1), "Δp"))
    with pytest.raises(UsageError, match="interval 'jackknife' is none of"):
        metrics.Metric("kl_x", "d", "nats", False, lambda t: t.kl.mean(), interval="jackknife")
    assert "nll_mean" not in [m.name for m in metrics.metrics()]
